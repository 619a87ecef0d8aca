"""`switchboard token create NAME --scope S…`: a new bearer token, printed once."""

from __future__ import annotations

import argparse
import sys

from service.crypto.tokens import create_token
from service.settings import Settings


def create(ns: argparse.Namespace, settings: Settings) -> int:
    """Print a new token once; its hash joins the clients file."""

    token, path = create_token(settings.providers_dir, ns.name, ns.scope)
    print(token)
    print(f"added client {ns.name!r} to {path}; the token is shown only this once", file=sys.stderr)
    return 0

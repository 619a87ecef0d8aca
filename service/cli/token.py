"""`switchboard token create NAME --scope S…`: a new bearer token, printed once."""

from __future__ import annotations

import argparse
import re
import sys

from service.config.models import CLIENT_NAME_PATTERN
from service.crypto.tokens import create_token
from service.settings import Settings


def create(ns: argparse.Namespace, settings: Settings) -> int:
    """Print a new token once; its hash joins the clients file. 2 for a name no client may have."""
    if not re.fullmatch(CLIENT_NAME_PATTERN, ns.name):  # wrong usage, told before any file is read
        print(
            f"switchboard: error: NAME: {ns.name!r} is not a client name "
            "(a letter or digit, then letters, digits, `.`, `_` or `-`; at most 63)",
            file=sys.stderr,
        )
        return 2
    token, path = create_token(settings.providers_dir, ns.name, ns.scope)
    print(token)
    print(f"added client {ns.name!r} to {path}; the token is shown only this once", file=sys.stderr)
    return 0

"""`switchboard encrypt FILE…`: encrypt files in place with the project's `.sops.yaml` rules."""

from __future__ import annotations

import argparse

from service.crypto.sops import Sops
from service.settings import Settings


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Encrypt each file, replacing it atomically."""
    sops = Sops.from_settings(settings)
    for path in ns.files:
        sops.encrypt_in_place(path)
        print(f"encrypted {path}")
    return 0

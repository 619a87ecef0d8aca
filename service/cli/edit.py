"""`switchboard edit FILE`: edit an encrypted file through sops, then validate it."""

from __future__ import annotations

import argparse

from service.cli.validate import render
from service.config.validation import validate
from service.crypto.sops import Sops
from service.settings import Settings


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Open the file in $EDITOR through sops; 1 when sops failed or the result does not validate."""
    code = Sops.from_settings(settings).edit(ns.file)
    if code not in (0, 200):
        return 1
    problems = validate([ns.file])
    if problems:
        print(render(problems, "text", 1))
        return 1
    return 0

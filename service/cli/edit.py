"""`switchboard edit FILE`: edit an encrypted file through sops, then validate it."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli.validate import render
from service.config.loader import parse
from service.config.validation import validate
from service.crypto.sops import Sops
from service.errors import FileRejected
from service.settings import Settings


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Open the file in $EDITOR through sops; 1 when sops failed or the result does not validate."""
    sops = Sops.from_settings(settings)
    path = Path(ns.file)
    before = path.read_bytes() if path.is_file() else None
    code = sops.edit(ns.file)
    if code not in (0, 200):
        return 1
    if code == 0 and before is not None and _mac_kept(str(path), before, path.read_bytes()):
        sops.rotate(path)
    problems = validate([ns.file])
    if problems:
        print(render(problems, "text", 1))
        return 1
    return 0


def _mac_kept(file: str, before: bytes, after: bytes) -> bool:
    """Whether sops saved a change under the MAC it had (docs/reference.md §2.4).

    sops reuses the MAC's IV when the values, joined, are the same and the second of
    `lastmodified` too: an edit within the second of the last write that only moved bytes
    between values, or renamed a key. The file would then read as changed outside sops;
    a new data key (`sops rotate`) gives it a MAC of its own.
    """
    try:
        old, new = parse(file, before), parse(file, after)
    except FileRejected:
        return False  # validate says what is wrong
    known = {old.seal.mac: (file, old.seal)} if old.seal else {}
    return new.changed_outside_sops(known) is not None

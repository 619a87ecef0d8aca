"""`switchboard validate [PATH…] [--format text|json|github] [--decrypt]`: problems, for CI."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from service.config.validation import collect, validate
from service.crypto.sops import Sops
from service.errors import Problem
from service.settings import Settings


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Print every problem of the files named (default: the providers folder); 1 when any."""
    paths = list(ns.paths) or [settings.providers_dir]
    missing = [p for p in paths if not p.exists()]
    if missing:
        for path in missing:
            print(f"switchboard: error: {path}: no such file or folder", file=sys.stderr)
        return 1
    problems = validate(
        paths, sops=Sops.from_settings(settings) if ns.decrypt else None, root=settings.files_root
    )
    files = len(collect(paths))
    output = render(problems, ns.format, files)
    if output:
        print(output)
    if ns.format == "text":
        verdict = f"{len(problems)} problem(s)" if problems else "ok"
        print(f"{files} file(s) checked: {verdict}", file=sys.stderr)
    return 1 if problems else 0


def render(problems: list[Problem], fmt: str, files: int) -> str:
    """Problems as text (`FILE:LINE: error: MESSAGE`), GitHub annotations, or JSON."""
    if fmt == "json":
        body = {"ok": not problems, "files": files, "problems": [asdict(p) for p in problems]}
        return json.dumps(body, indent=2)
    if fmt == "github":
        return "\n".join(
            f"::error file={_gh(p.file, prop=True)},line={p.line}::{_gh(p.message)}" for p in problems
        )
    return "\n".join(str(p) for p in problems)


def _gh(text: str, *, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text

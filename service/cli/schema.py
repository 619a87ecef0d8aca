"""`switchboard schema [--check]`: the JSON Schemas under `schemas/`, generated from the models."""

from __future__ import annotations

import argparse
import json
import sys

from service.config.models import MODELS, json_schema
from service.files import write_atomically
from service.journal.events import event_log_schema
from service.settings import Settings


def render_schemas() -> dict[str, str]:
    """File name -> text of every schema: one per document kind, and the event log's."""
    schemas = {f"{kind}.schema.json": json_schema(kind) for kind in MODELS}
    schemas["events.schema.json"] = event_log_schema()
    return {
        name: json.dumps(schema, indent=2, sort_keys=True) + "\n" for name, schema in sorted(schemas.items())
    }


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Write the stale schemas; with `--check`, name them and exit 1 instead."""
    folder = settings.root / "schemas"
    stale = []
    for name, text in render_schemas().items():
        path = folder / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not ns.check:
            write_atomically(path, text.encode("utf-8"))
            print(f"wrote {path}")
    if ns.check and stale:
        for path in stale:
            print(f"{path}: stale; run `switchboard schema`", file=sys.stderr)
        return 1
    return 0

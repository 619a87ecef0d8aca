"""The JSON Schemas checked in under `schemas/`, generated from the models."""

from __future__ import annotations

import json

from service.events import event_log_schema
from service.models import MODELS, json_schema


def render_schemas() -> dict[str, str]:
    """File name -> text of every schema: one per document kind, and the event log's."""
    schemas = {f"{kind}.schema.json": json_schema(kind) for kind in MODELS}
    schemas["events.schema.json"] = event_log_schema()
    return {
        name: json.dumps(schema, indent=2, sort_keys=True) + "\n" for name, schema in sorted(schemas.items())
    }

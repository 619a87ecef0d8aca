"""`GET /openapi.json`: the OpenAPI 3.1 description of every endpoint (docs/reference.md §6),
built once per app.

This module builds the document and serves it; what each operation says (its scope,
parameters, body, answers and headers) is in the tables beside it, one per part of the API:
the service's own routes here, `service.http.config_operations` (the reads, change push,
replicas), `service.http.write_operations` and `service.http.gateway_operations`, made of
the parts of `service.http.operations`. Schemas come from pydantic models: the answers
(`service.http.answers` and the `*_answers` modules beside it), the write bodies
(`service.http.bodies`), the file models (a provider body is the file's fields, `api_key` in
plaintext) and the events.
`tests/http/test_openapi.py` fails when the app has a route that is not described, and runs
schemathesis against a live service, so an answer that does not match its description fails
the tests too.

OpenAPI's bearer scheme has no scopes: each operation names its scope in its description and
in `x-switchboard-scope`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

from aiohttp import web

from service import __version__
from service.http import (
    config_operations,
    gateway_operations,
    service_answers,
    usage_operations,
    write_operations,
)
from service.http.operations import JSON, Operation, Schemas, json_answer
from service.http.pages import PAGES, Pages
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

PATH = "/openapi.json"


def setup(app: web.Application) -> None:
    """Serve the document at `/openapi.json` (no authentication, like `/healthz`)."""
    app[_DOCUMENT] = _Encoded()
    app.router.add_get(PATH, _openapi)


@dataclass(slots=True)
class _Encoded:
    """The document's bytes: made on the first request, then kept for the app's life."""

    body: bytes | None = None


_DOCUMENT = web.AppKey("openapi_document", _Encoded)


async def _openapi(request: web.Request) -> web.StreamResponse:
    encoded = request.app[_DOCUMENT]
    if encoded.body is None:
        # pydantic's schema generation takes a moment
        pages: tuple[Pages, ...] = request.app[PAGES]
        made = await asyncio.to_thread(document, pages)
        encoded.body = json.dumps(made, separators=(",", ":")).encode()
    return web.Response(body=encoded.body, content_type=JSON)


def document(pages: Iterable[Pages] = ()) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the service, with the routes of the `pages` it mounts."""
    schemas = Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for op in chain(operations(schemas), *(page.operations(schemas) for page in pages)):
        paths.setdefault(op.path, {})[op.method.lower()] = op.render(schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Switchboard",
            "version": __version__,
            "summary": "GitOps configuration service and OpenAI-compatible gateway for LLM providers",
            "description": _ABOUT,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [{"name": name, "description": text} for name, text in _TAGS.items()],
        "paths": paths,
        "components": {
            "schemas": schemas.render(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of the clients file (`switchboard token create --scope ...`).",
                }
            },
        },
    }


_ABOUT = (
    "Every endpoint but `/` (a probe), `/healthz`, `/readyz`, `/metrics`, `/openapi.json`, "
    "the console's files "
    "(`/ui/`) and the signed git webhook needs `Authorization: Bearer TOKEN` with the scope its "
    "description names (`x-switchboard-scope`) once a clients file "
    'exists. Errors are `{"error": {"type", "message", ...}}`; no input makes the service answer 500.'
)
_TAGS = {
    "service": "Liveness, readiness, metrics and this document.",
    "configuration": "What is active, the providers, the audit log, past states (docs/reference.md §6).",
    "writes": "Writes that become git commits (docs/reference.md §8).",
    "gateway": "The OpenAI-compatible gateway (docs/reference.md §7).",
    "replicas": "Many replicas: the git webhook, and who serves which commit (docs/reference.md §12).",
    "usage": "The usage ledger: every answered request, its tokens and its cost (docs/reference.md §13).",
}


def operations(schemas: Schemas) -> Iterable[Operation]:
    """Every operation of the app: a route added to the app is described here or in a table beside."""
    yield from _service(schemas)
    yield from config_operations.configuration(schemas)
    yield from config_operations.change_push(schemas)
    yield from write_operations.writes(schemas)
    yield from gateway_operations.gateway(schemas)
    yield from config_operations.many_replicas(schemas)
    yield from usage_operations.usage(schemas)


# -- the service ------------------------------------------------------------------------------------


def _service(s: Schemas) -> Iterable[Operation]:
    metrics = {METRICS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}
    yield Operation(
        "GET", "/healthz", None, "Liveness", {"200": s.returns(service_answers.Liveness, "it answers")}
    )
    yield Operation(
        "GET",
        "/readyz",
        None,
        "Readiness: the first load is done; the files the last load refused, and why",
        {
            "200": s.returns(service_answers.Readiness, "ready"),
            "503": s.error("the first load is not complete"),
        },
    )
    yield Operation(
        "GET", "/metrics", None, "Prometheus metrics", {"200": {"description": "text", "content": metrics}}
    )
    yield Operation(
        "GET", PATH, None, "This document", {"200": json_answer({"type": "object"}, "OpenAPI 3.1")}
    )

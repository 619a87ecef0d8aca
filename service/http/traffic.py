"""`GET /api/v1/llm-config/traffic` (config:read): each provider's traffic since the start.

The gateway counts every upstream attempt, its time to the first byte and the tokens the
upstream reported, in the service's Prometheus metrics. This answers the same numbers as
JSON, by provider, for the web console and anyone else who would rather not parse
Prometheus' text: `{"since", "providers": {id: {"requests", "errors", "latency_ms",
"tokens": {"prompt", "completion"}}}}`, every provider of the current configuration
listed (zeros before its first request). Like every GET under the API it carries an ETag
and takes blocking queries (docs/reference.md §9); traffic does not move the index, so a held query
answers when the configuration or a health changes, or when `wait` runs out.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from service.errors import NotReady
from service.http.auth import scoped
from service.http.context import METRICS, PREFIX, REGISTRY
from service.http.push import watched
from service.metrics import Traffic

PATH = f"{PREFIX}/traffic"


def setup(app: web.Application) -> None:
    """Add `GET …/traffic` to the app."""
    app.router.add_get(PATH, _traffic)


@scoped("config:read")
@watched
async def _traffic(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    if not registry.ready:
        raise NotReady("the first load of the configuration is not complete")
    snapshot = registry.snapshot
    metrics = request.app[METRICS]
    # Reading every counter's children takes a moment with a thousand providers: off the loop,
    # so the gateway's requests are not held behind it.
    counted = await asyncio.to_thread(metrics.traffic)
    providers = {pid: _answer(counted.get(pid, _NONE)) for pid in sorted(snapshot.providers)}
    since = metrics.started_at.isoformat(timespec="microseconds").replace("+00:00", "Z")
    return web.json_response({"since": since, "providers": providers})


_NONE = Traffic()


def _answer(traffic: Traffic) -> dict[str, Any]:
    return {
        "requests": traffic.requests,
        "errors": traffic.errors,
        "latency_ms": traffic.latency_ms,
        "tokens": {"prompt": traffic.prompt_tokens, "completion": traffic.completion_tokens},
    }

"""OpenTelemetry for the gateway (docs/reference.md §14): started with the app, flushed as it stops.

With `SWITCHBOARD_OTEL_EXPORTER=otlp`, the cleanup context imports the SDK and the OTLP
exporters (service/gateway/tracing/exporting.py), before the gateway's own context builds the
relay, which is handed the `Tracing`; on shutdown (SIGTERM) it runs after the relay has
stopped, and exports the spans and metrics still batched. Off, it imports nothing and sets
nothing: the relay gets no `Tracing`, and the request path does no tracing work at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from service.http.context import SETTINGS, TELEMETRY


def setup(app: web.Application) -> None:
    """Add the telemetry's cleanup context; call before the gateway's (openai_api.setup)."""
    app.cleanup_ctx.append(_telemetry)


async def _telemetry(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if not settings.tracing:
        yield
        return
    from service.gateway.tracing.exporting import Telemetry  # only when on: OpenTelemetry is large

    telemetry = app[TELEMETRY] = Telemetry.start(settings)
    try:
        yield
    finally:
        await telemetry.aclose()

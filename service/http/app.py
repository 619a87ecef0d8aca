"""The aiohttp application: `create_app(settings)` and the service's lifecycle.

The cleanup context opens the event log, records `service.started`, builds the registry
and runs the watcher as a background task; on shutdown it stops the watcher, waits for any
apply still running in its thread, and only then closes the log, so no append comes late.
Every error leaves as the JSON of docs/reference.md §6.4, `{"error": {"type", "message"}}`, from
one middleware.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

from aiohttp import web

from service import __version__
from service.crypto.sops import Sops
from service.errors import BadRequest, HTTPError, NotReady, PayloadTooLarge
from service.gateway.health import Health
from service.http import (
    changes,
    config_api,
    console,
    openai_api,
    openapi,
    protocols_api,
    replicas,
    traffic,
    write_api,
)
from service.http.auth import Handler
from service.http.changes import CHANGES, Changes
from service.http.context import (
    EVENTS,
    HEALTH,
    METRICS,
    PULLER,
    REGISTRY,
    RELOADER,
    SETTINGS,
    SOPS,
    WRITER,
    stop_task,
)
from service.journal.events import BaseEvent, ServiceStarted
from service.journal.log import EventLog
from service.metrics import CONTENT_TYPE, Metrics
from service.runtime.registry import Outcome, Registry
from service.runtime.watcher import Reloader
from service.runtime.writer import Writer
from service.settings import Settings
from service.vcs.attribution import Attributor

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, sops: Sops | None = None) -> web.Application:
    """The service as an aiohttp application; nothing starts until the app runs."""
    app = web.Application(middlewares=[_errors], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[METRICS].info.labels(settings.replica, __version__).set(1)
    app[HEALTH] = Health(
        failures=settings.circuit_failures,
        cooldown_s=settings.circuit_cooldown_s,
        confirm=settings.health_confirm,
    )
    app[SOPS] = sops or Sops.from_settings(settings)
    app.on_response_prepare.append(_nosniff)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.cleanup_ctx.append(_service)  # first: the features' contexts use its log and registry
    config_api.setup(app)
    write_api.setup(app)
    openai_api.setup(app)
    protocols_api.setup(app)
    openapi.setup(app)
    changes.setup(app)
    replicas.setup(app)
    traffic.setup(app)
    console.setup(app)
    return app


async def _service(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]

    def count(event: BaseEvent) -> None:
        metrics.events.labels(event.type).inc()

    events = EventLog(settings.events_file, on_append=count)
    if events.recovered_tail:
        log.warning("event log: %s", events.recovered_tail)
    events.append(
        ServiceStarted(
            version=__version__, pid=os.getpid(), replica=settings.replica, recovered=events.recovered_tail
        )
    )
    attributor = Attributor(settings.providers_dir)
    registry = Registry(events, settings.files_root, attributor)

    def on_reload(outcome: Outcome, seconds: float) -> None:
        metrics.reloads.labels("applied" if outcome.applied else "refused").inc()
        metrics.reload_seconds.observe(seconds)
        metrics.generation.set(outcome.snapshot.generation)
        metrics.providers.set(len(outcome.snapshot.providers))
        metrics.files_refused.set(len(outcome.refused))

    reloader = Reloader(
        settings.providers_dir,
        settings.files_root,
        registry,
        app[SOPS],
        debounce_ms=settings.debounce_ms,
        rescan_s=settings.rescan_s,
        on_reload=on_reload,
    )
    writer = Writer(settings, app[SOPS], registry, reloader, attributor.repo)
    await asyncio.to_thread(writer.recover)  # a write a crash cut short, before anything loads
    app[EVENTS], app[REGISTRY], app[RELOADER], app[WRITER] = events, registry, reloader, writer
    # Before the first load, so blocking queries and streams hear of it.
    app[CHANGES] = Changes(events, registry, settings.replica, settings.max_watchers)
    stop = asyncio.Event()
    watcher = asyncio.create_task(reloader.watch(stop), name="switchboard-watcher")
    try:
        yield
    finally:
        stop.set()
        await stop_task(watcher)
        await reloader.aclose()  # a cancelled reload's apply finishes in its thread first
        events.close()


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    try:
        response = await handler(request)
    except HTTPError as exc:
        response = web.json_response(exc.body(), status=exc.status, headers=exc.headers())
    except web.HTTPRequestEntityTooLarge:
        error = PayloadTooLarge.over(request.app[SETTINGS].max_body_bytes)
        response = web.json_response(error.body(), status=error.status)
    except web.RequestPayloadError as exc:  # a body it cannot decode: gzip that is not
        reason = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        refused = BadRequest(f"the body could not be read: {type(reason).__name__}")
        response = web.json_response(refused.body(), status=refused.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = exc.reason.lower().replace(" ", "_")
        response = web.json_response({"error": {"type": kind, "message": exc.reason}}, status=exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, route)
        body = {"error": {"type": "internal_error", "message": "internal error; see the service log"}}
        response = web.json_response(body, status=500)
    metrics.answered(route, request.method, response.status, time.perf_counter() - started)
    return response


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    # Errors quote what was asked (`no provider '<script>…'`): every answer is what its
    # Content-Type says, never guessed into a page that would run in the console's origin.
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    registry = request.app.get(REGISTRY)
    state = registry.state if registry is not None else None
    if state is None or not state.ready:
        raise NotReady("the first load of the configuration is not complete")
    puller = request.app.get(PULLER)
    body = {
        "status": "ready",
        "replica": request.app[SETTINGS].replica,
        "generation": state.snapshot.generation,
        "last_applied_commit": state.last_applied_commit,
        "last_attempted_commit": state.last_attempted_commit,
        "refused": [{"file": f, "reason": r} for f, r in sorted(state.refused.items())],
        "degraded": state.degraded,
    }
    if puller is not None:  # SWITCHBOARD_GIT_PULL (docs/reference.md §12)
        body["sync"] = puller.status.answer()
    return web.json_response(body)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})

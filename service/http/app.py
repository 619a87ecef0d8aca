"""The aiohttp application: `create_app(settings)` and the service's lifecycle.

The cleanup context opens the event log, records `service.started`, builds the registry
and runs the watcher as a background task; on shutdown it stops the watcher, waits for any
apply still running in its thread, and only then closes the log, so no append comes late.
Every error leaves as the JSON of docs/reference.md §6.4, `{"error": {"type", "message"}}`, from
one middleware (`service.http.middleware`). The gateway's routes are taken before the router
(`service.http.gateway`); `serve` settles the garbage collector (`service.http.collector`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from service import __version__
from service.config.upstreams import AllowedUpstreams, Lookup, system_lookup
from service.crypto.sops import Sops
from service.errors import EventLogError, NotReady
from service.gateway.health import Health
from service.http import (
    changes,
    config_api,
    limits_api,
    openai_api,
    openapi,
    protocols_api,
    replicas,
    telemetry,
    traffic,
    usage_api,
    write_api,
)
from service.http.auth import KNOWN_TOKENS, KnownTokens
from service.http.changes import CHANGES, Changes
from service.http.context import (
    EVENTS,
    HEALTH,
    LEDGER,
    LIMITS,
    LOOKUP,
    METRICS,
    PULLER,
    REGISTRY,
    RELOADER,
    SETTINGS,
    SOPS,
    UPSTREAMS,
    WORKER,
    WRITER,
    stop_task,
)
from service.http.gateway import Gateway
from service.http.leader import LEADER
from service.http.malformed import ProtocolLog
from service.http.middleware import answer_errors, nosniff
from service.http.pages import PAGES, Pages
from service.http.tags import TAGS, Tags
from service.journal.events import BaseEvent, ServiceStarted
from service.journal.log import EventLog
from service.metrics import CONTENT_TYPE, Metrics
from service.runtime.registry import Outcome, Registry
from service.runtime.watcher import Reloader
from service.runtime.writer import Writer
from service.settings import Settings
from service.usage.pricing import litellm_version
from service.vcs.attribution import Attributor
from service.vcs.gitrepo import GitRepo

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    sops: Sops | None = None,
    lookup: Lookup = system_lookup,
    pages: Sequence[Pages] = (),
) -> web.Application:
    """The service as an aiohttp application; nothing starts until the app runs.

    `lookup` resolves upstream host names (the system's resolver). `pages` are mounted beside
    the API (`switchboard serve` passes the web console, `service.console`). Raises ValueError
    when SWITCHBOARD_ALLOWED_UPSTREAMS cannot be read.
    """
    app = web.Application(
        middlewares=[answer_errors],
        client_max_size=settings.max_body_bytes,
        handler_args={"logger": ProtocolLog(logging.getLogger("service.http.protocol"))},
    )
    app[SETTINGS] = settings
    app[KNOWN_TOKENS] = KnownTokens()
    app[UPSTREAMS] = AllowedUpstreams.parse(settings.allowed_upstreams)
    app[LOOKUP] = lookup
    app[METRICS] = Metrics()
    app[METRICS].info.labels(settings.replica, __version__, litellm_version() or "none").set(1)
    app[HEALTH] = Health(
        failures=settings.circuit_failures,
        cooldown_s=settings.circuit_cooldown_s,
        confirm=settings.health_confirm,
    )
    app[SOPS] = sops or Sops.from_settings(settings)
    app.on_response_prepare.append(nosniff)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    usage_api.setup(app)  # the ledger starts before anything can answer a request, and stops last
    app.cleanup_ctx.append(_service)  # then: the features' contexts use its log and registry
    config_api.setup(app)
    write_api.setup(app)
    telemetry.setup(app)  # before the gateway's: its relay is given the tracing, and stops first
    openai_api.setup(app)
    protocols_api.setup(app)
    limits_api.setup(app)  # after the gateway's context: its meter goes on the relay
    openapi.setup(app)
    changes.setup(app)
    replicas.setup(app)
    traffic.setup(app)
    app[PAGES] = tuple(pages)
    for page in pages:
        page.setup(app)
    Gateway(app).install()
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
    writer = Writer(settings, app[SOPS], registry, reloader, attributor.repo, lookup=app[LOOKUP])
    if WORKER not in app:  # a follower's leader recovered it: a follower writes nothing
        await asyncio.to_thread(writer.recover)  # a write a crash cut short, before anything loads
    app[EVENTS], app[REGISTRY], app[RELOADER], app[WRITER] = events, registry, reloader, writer
    # Before the first load, so blocking queries and streams hear of it.
    changes_ = app[CHANGES] = Changes(
        events, registry, settings.replica, settings.max_watchers, settings.max_watchers_per_client
    )
    tags_ = app[TAGS] = Tags(
        lambda: _repository(registry, writer), lambda: registry.state.last_applied_commit
    )
    # the commits served, so a tag of one left (a rollback) is never taken for one still to come
    registry.on_apply.append(lambda _: tags_.applied(registry.state.last_applied_commit))

    def shown(provider_id: str) -> None:
        changes_.touch()  # a provider's status or reason is in the tags: held queries look again

    app[HEALTH].on_shown.append(shown)
    stop = asyncio.Event()
    watcher = asyncio.create_task(reloader.watch(stop), name="switchboard-watcher")
    try:
        yield
    finally:
        await writer.aclose()  # a write whose client left runs to its end, not half-applied
        stop.set()
        await stop_task(watcher)
        await reloader.aclose()  # a cancelled reload's apply finishes in its thread first
        events.close()
        app[HEALTH].on_shown.remove(shown)


def _repository(registry: Registry, writer: Writer) -> GitRepo | None:
    """The repository the configuration is read from (git-sync's worktree, followed), for the tags."""
    attributor = registry.attributor
    return attributor.repo if attributor is not None and attributor.repo is not None else writer.repo


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    registry = request.app.get(REGISTRY)
    state = registry.state if registry is not None else None
    if state is None or not state.ready:
        why = f": {state.waiting}" if state is not None and state.waiting else ""
        raise NotReady(f"the first load of the configuration is not complete{why}")
    keeper = request.app.get(LIMITS)
    if keeper is None or not keeper.ready.is_set():
        raise NotReady("the budgets' spent is not read back yet (docs/reference.md §13)")
    limiter = keeper.limiter
    puller = request.app.get(PULLER)
    ledger = request.app[LEDGER].state
    events = request.app[EVENTS]
    with contextlib.suppress(EventLogError):  # its fault is said below
        await asyncio.to_thread(events.check)  # reads the file's end: off the loop
    body = {
        "status": "ready",
        "replica": request.app[SETTINGS].replica,
        "generation": state.snapshot.generation,
        "last_applied_commit": state.last_applied_commit,
        "last_attempted_commit": state.last_attempted_commit,
        "refused": [{"file": f, "reason": r} for f, r in sorted(state.refused.items())],
        "degraded": state.degraded or limiter.degraded or ledger == "degraded" or events.fault is not None,
        "limits": limiter.mode,
        "ledger": ledger,
        "event_log": {"status": "ok" if events.fault is None else "failed", "reason": events.fault},
    }
    if puller is not None:  # SWITCHBOARD_GIT_PULL (docs/reference.md §12)
        body["sync"] = puller.status.answer()
    return web.json_response(body)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    leader = request.app.get(LEADER)
    if leader is not None:  # `serve --workers N`: every worker's (service.http.merged_metrics)
        body = await leader.metrics(body)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

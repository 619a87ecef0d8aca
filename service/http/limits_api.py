"""Limits and budgets over HTTP (docs/reference.md §13), and their place in the service's lifecycle.

    GET /api/v1/llm-config/limits     usage:read    every client's and provider's limits, and use

The lifecycle makes the `Limiter` (on Redis with `SWITCHBOARD_REDIS_URL`), the `Keeper` that
keeps its counters (spent read back at start: `/readyz` is 503 until it is; a sync every
second; the snapshot of spent beside the spool) and the gateway's `Meter` (litellm's price
map read once, off the loop; the records to `RECORDS`). Budget refusals become
`budget.exhausted` events, written with the health events, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from service.config.metering import Budget, Limits
from service.config.models import Client
from service.config.snapshot import Snapshot
from service.gateway.metering import Meter
from service.http.auth import scoped
from service.http.context import (
    EVENTS,
    HEALTH,
    HEALTH_EVENTS,
    LIMITS,
    METRICS,
    PREFIX,
    RECORDS,
    REGISTRY,
    RELAY,
    SETTINGS,
    SPENT,
)
from service.http.push import watched
from service.journal.events import BudgetExhausted
from service.journal.log import EventLog
from service.runtime.registry import Outcome
from service.usage.limits.keeper import Keeper
from service.usage.limits.limiter import Limiter
from service.usage.limits.remote import Remote
from service.usage.limits.spent import Kind, SpentFile, SpentSource, SpoolSource
from service.usage.periods import Window
from service.usage.pricing import Pricing, bundled

LIMITS_PATH = f"{PREFIX}/limits"


def setup(app: web.Application) -> None:
    """Add `…/limits`, and run the limits with the gateway (after its context: it needs the relay)."""
    app.router.add_get(LIMITS_PATH, _limits)
    app.cleanup_ctx.append(_lifecycle)


# -- GET …/limits, whoami ---------------------------------------------------------------------------


@scoped("usage:read")
@watched
async def _limits(request: web.Request) -> web.StreamResponse:
    keeper = request.app[LIMITS]
    snapshot = request.app[REGISTRY].snapshot
    clients = list(snapshot.clients.clients) if snapshot.clients is not None else []
    providers = sorted(snapshot.providers.values(), key=lambda p: p.id)
    client_uses, provider_uses = await keeper.uses(
        [(c.name, c.limits) for c in clients], [(p.id, p.budget) for p in providers]
    )
    return web.json_response(
        {
            "clients": [
                {"name": c.name, "limits": _limits_json(c.limits), "used": client_uses[c.name].answer()}
                for c in clients
            ],
            "providers": [
                {"id": p.id, "limits": _budget_json(p.budget), "used": provider_uses[p.id].answer()}
                for p in providers
            ],
            "mode": keeper.limiter.mode,
            "replicas": keeper.limiter.replicas,
        }
    )


async def own_limits(app: web.Application, client: Client) -> dict[str, Any]:
    """A client's own `limits` and `used`, as `whoami` adds them."""
    client_uses, _ = await app[LIMITS].uses([(client.name, client.limits)], [])
    return {"limits": _limits_json(client.limits), "used": client_uses[client.name].answer()}


def _limits_json(limits: Limits | None) -> dict[str, Any] | None:
    return limits.model_dump(mode="json", exclude_none=True) if limits is not None else None


def _budget_json(budget: Budget | None) -> dict[str, Any] | None:
    return {"budget": budget.model_dump(mode="json")} if budget is not None else None


# -- lifecycle ------------------------------------------------------------------------------------


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    keeper = app[LIMITS] = _keeper(app)
    limiter = keeper.limiter
    relay = app[RELAY]
    meter = relay.meter = Meter(
        limiter,
        Pricing(await asyncio.to_thread(bundled)),  # litellm's price map, read once, off the loop
        app[METRICS],
        app[HEALTH],
        replica=settings.replica,
        default_max_tokens=settings.default_max_tokens,
        sink=app[RECORDS],
        label=relay.model_label,
    )
    configure = _configure(keeper)
    app[REGISTRY].on_apply.append(configure)
    app[METRICS].before_render.append(keeper.show_spent)
    stop = asyncio.Event()
    keeping = asyncio.create_task(_keep(app, keeper, stop), name="switchboard-limits")
    try:
        yield
    finally:
        app[REGISTRY].on_apply.remove(configure)
        app[METRICS].before_render.remove(keeper.show_spent)
        await meter.drain()
        stop.set()
        with contextlib.suppress(TimeoutError):  # the last snapshot of spent is written
            await asyncio.wait_for(asyncio.shield(keeping), timeout=5)
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping
        limiter.on_exhausted = None
        relay.meter = None
        if limiter.remote is not None:
            await limiter.remote.aclose()


def _keeper(app: web.Application) -> Keeper:
    settings, queue = app[SETTINGS], app[HEALTH_EVENTS]
    url = settings.redis_url.get_secret_value() if settings.redis_url is not None else None
    limiter = Limiter(remote=Remote(url) if url else None, without_redis=settings.limits_without_redis)
    gauge = app[METRICS].budget_spent

    def exhausted(kind: str, subject: str, window: Window) -> None:
        kind_ = "client" if kind == "client" else "provider"
        queue.put_nowait(BudgetExhausted(subject=subject, kind=kind_, period_end=window.end_text))

    limiter.on_exhausted = exhausted
    source = app.get(SPENT)
    if settings.workers > 1 and source is not None and not getattr(source, "shared", True):
        source = _Workers(source)
    return Keeper(
        limiter,
        source=source,
        file=SpentFile(settings.spent_file),
        gauge=lambda kind, subject, spent: gauge.labels(kind, subject).set(float(spent)),
    )


class _Workers:
    """The ledger as the workers of `serve --workers N` share it: a SQLite file that holds every
    worker's records, so what a budget spent before is in it once for all of them (`shared`, as
    PostgreSQL is between replicas), not once for each worker to add to Redis."""

    shared = True

    def __init__(self, source: SpentSource) -> None:
        self.source = source

    async def spent(
        self, kind: Kind, subject: str, since: datetime, until: datetime | None = None
    ) -> Decimal:
        return await self.source.spent(kind, subject, since, until)

    async def spooled(self, kind: Kind, subject: str, since: datetime) -> Decimal:
        if isinstance(self.source, SpoolSource):
            return await self.source.spooled(kind, subject, since)
        return Decimal(0)


def _already_exhausted(events: EventLog, limiter: Limiter) -> None:
    """Mark the `budget.exhausted` events this replica's log already holds for periods not yet
    over, so that a restart does not write them again (once per subject and period in the log).
    Reads the file (only those events' lines are parsed): run in a thread, before `/readyz` is 200."""
    now = datetime.fromtimestamp(limiter.clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for event in events.select(type="budget.exhausted"):
        if isinstance(event, BudgetExhausted) and (event.period_end is None or event.period_end > now):
            limiter.reported(event.kind, event.subject, event.period_end)


def subjects(snapshot: Snapshot) -> tuple[list[tuple[str, str, Budget]], list[str]]:
    """The budgets of a configuration, and its clients with limits."""
    budgets: list[tuple[str, str, Budget]] = []
    limited = []
    for client in snapshot.clients.clients if snapshot.clients is not None else ():
        if client.limits is not None:
            limited.append(client.name)
            if client.limits.budget is not None:
                budgets.append(("client", client.name, client.limits.budget))
    for provider in snapshot.providers.values():
        if provider.budget is not None:
            budgets.append(("provider", provider.id, provider.budget))
    return budgets, limited


def _configure(keeper: Keeper) -> Callable[[Outcome], None]:
    """Tell the keeper of each configuration's budgets (told in the registry's thread; run on the loop)."""
    loop = asyncio.get_running_loop()

    def applied(outcome: Outcome) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service has stopped
            loop.call_soon_threadsafe(keeper.configure, *subjects(outcome.snapshot))

    return applied


async def _keep(app: web.Application, keeper: Keeper, stop: asyncio.Event) -> None:
    """Once the first configuration is loaded: the budgets' spent read back (then `/readyz` may
    be 200), then the counters kept every second until the stop."""
    registry = app[REGISTRY]
    while not registry.ready and not stop.is_set():  # noqa: ASYNC110 - the registry sets no event
        await asyncio.sleep(0.02)
    keeper.configure(*subjects(registry.snapshot))
    await asyncio.to_thread(_already_exhausted, app[EVENTS], keeper.limiter)
    await keeper.load()
    await keeper.run(stop)

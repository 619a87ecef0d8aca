"""The gateway's relay over the app's life (`lifecycle`, a cleanup context): opened at start
with its pooled client session, its providers' health checked every interval and again after
their files change, each confirmed transition written to the event log by a background task
(never by a request), and all of it closed on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from service.config.models import Provider
from service.errors import EventLogError
from service.gateway.health import CheckResult, Status, check
from service.gateway.protocols import ids
from service.gateway.relay import Relay
from service.gateway.transports.base import open_session
from service.http.context import (
    EVENTS,
    HEALTH,
    HEALTH_EVENTS,
    LOOKUP,
    METRICS,
    REGISTRY,
    RELAY,
    SETTINGS,
    TELEMETRY,
    UPSTREAMS,
)
from service.journal.events import BaseEvent, ProviderHealthChanged
from service.runtime.registry import Outcome
from service.settings import Settings

log = logging.getLogger("service.http.openai_api")  # its lines' logger before it was a module of its own


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings, health, queue = app[SETTINGS], app[HEALTH], app[HEALTH_EVENTS]
    session = open_session(app[UPSTREAMS], app[LOOKUP])
    app[RELAY] = Relay(
        app[METRICS],
        health,
        session,
        max_upstream_bytes=settings.max_upstream_bytes,
        ids_key=_ids_key(settings),
        tracing=app[TELEMETRY].tracing if TELEMETRY in app else None,
        allowed=app[UPSTREAMS],
    )
    health.on_change = _on_health_change(app)
    due = _Due()
    reset = _reset_on_update(app, due if settings.health_interval_s > 0 else None)
    app[REGISTRY].on_apply.append(reset)
    tasks = [asyncio.create_task(_write_events(app, queue), name="switchboard-health-events")]
    if settings.health_interval_s > 0:
        periodic = _check_periodically(app, settings.health_interval_s, due)
        tasks.append(asyncio.create_task(periodic, name="switchboard-health-checks"))
    try:
        yield
    finally:
        health.on_change = None
        app[REGISTRY].on_apply.remove(reset)
        writer, *checks = tasks
        for task in checks:
            await _stop(task)
        with contextlib.suppress(TimeoutError):  # let the writer record what is queued
            await asyncio.wait_for(queue.join(), timeout=5)
        await _stop(writer)
        await session.close()


def _ids_key(settings: Settings) -> bytes | None:
    """The MAC key of response ids for providers without an API key (docs/reference.md §14): derived from the
    age identity, which every replica holds to decrypt the files and nobody outside does.
    None without one (each replica then makes its own)."""
    secret = settings.age_identity()
    return ids.derive_key(secret) if secret is not None else None


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class _Due:
    """Providers to check now, out of turn: added or updated (docs/reference.md §7)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.wake = asyncio.Event()

    def add(self, ids: list[str]) -> None:
        self.ids.update(ids)
        self.wake.set()

    def take(self) -> set[str]:
        ids, self.ids = self.ids, set()
        self.wake.clear()
        return ids


def _reset_on_update(app: web.Application, due: _Due | None) -> Callable[[Outcome], None]:
    """A provider whose file changed (a rotated key, a new URL) starts again from `unknown`, its
    circuit closed (docs/reference.md §7), and is checked now, as a new one is. Told by the
    registry's thread; the reset runs on the loop."""
    loop = asyncio.get_running_loop()
    health, gauge = app[HEALTH], app[METRICS].provider_healthy
    last = [app[REGISTRY].snapshot]

    def reset(changed: list[str], added: list[str]) -> None:
        for provider_id in changed:
            health.reset(provider_id)
            gauge.labels(provider_id).set(-1)
        if due is not None and (changed or added):
            due.add([*changed, *added])

    def applied(outcome: Outcome) -> None:
        old, new = last[0], outcome.snapshot
        last[0] = new
        changed = [pid for pid, now in new.providers.items() if _changed(old.providers.get(pid), now)]
        # At the first load every provider is new: the periodic checks begin with it anyway.
        added = [pid for pid in new.providers if pid not in old.providers] if old.generation else []
        if changed or added:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the service has stopped
                loop.call_soon_threadsafe(reset, changed, added)

    return applied


def _changed(before: Provider | None, after: Provider) -> bool:
    # A re-encrypted file is a new object with equal values: not a change of the provider.
    return before is not None and before is not after and before != after


def _on_health_change(app: web.Application) -> Callable[[str, Status, Status, str | None], None]:
    gauge = app[METRICS].provider_healthy
    queue = app[HEALTH_EVENTS]
    values = {"healthy": 1, "unhealthy": 0, "unknown": -1}

    def changed(provider_id: str, old: Status, new: Status, reason: str | None) -> None:
        gauge.labels(provider_id).set(values[new])
        if old != "unknown" or new != "healthy":  # learning a provider works is no transition
            changes: Any = {"status": {"old": old, "new": new}}
            queue.put_nowait(ProviderHealthChanged(subject=provider_id, changes=changes, reason=reason))

    return changed


async def _write_events(app: web.Application, queue: asyncio.Queue[BaseEvent]) -> None:
    """Append queued events in order, off the request path (each append is fsynced)."""
    while True:
        draft = await queue.get()
        try:
            await asyncio.to_thread(app[EVENTS].append, draft)
        except EventLogError as exc:  # said once by the log, and by /readyz: no traceback
            log.warning("cannot record %s: %s", draft.type, exc)
        except Exception:
            log.exception("cannot record %s", draft.type)
        finally:
            queue.task_done()


async def _check_periodically(app: web.Application, interval_s: float, due: _Due) -> None:
    """Check every enabled provider's models endpoint, every `interval_s`, and those `due` now."""
    registry, relay = app[REGISTRY], app[RELAY]
    loop = asyncio.get_running_loop()
    whole = True
    next_whole = loop.time()
    while True:
        if registry.ready:
            only = None if whole else due.take()
            if whole:
                due.take()
                next_whole = loop.time() + interval_s
            found = registry.snapshot.providers.values()
            providers = [p for p in found if p.enabled and (only is None or p.id in only)]
            results = await asyncio.gather(
                *(check(p, relay.session) for p in providers), return_exceptions=True
            )
            for provider, result in zip(providers, results, strict=True):
                if isinstance(result, CheckResult):
                    relay.health.checked(provider.id, result)
                elif isinstance(result, Exception):
                    log.warning("health check of %s failed: %s", provider.id, type(result).__name__)
        if not registry.ready:
            await asyncio.sleep(0.05)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(due.wake.wait(), max(0.0, next_whole - loop.time()))
        whole = loop.time() >= next_whole

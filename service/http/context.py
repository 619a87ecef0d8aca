"""What request handlers read: the typed keys of the aiohttp application, and the API's prefix.

Set by `create_app` and the cleanup contexts; handlers only read them. `stop_task` is how a
cleanup context ends the background task it started.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from aiohttp import web

from service.config.upstreams import AllowedUpstreams, Lookup
from service.crypto.sops import Sops
from service.gateway.health import Health
from service.gateway.relay import Relay
from service.journal.events import BaseEvent
from service.journal.log import EventLog
from service.metrics import Metrics
from service.runtime.fanout import Fanout
from service.runtime.registry import Registry
from service.runtime.sync import Puller
from service.runtime.watcher import Reloader
from service.runtime.writer import Writer
from service.settings import Settings
from service.usage.ledger import Ledger
from service.usage.limits.keeper import Keeper
from service.usage.limits.spent import SpentSource
from service.usage.record import RecordSink

if TYPE_CHECKING:  # imported only when tracing is on (service/http/telemetry.py)
    from service.gateway.tracing.exporting import Telemetry

PREFIX = "/api/v1/llm-config"
"""Where the configuration API lives."""

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SOPS = web.AppKey("sops", Sops)
EVENTS = web.AppKey("events", EventLog)
REGISTRY = web.AppKey("registry", Registry)
RELOADER = web.AppKey("reloader", Reloader)
HEALTH = web.AppKey("health", Health)
RELAY = web.AppKey("relay", Relay)
WRITER = web.AppKey("writer", Writer)
PULLER = web.AppKey("puller", Puller)
"""Only with SWITCHBOARD_GIT_PULL (docs/reference.md §12)."""
FANOUT = web.AppKey("fanout", Fanout)
"""Only with SWITCHBOARD_REDIS_URL (docs/reference.md §12)."""
TELEMETRY: web.AppKey[Telemetry] = web.AppKey("telemetry")
"""Only with SWITCHBOARD_OTEL_EXPORTER=otlp (docs/reference.md §14)."""
UPSTREAMS = web.AppKey("upstreams", AllowedUpstreams)
"""SWITCHBOARD_ALLOWED_UPSTREAMS, parsed (docs/reference.md §7)."""
LOOKUP: web.AppKey[Lookup] = web.AppKey("lookup")
"""How upstream host names are resolved (the system's resolver; tests pass their own)."""
RECORDS = web.AppKey("records", RecordSink)
"""Where the gateway hands each answered request's `Record` (docs/reference.md §13): the usage ledger when it
is wired, else nowhere (`create_app` sets a sink that keeps nothing; set it before the app starts)."""
SPENT = web.AppKey("spent", SpentSource)
"""Optional: what budgets had spent before a start (the usage ledger); without it the local
snapshot of spent, and the spool if the source offers it (`SpoolSource`)."""
LIMITS = web.AppKey("limits", Keeper)
"""The limits and budgets (reference §13): `LIMITS.limiter`, kept by the keeper; set by the
gateway's lifecycle."""
LEDGER = web.AppKey("ledger", Ledger)
"""The usage ledger (reference §13), always there: the gateway hands it a `Record` per answered request
(`submit`, a `RecordSink`); with `SWITCHBOARD_USAGE_DB=off` it keeps nothing."""
HEALTH_EVENTS = web.AppKey("health_events", asyncio.Queue[BaseEvent])
"""Health transitions waiting to be appended to the log, off the request path."""
WORKER = web.AppKey("worker", int)
"""Set in a follower of `serve --workers N` (its number, 1 to N-1): it loads the files and relays
the gateway's calls, and leaves the rest to the leader (no recovery of a write, no pull)."""


async def stop_task(task: asyncio.Task[Any], timeout_s: float = 5.0) -> None:
    """Wait up to `timeout_s` for a background task told to stop, then cancel it."""
    try:
        await asyncio.wait_for(task, timeout=timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

"""What request handlers read: the typed keys of the aiohttp application, and the API's prefix.

Set by `create_app` and the cleanup contexts; handlers only read them. `stop_task` is how a
cleanup context ends the background task it started.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

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
HEALTH_EVENTS = web.AppKey("health_events", asyncio.Queue[BaseEvent])
"""Health transitions waiting to be appended to the log, off the request path."""


async def stop_task(task: asyncio.Task[Any], timeout_s: float = 5.0) -> None:
    """Wait up to `timeout_s` for a background task told to stop, then cancel it."""
    try:
        await asyncio.wait_for(task, timeout=timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

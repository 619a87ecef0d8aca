"""A follower of `serve --workers N` (docs/reference.md §3.2): what it does beside relaying.

A follower is the service's app on settings of its own (`serve` makes them: an event log of
its own in its folder inside the leader's, `worker-<K>.d`, which nothing reads; its own spool;
no pull, no health checks; its own name to Redis), started with `WORKER` set. Its gateway
relays the calls the fast path answers; every other connection is piped to the leader
(`service.http.forward`). This module:

- `ready`: the follower listens only once its first configuration is loaded and the budgets'
  spent read back, so the kernel never gives a connection to a follower that cannot answer it;
- tells the leader each `budget.exhausted` its requests cause (`control.sock`), for the one
  log (a health change needs no telling: the follower publishes it on Redis, as a replica
  does, and the leader adopts it and writes the event);
- answers the leader's scrape of its metrics on `worker-<K>.sock`;
- stops when its leader is gone (its parent changes: SIGTERM to itself, a graceful stop).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import signal
import socket
from pathlib import Path

from aiohttp import web

from service.http.context import EVENTS, LIMITS, METRICS, REGISTRY
from service.http.leader import CONTROL_SOCKET, WORKER_PID, worker_socket
from service.journal.events import BaseEvent, BudgetExhausted
from service.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

WATCH_S = 0.5
"""How often a follower checks that its leader is still there."""
TELL_TIMEOUT_S = 5.0


class Follower:
    """Follower `worker` of the leader whose private folder is `folder`."""

    def __init__(self, app: web.Application, folder: Path, worker: int, leader_pid: int) -> None:
        self.app = app
        self.folder = folder
        self.worker = worker
        self.leader_pid = leader_pid
        self._runner: web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        """Return once the first configuration is loaded and the budgets' spent read back."""
        app = self.app
        while True:
            registry, keeper = app.get(REGISTRY), app.get(LIMITS)
            if registry is not None and registry.ready and keeper is not None and keeper.ready.is_set():
                return
            await asyncio.sleep(0.02)

    async def start(self) -> None:
        """Tell the leader of budgets exhausted, answer its scrape, watch for it going."""
        self.app[EVENTS].on_append.append(self._appended)
        metrics = web.Application()
        metrics.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(metrics, access_log=None, handle_signals=False)
        await self._runner.setup()
        path = worker_socket(self.folder, self.worker)
        path.unlink(missing_ok=True)  # a follower before this one, restarted
        await web.UnixSite(self._runner, str(path)).start()
        self._watch = asyncio.create_task(self._watch_leader(), name="switchboard-follow")

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        events = self.app.get(EVENTS)
        if events is not None and self._appended in events.on_append:
            events.on_append.remove(self._appended)

    async def _metrics(self, request: web.Request) -> web.Response:
        headers = {"Content-Type": CONTENT_TYPE, WORKER_PID: str(os.getpid())}
        return web.Response(body=self.app[METRICS].render(), headers=headers)

    async def _watch_leader(self) -> None:
        while os.getppid() == self.leader_pid:  # noqa: ASYNC110 - no event tells of a parent's end
            await asyncio.sleep(WATCH_S)
        log.warning("workers: the leader is gone: worker %d stops", self.worker)
        signal.raise_signal(signal.SIGTERM)

    def _appended(self, event: BaseEvent) -> None:
        """Called in the appending thread with each event of the follower's own log."""
        if not isinstance(event, BudgetExhausted):
            return
        body = json.dumps({"subject": event.subject, "kind": event.kind, "period_end": event.period_end})
        try:
            connection = _UnixConnection(str(self.folder / CONTROL_SOCKET))
            try:
                connection.request("POST", "/events", body, {"Content-Type": "application/json"})
                connection.getresponse().read()
            finally:
                connection.close()
        except OSError as exc:
            log.warning("workers: cannot tell the leader of %s (%s)", event.type, type(exc).__name__)


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (blocking: the log's appending thread calls it)."""

    def __init__(self, path: str) -> None:
        super().__init__("leader", timeout=TELL_TIMEOUT_S)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock

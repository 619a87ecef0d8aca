"""The leader of `serve --workers N` (docs/reference.md §3.2): its private Unix sockets.

The leader is the whole service, as one process is. Beside its TCP site it listens, in a
directory of its own (`tempfile.mkdtemp`: mode 0700, removed at its stop), on

- `leader.sock`: the same aiohttp runner as its TCP site, where followers pipe every
  connection they do not relay themselves (`service.http.forward`);
- `control.sock`: what followers tell it, `POST /events` (a follower's `budget.exhausted`,
  written once per subject and period in the one log, as the leader's own refusals are).

Each follower listens on `worker-<K>.sock` in the same directory, where the leader reads its
`/metrics` to merge them into its own (`service.http.merged_metrics`), and keeps its own
throwaway event log in `worker-<K>.d/`. Nothing of these is reachable over TCP. A leader
killed cannot remove the directory: its followers do as they stop (`remove_private`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
from aiohttp import web

from service.http.changes import CHANGES
from service.http.context import HEALTH_EVENTS, LIMITS
from service.http.merged_metrics import Scrapes
from service.journal.events import BudgetExhausted

log = logging.getLogger(__name__)

LEADER_SOCKET = "leader.sock"
CONTROL_SOCKET = "control.sock"
METRICS_WAIT_S = 2.0
"""A follower that does not give its metrics this fast is left out of the scrape (logged)."""


WORKER_PID = "X-Switchboard-Worker-Pid"
"""The header of a follower's answer to the scrape: its process (another one: counts from 0)."""
_DRAIN_S = 0.05
"""How often, while its followers stop, the leader closes the connections they pipe (new ones too)."""
_SCRAPE = aiohttp.ClientTimeout(total=METRICS_WAIT_S)


def worker_socket(folder: Path, worker: int) -> Path:
    """Where follower `worker` answers the leader's scrape."""
    return folder / f"worker-{worker}.sock"


_WORKER_FILES = ("events.jsonl", "events.jsonl.broken")
"""What a follower keeps in its folder: the event log of its own, which nothing reads."""


def worker_folder(folder: Path, worker: int) -> Path:
    """Follower `worker`'s own folder, inside its leader's (made empty: a follower before it
    that was killed left its log there)."""
    path = folder / f"worker-{worker}.d"
    path.mkdir(mode=0o700, exist_ok=True)
    for name in _WORKER_FILES:
        (path / name).unlink(missing_ok=True)
    return path


def remove_worker_folder(path: Path) -> None:
    """Remove a follower's folder, holding what `worker_folder` says and nothing else."""
    for name in _WORKER_FILES:
        with contextlib.suppress(OSError):
            (path / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()


def remove_private(folder: Path) -> None:
    """Remove a leader's private folder when its leader cannot (it was killed): its sockets and
    its followers' folders, and the folder only if nothing else is in it (a folder named by
    hand to `--follow` keeps whatever else it holds)."""
    for name in (LEADER_SOCKET, CONTROL_SOCKET):
        with contextlib.suppress(OSError):
            (folder / name).unlink(missing_ok=True)
    for path in folder.glob("worker-*"):
        if path.name.endswith(".sock") and path.is_socket():
            with contextlib.suppress(OSError):
                path.unlink()
        elif path.name.endswith(".d") and path.is_dir():
            remove_worker_folder(path)
    with contextlib.suppress(OSError):
        folder.rmdir()


class Leader:
    """The leader's private sockets: `start` them with its runner, `aclose` at its stop."""

    def __init__(self, app: web.Application, followers: int) -> None:
        self.app = app
        self.followers = followers
        self.folder: Path | None = None
        """Made by `start`, mode 0700 (mkdtemp's): only this user reaches the sockets."""
        self._control: web.AppRunner | None = None
        self._scrapes = Scrapes()

    @property
    def private(self) -> Path:
        """The private folder (once started)."""
        if self.folder is None:
            raise RuntimeError("the leader's sockets are not started")
        return self.folder

    async def start(self, runner: web.AppRunner) -> None:
        """Listen on `leader.sock` (with `runner`) and `control.sock`."""
        self.folder = Path(tempfile.mkdtemp(prefix="switchboard-workers-"))
        await web.UnixSite(runner, str(self.folder / LEADER_SOCKET)).start()
        control = web.Application()
        control.router.add_post("/events", self._event)
        self._control = web.AppRunner(control, access_log=None, handle_signals=False)
        await self._control.setup()
        await web.UnixSite(self._control, str(self.folder / CONTROL_SOCKET)).start()

    async def drain(self, runner: web.AppRunner, followers_stopped: Awaitable[None]) -> None:
        """The leader's stop, while its followers stop (`followers_stopped`): held queries and
        streams end (as at one process's stop), and each connection a follower pipes here is
        closed once the request in it is answered, so that the follower, which waits for its
        pipes to close, stops with every answer given."""
        changes = self.app.get(CHANGES)
        if changes is not None:
            changes.close()
        path = str(self.private / LEADER_SOCKET)
        stopped = asyncio.ensure_future(followers_stopped)
        while not stopped.done():
            connections = getattr(runner.server, "_connections", {})  # aiohttp's (fast_site checks it)
            for handler, transport in list(connections.items()):
                if transport.get_extra_info("sockname") == path:
                    handler.close()  # once the request it answers, if any, is answered
            await asyncio.wait([stopped], timeout=_DRAIN_S)
        await stopped

    async def aclose(self) -> None:
        if self._control is not None:
            await self._control.cleanup()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    async def _event(self, request: web.Request) -> web.Response:
        """A follower's `budget.exhausted`: queued for the log unless already written."""
        try:
            doc = json.loads(await request.read())
            event = BudgetExhausted(subject=doc["subject"], kind=doc["kind"], period_end=doc["period_end"])
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400)
        keeper = self.app.get(LIMITS)
        if keeper is not None and keeper.limiter.reported(event.kind, event.subject, event.period_end):
            self.app[HEALTH_EVENTS].put_nowait(event)
        return web.Response(status=204)

    async def metrics(self, own: bytes) -> bytes:
        """`own` merged with every follower's that answers within `METRICS_WAIT_S`."""
        workers = range(1, self.followers + 1)
        answers = await asyncio.gather(*(self._scrape(k) for k in workers))
        return self._scrapes.merged(own, dict(zip(workers, answers, strict=True)))

    async def _scrape(self, worker: int) -> tuple[int, bytes] | None:
        """Follower `worker`'s process id and exposition."""
        path = worker_socket(self.private, worker)
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session,
                session.get("http://worker/metrics", timeout=_SCRAPE) as answer,
            ):
                if answer.status != 200:
                    raise aiohttp.ClientResponseError(answer.request_info, (), status=answer.status)
                return int(answer.headers[WORKER_PID]), await answer.read()
        except (aiohttp.ClientError, TimeoutError, OSError, KeyError, ValueError) as exc:
            with contextlib.suppress(Exception):
                log.warning("workers: the metrics of worker %d are left out (%s)", worker, type(exc).__name__)
            return None


LEADER = web.AppKey("leader", Leader)
"""Set in the leader of `serve --workers N`: its `/metrics` are every worker's."""

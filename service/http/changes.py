"""The hub of change push (docs/reference.md §9): the index, the queries held on it, the streams' backlogs.

`Changes` is the one place that knows the index and who waits for it. Events reach it from
the threads that append them; an event of a configuration change becomes visible (moves
the index, goes out on the streams) only once the registry has applied it, so a woken
reader never pairs the new index with the old configuration. The HTTP side (conditional
and blocking GETs, the event stream) is `service.http.push`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from service.config.models import Client
from service.errors import Busy
from service.journal.events import BaseEvent
from service.journal.log import NOT_CONFIG_CHANGES, EventLog
from service.runtime.registry import Outcome, Registry

STREAM_BACKLOG = 1024
"""Events a stream may fall behind by before it is closed (its client resumes from the log).
One apply offers all its events at once (a pull request adding hundreds of providers), before
any stream can send one: this is above what a change makes, not what a reader keeps up with."""
STREAM_BACKLOG_BYTES = 16 << 20
"""The same bound in bytes (frames are shared by the streams: this is what one pins at most)."""
RETRY_AFTER_S = 5

APPLIED_TYPES = frozenset(
    {
        "provider.added",
        "provider.updated",
        "provider.removed",
        "routing.updated",
        "clients.updated",
        "config.rejected",
    }
)
"""Events the registry appends while it applies: visible once its state is swapped in."""
ADMIN_ONLY = frozenset({"secret.read", "clients.updated"})
"""Events that go only to streams whose token also holds `admin`."""


CHANGES: web.AppKey[Changes] = web.AppKey("changes")
"""The app's `Changes`, made with the registry (it listens to the log and the registry)."""


def frame(event: BaseEvent) -> bytes:
    """One server-sent event: `id:` its seq, `event:` its type, `data:` its JSON."""
    data = json.dumps(event.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.type}\ndata: {data}\n\n".encode()


class Stream:
    """One event-stream client's backlog: bounded, so a slow reader cannot hold memory."""

    __slots__ = ("admin", "backlog", "client", "closed", "overflowed", "pinned", "ready", "transport")

    def __init__(self, client: Client | None) -> None:
        self.client = client
        """Who opened it (None without authentication): checked again when the clients change."""
        self.admin = client is None or "admin" in client.scopes
        self.backlog: deque[tuple[int, bytes]] = deque()
        self.pinned = 0
        """Bytes of the frames in `backlog`."""
        self.ready = asyncio.Event()
        self.overflowed = False
        self.closed = False
        self.transport: asyncio.BaseTransport | None = None

    def offer(self, seq: int, kind: str, data: bytes) -> None:
        if self.overflowed or (kind in ADMIN_ONLY and not self.admin):
            return
        if len(self.backlog) >= STREAM_BACKLOG or self.pinned + len(data) > STREAM_BACKLOG_BYTES:
            self.overflowed = True  # it resumes from the log when it reconnects
            self.backlog.clear()
            self.pinned = 0
        else:
            self.backlog.append((seq, data))
            self.pinned += len(data)
        self.ready.set()

    def take(self) -> tuple[int, bytes]:
        """The oldest frame of the backlog, and its seq."""
        seq, data = self.backlog.popleft()
        self.pinned -= len(data)
        return seq, data


class Changes:
    """The index, the blocking queries held on it, and the event streams (one per app)."""

    def __init__(
        self,
        events: EventLog,
        registry: Registry,
        replica: str,
        max_watchers: int,
        max_watchers_per_client: int | None = None,
    ) -> None:
        self.replica = replica
        self.max_watchers = max_watchers
        self.max_watchers_per_client = max_watchers_per_client
        """At most this many held by one authenticated client (None: no such bound)."""
        self.index = events.config_index
        self.seq = events.last_seq
        """The last event that streams have been given (or that was in the log at the start)."""
        self.closing = False
        self.held = 0
        self.held_by: dict[str, int] = {}
        """Held queries and streams per authenticated client, by its name (none without one)."""
        self._moved = asyncio.Event()
        self.touched = asyncio.Event()
        """Set (and replaced) whenever an answer may have changed: the index moved, the registry
        applied (a new commit may change no file), a provider's shown health changed. Queries held
        on a tag (docs/reference.md §9) wait on it and look again."""
        self._streams: set[Stream] = set()
        self._pending: list[BaseEvent] = []
        self._loop = asyncio.get_running_loop()
        self._registry = registry
        self._clients = registry.state.snapshot.clients
        """The clients the streams' tokens were last checked against."""
        self.replays = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="switchboard-replay")
        """Where streams read the log back: their own thread, so that replays from the start of
        a long log, for many streams at once, never queue before a reload in the default one."""
        events.on_append.append(self._appended)
        registry.on_apply.append(self._applied)

    # -- from the appending threads --------------------------------------------------------------

    def _appended(self, event: BaseEvent) -> None:
        self._call(self._arrive, event)

    def _applied(self, outcome: Outcome) -> None:
        self._call(self._release)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service has stopped
            self._loop.call_soon_threadsafe(callback, *args)

    # -- on the loop -------------------------------------------------------------------------------

    def _arrive(self, event: BaseEvent) -> None:
        if event.type in APPLIED_TYPES or self._pending:
            # Visible once the registry has swapped its state in; an event appended meanwhile
            # (a health change) waits behind it, so events are shown in seq order: shown
            # first, it would move the index while the old state is still served, and the
            # streams, which skip what is below the last seq they sent, would drop the change.
            self._pending.append(event)
        else:
            self._show([event])

    def _release(self) -> None:
        pending, self._pending = self._pending, []
        self._show(sorted(pending, key=_seq))
        clients = self._registry.state.snapshot.clients
        if clients is not self._clients:
            # Looked at on every change of the clients file, not on `clients.updated` alone: a
            # token gone ends its streams whatever the change recorded (a clients file fixed
            # back, a refused one whose last good clients stay).
            self._clients = clients
            self._recheck_clients()
        self.touch()

    def touch(self) -> None:
        """Wake the queries held on a tag: an answer may have changed (on the loop)."""
        self.touched.set()
        self.touched = asyncio.Event()

    def _show(self, events: list[BaseEvent]) -> None:
        moved = False
        for event in events:
            self.seq = max(self.seq, event.seq)
            if event.type not in NOT_CONFIG_CHANGES and event.seq > self.index:
                self.index, moved = event.seq, True
            if self._streams:
                data = frame(event)
                for stream in self._streams:
                    stream.offer(event.seq, event.type, data)
        if moved:
            self._moved.set()
            self._moved = asyncio.Event()
            self.touch()

    def _recheck_clients(self) -> None:
        """End the streams whose token was revoked or lost the scope it was opened with: a
        stream lives as long as its connection, and must not outlive its client's rights."""
        clients = self._registry.state.snapshot.clients
        if clients is None:  # no authentication (a clients file, once seen, is kept)
            return
        now = {c.token_sha256: c for c in clients.clients}
        for stream in self._streams:
            was = stream.client
            if was is None:
                continue
            current = now.get(was.token_sha256)
            if (
                current is None
                or "config:read" not in current.scopes
                or (stream.admin and "admin" not in current.scopes)
            ):
                stream.closed = True
                stream.ready.set()

    # -- blocking queries --------------------------------------------------------------------------

    async def hold(self, touched: asyncio.Event, timeout_s: float) -> None:
        """Return once `touched` (the `touched` taken before the answer was made) is set, or after
        `timeout_s`, or at shutdown. Counted by its caller (`watching`), for all its turns: a
        query woken to look again keeps its slot while its answer is made again."""
        if self.closing or timeout_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(touched.wait(), timeout_s)

    async def wait_past(self, index: int, timeout_s: float, client: Client | None) -> None:
        """Return when the index moves past `index`, or after `timeout_s`, or at shutdown.

        An `index` ahead of ours (another replica's, or a log replaced) returns at once: the
        client starts over from the index it gets (docs/reference.md §9). `client` is who
        asks (None without authentication), for its own bound.
        """
        if self.index != index or self.closing or timeout_s <= 0:
            return
        with self.watching(client):
            moved = self._moved
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), timeout_s)

    @contextlib.contextmanager
    def watching(self, client: Client | None) -> Iterator[None]:
        """Count one held query or stream of `client`: refused (503) past either bound, the
        per-client one first, so one client cannot take every slot (docs/reference.md §9)."""
        name = client.name if client is not None else None
        mine = self.held_by.get(name, 0) if name is not None else 0
        bound = self.max_watchers_per_client
        if name is not None and bound is not None and mine >= bound:
            raise Busy(
                f"this client holds {mine} requests already (SWITCHBOARD_MAX_WATCHERS_PER_CLIENT); "
                "retry when one ends",
                retry_after_s=RETRY_AFTER_S,
            )
        if self.held >= self.max_watchers:
            raise Busy(
                f"{self.held} requests are held already (SWITCHBOARD_MAX_WATCHERS); retry shortly",
                retry_after_s=RETRY_AFTER_S,
            )
        self.held += 1
        if name is not None:
            self.held_by[name] = mine + 1
        try:
            yield
        finally:
            self.held -= 1
            if name is not None:
                left = self.held_by[name] - 1
                if left:
                    self.held_by[name] = left
                else:
                    del self.held_by[name]

    # -- streams -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stream(self, client: Client | None) -> Iterator[Stream]:
        """A new stream's backlog, counted among the watchers while it is open."""
        with self.watching(client):
            stream = Stream(client)
            self._streams.add(stream)
            try:
                yield stream
            finally:
                self._streams.discard(stream)

    def close(self) -> None:
        """Shutdown: every held query answers now, every stream ends."""
        self.closing = True
        self._moved.set()
        self.touched.set()
        for stream in self._streams:
            stream.closed = True
            stream.ready.set()
            transport = stream.transport
            if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
                # A client that takes nothing would hold the shutdown until the write timeout.
                transport.abort()


def _seq(event: BaseEvent) -> int:
    return event.seq


def setup(app: web.Application) -> None:
    """Close held queries and streams when the app shuts down (before connections close)."""

    async def close(app: web.Application) -> None:
        changes = app.get(CHANGES)
        if changes is not None:
            changes.close()

    async def cleanup(app: web.Application) -> None:
        changes = app.get(CHANGES)
        if changes is not None:
            changes.replays.shutdown(wait=False, cancel_futures=True)

    app.on_shutdown.append(close)
    app.on_cleanup.append(cleanup)

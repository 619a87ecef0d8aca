"""Change push (SPEC 9): conditional GETs, blocking queries, and the event stream.

The old design cached configuration for five minutes; here a consumer learns of a change
the moment the service applies it:

- every `GET` under `/api/v1/llm-config/` (but the event stream and the `secrets:read`
  endpoint) carries an `ETag` (`If-None-Match` answers 304), `X-Switchboard-Index` and
  `X-Switchboard-Replica`;
- `?index=N&wait=30s` holds such a GET until the index moves past N (Consul's blocking
  queries), woken by the service, never by polling;
- `GET …/events` streams the event log as server-sent events, resumable from the log.

`Changes` is the one place that knows the index and who waits for it. Events reach it from
the threads that append them; an event of a configuration change becomes visible (moves
the index, goes out on the streams) only once the registry has applied it, so a woken
reader never pairs the new index with the old configuration.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

from service.config.models import Client
from service.errors import BadRequest, Busy
from service.http.auth import CLIENT, Handler, authenticate_again
from service.http.context import EVENTS
from service.journal.events import BaseEvent
from service.journal.log import NOT_CONFIG_CHANGES, EventLog
from service.runtime.registry import Outcome, Registry

log = logging.getLogger(__name__)

INDEX_HEADER = "X-Switchboard-Index"
REPLICA_HEADER = "X-Switchboard-Replica"
DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 300.0
KEEPALIVE_S = 15.0
STREAM_BACKLOG = 1024
"""Events a stream may fall behind by before it is closed (its client resumes from the log).
One apply offers all its events at once (a pull request adding hundreds of providers), before
any stream can send one: this is above what a change makes, not what a reader keeps up with."""
STREAM_BACKLOG_BYTES = 16 << 20
"""The same bound in bytes (frames are shared by the streams: this is what one pins at most)."""
WRITE_TIMEOUT_S = 30.0
"""A stream whose client takes no bytes for this long is closed."""
WRITE_PIECE = 64 << 10
"""Writes to a stream are at most this long (aiohttp waits for the client past 64 KiB)."""
RETRY_AFTER_S = 5
REPLAY_BATCH = 500
"""Events read back from the log at a time for a resuming stream."""

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

_WAIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


CHANGES: web.AppKey[Changes] = web.AppKey("changes")
"""The app's `Changes`, made with the registry (it listens to the log and the registry)."""


def parse_wait(text: str | None) -> float:
    """`500ms`, `30s`, `5m` or plain seconds; the default when absent; at most 5 minutes."""
    if text is None or text == "":
        return DEFAULT_WAIT_S
    match = _WAIT.match(text)
    if match is None:
        raise BadRequest(f"`wait` is not a duration: {text[:40]!r} (use 500ms, 30s, 5m or seconds)")
    value = float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match[2]]
    return min(value, MAX_WAIT_S)


def parse_index(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    # isascii: `²` is a digit to str.isdigit, but int() refuses it (it made a 500)
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest(f"`index` must be a whole number: {text[:40]!r}")
    return int(text)


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

    def __init__(self, events: EventLog, registry: Registry, replica: str, max_watchers: int) -> None:
        self.replica = replica
        self.max_watchers = max_watchers
        self.index = events.config_index
        self.seq = events.last_seq
        """The last event that streams have been given (or that was in the log at the start)."""
        self.closing = False
        self.held = 0
        self._moved = asyncio.Event()
        self._streams: set[Stream] = set()
        self._pending: list[BaseEvent] = []
        self._loop = asyncio.get_running_loop()
        self._registry = registry
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
            if event.type == "clients.updated":
                self._recheck_clients()
        if moved:
            self._moved.set()
            self._moved = asyncio.Event()

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

    async def wait_past(self, index: int, timeout_s: float) -> None:
        """Return when the index moves past `index`, or after `timeout_s`, or at shutdown.

        An `index` ahead of ours (another replica's, or a log replaced) returns at once: the
        client starts over from the index it gets (SPEC 9).
        """
        if self.index != index or self.closing or timeout_s <= 0:
            return
        with self._watching():
            moved = self._moved
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), timeout_s)

    @contextlib.contextmanager
    def _watching(self) -> Iterator[None]:
        if self.held >= self.max_watchers:
            raise Busy(
                f"{self.held} requests are held already (SWITCHBOARD_MAX_WATCHERS); retry shortly",
                retry_after_s=RETRY_AFTER_S,
            )
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    # -- streams -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stream(self, client: Client | None) -> Iterator[Stream]:
        """A new stream's backlog, counted among the watchers while it is open."""
        with self._watching():
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
        for stream in self._streams:
            stream.closed = True
            stream.ready.set()
            transport = stream.transport
            if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
                # A client that takes nothing would hold the shutdown until the write timeout.
                transport.abort()


def _seq(event: BaseEvent) -> int:
    return event.seq


# -- conditional and blocking GETs ------------------------------------------------------------------


def watched(handler: Handler) -> Handler:
    """A GET that carries ETag, X-Switchboard-Index and -Replica, answers 304 to a matching
    `If-None-Match`, and holds while `?index=N` is current (up to `?wait=`). Put it inside
    `scoped(...)`, so nothing is held before the client is known."""

    async def held(request: web.Request) -> web.StreamResponse:
        changes = request.app[CHANGES]
        index = parse_index(request.query.get("index"))
        if index is not None:
            await changes.wait_past(index, parse_wait(request.query.get("wait")))
            authenticate_again(request)  # the clients may have changed while it waited
        response = await handler(request)
        return conditional(request, response, changes)

    held.__name__ = getattr(handler, "__name__", "held")
    held.__doc__ = handler.__doc__
    return held


def conditional(request: web.Request, response: web.StreamResponse, changes: Changes) -> web.StreamResponse:
    """`response` with the push headers, or 304 when the client's copy is current."""
    headers = {INDEX_HEADER: str(changes.index), REPLICA_HEADER: changes.replica}
    if not isinstance(response, web.Response) or response.status != 200:
        response.headers.update(headers)
        return response
    tag = response.headers.get("ETag")
    if tag is None:
        tag = headers["ETag"] = body_tag(response.body if isinstance(response.body, bytes) else b"")
    if _matches(request.headers.get("If-None-Match"), tag):
        return web.Response(status=304, headers={**headers, "ETag": tag})
    response.headers.update(headers)
    return response


def body_tag(body: bytes) -> str:
    """A strong ETag for an answer: it changes exactly when the bytes do."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def _matches(header: str | None, tag: str) -> bool:
    if not header:
        return False
    wanted = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in wanted or tag in wanted


# -- the event stream ------------------------------------------------------------------------------


async def event_stream(request: web.Request) -> web.StreamResponse:
    """`GET …/events` (inside `scoped("config:read")`): the log as server-sent events.

    `Last-Event-ID` (or `?after=SEQ`; the header wins) first replays what the client missed
    from the log, in order, then follows live, with no gap and no duplicate; without either
    it starts from now. `secret.read` and `clients.updated` go to `admin` tokens only.
    """
    changes, log_ = request.app[CHANGES], request.app[EVENTS]
    after = parse_index(request.headers.get("Last-Event-ID") or request.query.get("after"))
    client = request.get(CLIENT)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            REPLICA_HEADER: changes.replica,
        }
    )
    with changes.stream(client) as stream:
        last = changes.seq
        try:
            await response.prepare(request)
            stream.transport = request.transport
            send = _sender(response)
            if after is not None and after <= log_.last_seq:
                last = await _replay(changes, log_, stream, after, send)
            # An id ahead of this log (another replica's, or a log replaced) starts from now.
            await send(b": connected\n\n")
            while not stream.closed:
                try:
                    await asyncio.wait_for(stream.ready.wait(), KEEPALIVE_S)
                except TimeoutError:
                    await send(b": keep-alive\n\n")
                    continue
                stream.ready.clear()
                if stream.overflowed:
                    log.info("an event stream fell too far behind and was closed (it resumes from the log)")
                    break
                while stream.backlog and not stream.closed:  # closed: its client may no longer read
                    seq, data = stream.take()
                    if seq > last:
                        await send(data)
                        last = seq
            await response.write_eof()
        except ConnectionResetError:  # the client left, or took nothing for WRITE_TIMEOUT_S
            log.debug("an event stream's client is gone")
    return response


def _sender(response: web.StreamResponse) -> Callable[[bytes], Awaitable[None]]:
    async def send(data: bytes) -> None:
        try:
            if len(data) <= WRITE_PIECE:
                await asyncio.wait_for(response.write(data), WRITE_TIMEOUT_S)
                return
            # A large event in pieces, each written once the client took the last: written
            # whole, each stream whose client reads nothing would hold its own copy of it.
            view = memoryview(data)
            for start in range(0, len(data), WRITE_PIECE):
                await asyncio.wait_for(response.write(view[start : start + WRITE_PIECE]), WRITE_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionResetError("the event stream's client took nothing for too long") from None

    return send


async def _replay(
    changes: Changes, events: EventLog, stream: Stream, after: int, send: Callable[[bytes], Awaitable[None]]
) -> int:
    """Send the logged events after `after` (read and framed off the loop, in batches, in the
    replay thread); the last seq sent. Stops at shutdown."""
    loop = asyncio.get_running_loop()
    last = after
    while not stream.closed:
        batch = await loop.run_in_executor(changes.replays, _frames, events, last, stream.admin)
        for seq, data in batch:
            if data:
                await send(data)
            last = seq
        if len(batch) < REPLAY_BATCH:
            break
    return last


def _frames(events: EventLog, after: int, admin: bool) -> list[tuple[int, bytes]]:
    """(seq, frame) of the next logged events after `after`; the frame empty for one not shown."""
    return [
        (event.seq, frame(event) if admin or event.type not in ADMIN_ONLY else b"")
        for event in events.events_after(after, limit=REPLAY_BATCH)
    ]


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

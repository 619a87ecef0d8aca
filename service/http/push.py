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
import contextlib
import hashlib
import json
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

from service.config.models import Client, Clients
from service.errors import BadRequest, Busy
from service.http.auth import CLIENT, Handler
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
STREAM_BACKLOG = 256
"""Events a stream may fall behind by before it is closed (its client resumes from the log)."""
WRITE_TIMEOUT_S = 30.0
"""A stream whose client takes no bytes for this long is closed."""
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
    if not text.isdigit() or len(text) > 18:
        raise BadRequest(f"`index` must be a whole number: {text[:40]!r}")
    return int(text)


def frame(event: BaseEvent) -> bytes:
    """One server-sent event: `id:` its seq, `event:` its type, `data:` its JSON."""
    data = json.dumps(event.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.type}\ndata: {data}\n\n".encode()


class Stream:
    """One event-stream client's backlog: bounded, so a slow reader cannot hold memory."""

    __slots__ = ("admin", "backlog", "closed", "overflowed", "ready", "token_sha256")

    def __init__(self, client: Client | None) -> None:
        self.token_sha256 = client.token_sha256 if client is not None else None
        """Whose stream it is (None without authentication): checked again when the clients change."""
        self.admin = client is None or "admin" in client.scopes
        self.backlog: deque[tuple[int, bytes]] = deque()
        self.ready = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, seq: int, kind: str, data: bytes) -> None:
        if self.closed or self.overflowed or (kind in ADMIN_ONLY and not self.admin):
            return
        if len(self.backlog) >= STREAM_BACKLOG:
            self.overflowed = True  # it resumes from the log when it reconnects
            self.backlog.clear()
        else:
            self.backlog.append((seq, data))
        self.ready.set()

    def authorize(self, clients: Clients) -> None:
        """The clients file changed: a token removed, or that lost `config:read`, hears no more
        (the stream ends, unsent events dropped, and reconnecting gets its 401 or 403); one
        that gained or lost `admin` gets the events that scope allows from now on."""
        if self.token_sha256 is None:
            return
        scopes = next((c.scopes for c in clients.clients if c.token_sha256 == self.token_sha256), None)
        if scopes is None or "config:read" not in scopes:
            self.closed = True
            self.backlog.clear()
            self.ready.set()
        else:
            self.admin = "admin" in scopes


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
        self._registry = registry
        self._clients = registry.state.snapshot.clients
        self._loop = asyncio.get_running_loop()
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
        if event.type in APPLIED_TYPES:
            self._pending.append(event)  # visible once the registry has swapped its state in
        else:
            self._show([event])

    def _release(self) -> None:
        # Who may hear first, then what happened: a revoked client is not told of its revocation.
        clients = self._registry.state.snapshot.clients
        if clients is not self._clients:
            self._clients = clients
            if clients is not None:
                for stream in self._streams:
                    stream.authorize(clients)
        pending, self._pending = self._pending, []
        self._show(pending)

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
        """A new stream's backlog for `client`, counted among the watchers while it is open."""
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
    changes = request.app[CHANGES]
    after = parse_index(request.headers.get("Last-Event-ID") or request.query.get("after"))
    with changes.stream(request.get(CLIENT)) as stream:
        last = changes.seq
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                REPLICA_HEADER: changes.replica,
            }
        )
        await response.prepare(request)
        try:
            await _follow(request, response, stream, after, last)
        except ConnectionResetError:  # the client left (a tab closed mid-replay): nothing to say
            log.debug("an event stream's client went away")
            return response
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
    return response


async def _follow(
    request: web.Request,
    response: web.StreamResponse,
    stream: Stream,
    after: int | None,
    last: int,
) -> None:
    """What one stream sends: the missed events from the log, then each event as it comes."""
    log_ = request.app[EVENTS]
    send = _sender(response)
    if after is not None and after <= log_.last_seq:
        last = await _replay(log_, after, stream, send)
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
            log.info("an event stream fell %d events behind and was closed", STREAM_BACKLOG)
            return
        while stream.backlog:
            seq, data = stream.backlog.popleft()
            if seq > last:
                await send(data)
                last = seq


def _sender(response: web.StreamResponse) -> Callable[[bytes], Awaitable[None]]:
    async def send(data: bytes) -> None:
        try:
            await asyncio.wait_for(response.write(data), WRITE_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionResetError("the event stream's client took nothing for too long") from None

    return send


async def _replay(
    events: EventLog, after: int, stream: Stream, send: Callable[[bytes], Awaitable[None]]
) -> int:
    """Send the logged events after `after` (read off the loop, in batches); the last seq sent."""
    last = after
    while True:
        batch = await asyncio.to_thread(_batch, events, last)
        for event in batch:
            if stream.closed:  # revoked (or shut down) mid-replay
                return last
            if event.type not in ADMIN_ONLY or stream.admin:
                await send(frame(event))
            last = event.seq
        if len(batch) < 500:
            return last


def _batch(events: EventLog, after: int) -> list[BaseEvent]:
    return list(events.events_after(after, limit=500))


def setup(app: web.Application) -> None:
    """Close held queries and streams when the app shuts down (before connections close)."""

    async def close(app: web.Application) -> None:
        changes = app.get(CHANGES)
        if changes is not None:
            changes.close()

    app.on_shutdown.append(close)

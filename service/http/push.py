"""Change push (docs/reference.md §9) over HTTP: conditional GETs, blocking queries, and the event stream.

The old design cached configuration for five minutes; here a consumer learns of a change
the moment the service applies it:

- every `GET` under `/api/v1/llm-config/` (but the event stream and the `secrets:read`
  endpoint) carries an `ETag` (`If-None-Match` answers 304), `X-Switchboard-Index` and
  `X-Switchboard-Replica`;
- `?index=N&wait=30s` holds such a GET until the index moves past N (Consul's blocking
  queries), woken by the service, never by polling;
- `GET …/events` streams the event log as server-sent events, resumable from the log.

The index, the held queries and the streams' backlogs are `service.http.changes.Changes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from service.errors import BadRequest, EventLogError, NotFound
from service.http import tags
from service.http.auth import CLIENT, Handler, authenticate_again
from service.http.changes import ADMIN_ONLY, CHANGES, Changes, Stream, frame
from service.http.context import EVENTS
from service.http.tags import TAGS, Verdict
from service.journal.log import EventLog

log = logging.getLogger(__name__)

INDEX_HEADER = "X-Switchboard-Index"
REPLICA_HEADER = "X-Switchboard-Replica"
DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 300.0
KEEPALIVE_S = 15.0
WRITE_TIMEOUT_S = 30.0
"""A stream whose client takes no bytes for this long is closed."""
WRITE_PIECE = 64 << 10
"""Writes to a stream are at most this long (aiohttp waits for the client past 64 KiB)."""
REPLAY_BATCH = 500
"""Events read back from the log at a time for a resuming stream."""

_WAIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m)?\s*$")


def parse_wait(text: str | None) -> float:
    """`500ms`, `30s`, `5m` or plain seconds; the default when absent; at most 5 minutes."""
    if text is None or text == "":
        return DEFAULT_WAIT_S
    match = _WAIT.match(text)
    if match is None:
        raise BadRequest(f"`wait` is not a duration: {text[:40]!r} (use 500ms, 30s, 5m or seconds)")
    value = float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match[2]]
    return min(value, MAX_WAIT_S)


def parse_index(text: str | None, name: str = "index") -> int | None:
    """A seq given as `name` (`index`, `after`, `Last-Event-ID`); None when absent."""
    if text is None or text == "":
        return None
    # isascii: `²` is a digit to str.isdigit, but int() refuses it (it made a 500)
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest(f"`{name}` must be a whole number: {text[:40]!r}")
    return int(text)


# -- conditional and blocking GETs ------------------------------------------------------------------


def watched(handler: Handler) -> Handler:
    """A GET that carries ETag, X-Switchboard-Index and -Replica, answers 304 to a matching
    `If-None-Match`, and holds while `?index=N` is current, or while the answer is what the
    client's tag says (`If-None-Match` with `?wait=`), up to `wait`. Put it inside
    `scoped(...)`, so nothing is held before the client is known."""

    async def held(request: web.Request) -> web.StreamResponse:
        changes = request.app[CHANGES]
        index = parse_index(request.query.get("index"))
        wait = request.query.get("wait")
        wait_s = parse_wait(wait)  # read even when nothing holds: a bad one is 400
        theirs = tags.listed(request.headers.get("If-None-Match"))
        if index is not None:
            await changes.wait_past(index, wait_s, request.get(CLIENT))
            authenticate_again(request)  # the clients may have changed while it waited
            if theirs:
                # Answered now, as the index says, but judged as a tag is: a tag of a commit not
                # applied here is 304, never older content (docs/reference.md §9), shutdown too.
                return await _held_on_tag(request, handler, theirs, 0.0)
            # at shutdown the content, even to a client whose tag matches it (docs/reference.md §9)
            return conditional(request, await handler(request), changes, compare=not changes.closing)
        if not theirs:
            return conditional(request, await handler(request), changes)
        return await _held_on_tag(request, handler, theirs, wait_s if wait else 0.0)

    held.__name__ = getattr(handler, "__name__", "held")
    held.__doc__ = handler.__doc__
    return held


async def _held_on_tag(
    request: web.Request, handler: Handler, theirs: list[str], wait_s: float
) -> web.StreamResponse:
    """Answer once the answer differs from the client's tags (docs/reference.md §9), on whichever
    replica this is: never with content older than the tag's commit (304 when `wait` runs out
    first), never at once for health this replica never gave (its content when `wait` runs out).
    Shutdown answers at once with the current content, to a client whose tag matches it too: only
    a tag whose commit this replica has not applied is 304 then."""
    app = request.app
    changes, known = app[CHANGES], app[TAGS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    taken = False
    with contextlib.ExitStack() as slot:  # one slot from the first hold to the answer
        while True:
            touched = changes.touched  # taken before the answer is made: a change meanwhile wakes it
            try:
                response = await handler(request)
            except NotFound:
                # the id is not here yet (added, or added back, by a commit not applied here):
                # a 404 would take from the consumer what another replica showed it
                if not await known.ahead(theirs):
                    raise
                ours, verdict = "", Verdict.AHEAD
            else:
                if not isinstance(response, web.Response) or response.status != 200:
                    return conditional(request, response, changes)
                ours = _tag_of(response)
                verdict = await known.judge(theirs, ours)
            left = deadline - loop.time()
            if verdict is Verdict.DIFFERS or ((left <= 0 or changes.closing) and verdict is Verdict.UNSEEN):
                known.gave(ours)
                return conditional(request, response, changes)
            if changes.closing and verdict is Verdict.MATCH:
                # A wait that runs out finds the client's copy current (304); shutdown answers with
                # the content instead: the client is not left without an answer to look at.
                return conditional(request, response, changes, compare=False)
            if left <= 0 or changes.closing:
                headers = {INDEX_HEADER: str(changes.index), REPLICA_HEADER: changes.replica}
                if verdict is Verdict.MATCH:
                    known.gave(ours)
                    return web.Response(status=304, headers={**headers, "ETag": ours})
                # AHEAD: the client's copy is newer than anything here; it keeps it (and its tag).
                return web.Response(status=304, headers={**headers, "ETag": _newest(theirs)})
            if not taken:
                # Counted (503 busy past a bound) once, and kept while the answer is made again
                # after a wake-up: given back meanwhile, the client's next query could take it,
                # and this one, held already, be refused when it held again.
                slot.enter_context(changes.watching(request.get(CLIENT)))
                taken = True
            await changes.hold(touched, left)
            authenticate_again(request)  # the clients may have changed while it waited


def _tag_of(response: web.Response) -> str:
    tag = response.headers.get("ETag")
    if tag is None:
        tag = response.headers["ETag"] = body_tag(response.body if isinstance(response.body, bytes) else b"")
    return tag


def _newest(theirs: list[str]) -> str:
    """The client's own tag, to send back with a 304 that keeps its copy: the first of ours."""
    return next((t for t in theirs if tags.parse(t) is not None), theirs[0])


def conditional(
    request: web.Request, response: web.StreamResponse, changes: Changes, *, compare: bool = True
) -> web.StreamResponse:
    """`response` with the push headers, or 304 when the client's copy is current (and `compare`:
    not at shutdown, which answers a held query with the content)."""
    headers = {INDEX_HEADER: str(changes.index), REPLICA_HEADER: changes.replica}
    if not isinstance(response, web.Response) or response.status != 200:
        response.headers.update(headers)
        return response
    tag = _tag_of(response)
    if TAGS in request.app:
        request.app[TAGS].gave(tag)
    if compare and _matches(request.headers.get("If-None-Match"), tag):
        return web.Response(status=304, headers={**headers, "ETag": tag})
    response.headers.update(headers)
    return response


def body_tag(body: bytes) -> str:
    """A weak tag for an answer that has no configuration of its own (docs/reference.md §6):
    `W/"-.-.<hash of its bytes>"`."""
    return tags.make(None, None, body)


def _matches(header: str | None, tag: str) -> bool:
    if not header:
        return False
    wanted = [t.removeprefix("W/") for t in tags.listed(header)]
    return "*" in wanted or tag.removeprefix("W/") in wanted


# -- the event stream ------------------------------------------------------------------------------


async def event_stream(request: web.Request) -> web.StreamResponse:
    """`GET …/events` (inside `scoped("config:read")`): the log as server-sent events.

    `Last-Event-ID` (or `?after=SEQ`; the header wins) first replays what the client missed
    from the log, in order, then follows live, with no gap and no duplicate; without either
    it starts from now. `secret.read` and `clients.updated` go to `admin` tokens only.
    """
    changes, log_ = request.app[CHANGES], request.app[EVENTS]
    header = request.headers.get("Last-Event-ID")
    after = (
        parse_index(header, "Last-Event-ID") if header else parse_index(request.query.get("after"), "after")
    )
    client = request.get(CLIENT)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            REPLICA_HEADER: changes.replica,
        }
    )
    if request.method == "HEAD":  # its headers alone: a HEAD answer has no content (RFC 9110)
        await response.prepare(request)
        await response.write_eof()
        return response
    replaying = after if after is not None and after <= log_.last_seq else None
    with changes.stream(client) as stream:
        last = changes.seq
        if replaying is not None:  # a log that cannot be read is said before the stream starts (503)
            await asyncio.to_thread(log_.check)  # quick: not queued behind the replays' thread
        try:
            await response.prepare(request)
            stream.transport = request.transport
            send = _sender(response)
            if replaying is not None:
                last = await _replay(changes, log_, stream, replaying, send)
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
        except EventLogError as exc:  # broken under the service mid-replay: the client resumes later
            log.warning("an event stream was closed: %s", exc)
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

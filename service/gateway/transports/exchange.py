"""One exchange on one kept-alive connection of the lean upstream client (`wire.Pool`): the
request written, its answer parsed and read.

A request goes out in one `transport.write` (head and body); the answer is parsed by
`httptools` (llhttp, the parser uvicorn uses): Content-Length, chunked, or read to EOF, 1xx
skipped. `Connection` is the asyncio protocol whose parser callbacks feed the `Response` being
read; it tells its pool (a `Keeper`) when it is free again, and when it is gone. Of the answer's
headers only those the gateway reads or passes back are kept (`KEPT`): the others, most of what
a vendor sends, are not decoded.

- **Bounded reads**: a head over `MAX_HEAD` bytes, and a body over the caller's limit
  (`TooLarge`), fail at once. A gzip or deflate answer is inflated within the same limit (a
  bomb stops at the limit).
- A connection is pooled again only once its answer was read whole and nothing followed it
  (bytes past the answer's end: the connection is closed); one left half-read (a timeout, a
  client that left) is closed. An answer read to the end of the connection is whole only if
  the connection ended cleanly (a reset breaks it off).

What goes wrong is in `errors` (`WireError`, `TooLarge`); the answer itself is `response.Response`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import httptools

from service.gateway.transports.errors import BrokenOff, TooLarge
from service.gateway.transports.response import Response

MAX_HEAD = 64 << 10
"""The most bytes an answer's status line and headers may take."""
_HIGH_WATER = 256 << 10
"""Bytes of a stream buffered unread before the connection stops reading."""
KEPT = frozenset(
    (
        b"content-length",
        b"transfer-encoding",
        b"content-encoding",
        b"content-type",
        b"x-request-id",
        b"request-id",
        b"retry-after",
        b"retry-after-ms",
    )
)
"""The headers of an answer that are kept (in `Response.headers`): those its reading needs,
its `Content-Type`, and those the gateway passes back to its client (`base.pass_back`), with
every `x-ratelimit-*`. The others are not decoded."""
_RATE_LIMITS = b"x-ratelimit-"
_NAMES: dict[bytes, str | None] = {}
"""A header's name as it came -> its kept name (in lower case), or None: not kept."""
_MAX_NAMES = 512
_LONGEST_NAME = 64
"""The longest name remembered: an upstream's long names (up to `MAX_HEAD`) pin no memory."""


class Keeper(Protocol):
    """What a connection needs of its pool: its loop, and to be told when it is free for the
    next request (its answer read whole), and when it is gone."""

    loop: asyncio.AbstractEventLoop

    def _release(self, connection: Connection) -> None: ...

    def _lost(self, connection: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One kept-alive connection; the parser's callbacks feed the `Response` being read."""

    def __init__(self, pool: Keeper, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self.head = 0
        self.informational = False
        self.done = False
        """The answer ended in the bytes being parsed (the connection is pooled after them)."""
        self.keep = False
        self.stray = False
        """An answer began after the answer: nobody asked for it, the connection is spoilt."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes) -> Response:
        self.response = response = Response(self)
        self.head = 0
        self.done = self.stray = False
        if self.transport is not None:
            self.transport.write(data)
        return response

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: this connection cannot be trusted again
            self.abort()
            return
        response.received += len(data)
        refused: Exception | None = None
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            refused = exc
        if response._news:  # woken once for the head, the chunks and the end these bytes held
            response._news = False
            response._wake()
        if refused is not None:
            if self.response is not None:
                self.response._fail(
                    BrokenOff(f"the upstream's answer is not HTTP/1.1: {type(refused).__name__}")
                )
            self.abort()  # garbage past a whole answer too: the connection is not pooled
            return
        if self.done:  # pooled only now: bytes after the answer, in the same read, spoil it
            self.done = False
            if self.keep and not self.stray and not self.closed:
                self.resume()
                self.pool._release(self)
            else:
                self.abort()
        elif not response._headed and response._error is None:  # the head is still coming
            self.head += len(data)
            if self.head > MAX_HEAD:
                response._fail(BrokenOff(f"the upstream's answer head is over {MAX_HEAD} bytes"))

    def on_message_begin(self) -> None:
        if self.response is None:
            self.stray = True

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is None:
            return
        if response._headed:  # a trailer: not kept, but counted, so that no flood of them is endless
            self.head += len(name) + len(value)
            if self.head > MAX_HEAD:
                response._fail(BrokenOff(f"the upstream's answer head is over {MAX_HEAD} bytes"))
            return
        try:  # a vendor sends the same names in the same case: each is looked at once
            kept = _NAMES[name]
        except KeyError:
            kept = _kept(name)
        if kept is not None:
            response._fields.append((kept, value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        status = self.parser.get_status_code()
        if status < 200:
            if status < 100:  # llhttp takes "099": no status to relay to a client
                response._fail(BrokenOff(f"the upstream's answer is not HTTP/1.1: status {status}"))
                return
            self.informational = True  # an interim answer: the real one follows
            response._fields.clear()
            return
        response._on_head(status)

    def on_body(self, body: bytes) -> None:
        response = self.response  # the answer's accounting done here: no second call per chunk
        if response is None:
            return
        response._chunks.append(body)
        response._size += len(body)
        response._buffered += len(body)
        if response._limit is not None and response._size > response._limit:
            response._fail(TooLarge(response._limit))
        elif (
            response._buffered > _HIGH_WATER and response._connection is not None and response._limit is None
        ):
            self.pause()
        response._news = True

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        response, self.response = self.response, None
        if response is not None:
            self.keep = self.parser.should_keep_alive()
            self.done = True
            response._on_complete()

    def eof_received(self) -> bool:
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        del self.parser  # it holds this connection's callbacks: a cycle, left to the collector
        response, self.response = self.response, None
        self.pool._lost(self)
        if response is not None:
            response._on_eof(exc is None)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _kept(name: bytes) -> str | None:
    """`name` in lower case if its header is kept, else None; remembered if at most
    `_LONGEST_NAME` bytes long. The memo holds `_MAX_NAMES` names at most: once full it starts
    again, so that an upstream sending ever new names costs lookups, but never keeps the usual
    names out of it for good."""
    lower = name.lower()  # a header's name is ASCII (llhttp refuses any other byte)
    kept = lower.decode() if lower in KEPT or lower.startswith(_RATE_LIMITS) else None
    if len(name) <= _LONGEST_NAME:
        if len(_NAMES) >= _MAX_NAMES:
            _NAMES.clear()
        _NAMES[name] = kept
    return kept

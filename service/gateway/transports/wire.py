"""A lean HTTP/1.1 client for the direct path (issue 22): POST a body, read the answer.

aiohttp's client costs about a third of the event loop's time per relayed request; this one
does only what the direct path needs. Connections are kept alive in a `Pool`, keyed by
(scheme, host, port), at most `per_host` open to one upstream (more wait for one to free up).
A request goes out in one `transport.write` (head and body); the answer is parsed by
`httptools` (llhttp, the parser uvicorn uses): Content-Length, chunked, or read to EOF, 1xx
skipped. What it keeps of aiohttp's rules:

- **No redirect is followed**: a 3xx is an answer like any other.
- **Only allowed addresses are connected to**: names go through the same `GuardedResolver`
  the session's connector uses (`SWITCHBOARD_ALLOWED_UPSTREAMS`, after DNS); a refusal is an
  `Unreachable` whose reason names the setting. An address written in the URL is not resolved
  (the caller checks it with `guard.literal_refusal`, as for aiohttp).
- **A header holding CR, LF or NUL is never sent** (`Unsendable`): it could split the request.
- **Bounded reads**: a head over `MAX_HEAD` bytes, and a body over the caller's limit
  (`TooLarge`), fail at once. `Accept-Encoding: identity` is asked for; a gzip or deflate
  answer all the same is inflated within the same limit (a bomb stops at the limit).
- **A request is sent once.** A kept-alive connection the upstream closed without answering
  is a failure (`Disconnected`), never a second sending: the upstream may have read the
  request and acted on it (billed, generated). aiohttp retried no POST either. A connection
  the upstream closed while idle is dropped, not used.
- A connection is pooled again only once its answer was read whole and nothing followed it
  (bytes past the answer's end: the connection is closed); one left half-read (a timeout, a
  client that left) is closed. An answer read to the end of the connection is whole only if
  the connection ended cleanly (a reset breaks it off).
- **TLS** (https): the certificate and the host name are verified (the system's CAs, or
  `SSL_CERT_FILE`), the name is sent as SNI; a refused certificate is an `Unreachable`
  whose reason says so.
- `User-Agent: switchboard/<version>` is sent (some vendors refuse a request without one).
- **One deadline per exchange** (`post(deadline=)`, the loop's clock): it bounds the wait for a
  free connection, connecting and the head, and `read` or `readany` take it for the body. A
  wait arms one `loop.call_at` timer, cancelled when it wakes; nothing is armed when nothing
  is waited for (a kept-alive connection free, a body that came with its head).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict
from yarl import URL

from service import __version__
from service.gateway.transports.guard import GuardedResolver, UpstreamRefused

MAX_HEAD = 64 << 10
"""The most bytes an answer's status line and headers may take."""
_HIGH_WATER = 256 << 10
"""Bytes of a stream buffered unread before the connection stops reading."""
_INFLATE_PIECE = 1 << 20
_DNS_TTL_S = 300.0
_AGENT = f"User-Agent: switchboard/{__version__}\r\n"


class Sent(Protocol):
    """What learns that a request was written whole (a `Call`: the upstream may bill it)."""

    delivered: bool


class TooLarge(Exception):
    """An upstream's answer is over the limit of what is read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer over {limit} bytes")
        self.limit = limit


class WireError(Exception):
    """What went wrong on the way; `str()` is a reason fit for an attempt list."""


class Unsendable(WireError):
    """The request cannot be written as it stands (a header that would split it)."""


class Unreachable(WireError):
    """No connection: refused, unreachable, or refused by the allowed upstreams."""

    def __init__(self, error: OSError) -> None:
        if isinstance(error, UpstreamRefused):
            reason = str(error.strerror)
        elif isinstance(error, ssl.SSLCertVerificationError):  # its errno (1) says "not permitted"
            refused = str(error.verify_message or error.reason).split(",")[0]  # not the host it names
            reason = f"cannot connect: the upstream's TLS certificate is refused ({refused})"
        elif isinstance(error, ssl.SSLError):
            reason = f"cannot connect: no TLS handshake ({error.reason or type(error).__name__})"
        else:  # os.strerror: asyncio's own text names the address; a DNS error's errno is < 0
            why = os.strerror(error.errno) if error.errno and error.errno > 0 else error.strerror
            reason = f"cannot connect: {why or type(error).__name__}"
        super().__init__(reason)
        self.os_error = error


class ConnectTimeout(WireError, TimeoutError):
    """No connection within the connect timeout."""


class Disconnected(WireError):
    """The upstream closed the connection before the answer's head was whole."""

    def __init__(self) -> None:
        super().__init__("the upstream closed the connection")


class BrokenOff(WireError):
    """The upstream broke off its answer, or sent what is no HTTP/1.1 answer."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a request goes: its pool key, and its request line and `Host` as bytes."""

    key: tuple[str, str, int]
    line: bytes

    @classmethod
    def of(cls, url: URL | str) -> Endpoint:
        parsed = URL(url) if isinstance(url, str) else url
        if parsed.scheme not in ("http", "https") or not parsed.raw_host or parsed.port is None:
            raise Unsendable("the provider's URL is not an http(s) URL")
        authority = parsed.host_port_subcomponent or parsed.raw_host
        path = parsed.raw_path_qs or "/"
        _check(path + authority)
        line = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n"
        return cls((parsed.scheme, parsed.raw_host, parsed.port), line.encode())


def _check(text: str) -> None:
    if "\r" in text or "\n" in text or "\0" in text:
        raise Unsendable("a header holds a line break: not sent")


class Response:
    """An answer whose head was read; its body comes with `read` or `readany`."""

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self._fields: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._limit: int | None = None
        self._length: int | None = None
        self._delimited = False
        self._headed = False
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._inflater: zlib._Decompress | None = None
        self._pending = b""
        self._inflated = False
        self._deflate = False
        self.received = 0
        """Bytes of the answer received so far (0: the upstream sent nothing)."""

    # -- fed by the connection -------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.abort()
        self._wake()

    def _on_head(self, status: int) -> None:
        self.status = status
        self.headers = headers = CIMultiDict(self._fields)
        length = headers.get("Content-Length")
        self._length = int(length) if length is not None and length.isdigit() else None
        self._delimited = (
            self._length is not None or "chunked" in headers.get("Transfer-Encoding", "").lower()
        )
        encoding = headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib's header; raw below
            self._deflate = True
        elif encoding not in ("identity", ""):
            self._fail(BrokenOff(f"the upstream's answer is in an encoding not asked for ({encoding[:32]})"))
            return
        self._headed = True
        self._wake()

    def _on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._buffered += len(data)
        if self._limit is not None and self._size > self._limit:
            self._fail(TooLarge(self._limit))
        elif self._buffered > _HIGH_WATER and self._connection is not None and self._limit is None:
            self._connection.pause()
        self._wake()

    def _on_complete(self) -> None:
        self._complete = True
        self._connection = None
        self._wake()

    def _on_eof(self, clean: bool) -> None:
        if self._complete or self._error is not None:
            return
        if self._headed and not self._delimited and clean:  # no length: the body ends with the connection
            self._on_complete()
        elif self._headed:
            self._fail(BrokenOff("the upstream broke off its answer"))
        else:
            self._fail(Disconnected())

    # -- read by the caller ----------------------------------------------------------------

    async def _until(self, deadline: float | None) -> None:
        """Wait for the connection's next event; `TimeoutError` once the loop's clock passes
        `deadline` (None: no limit).

        One `call_at` timer fails the waiter, and is cancelled on waking: about half the cost of
        `asyncio.timeout_at` or `wait_for`, on every wait of every exchange."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        if deadline is None:
            try:
                await waiter
            finally:
                self._waiter = None
            return
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            timer.cancel()

    async def _headed_in(self, deadline: float | None) -> None:
        while not self._headed and self._error is None:
            await self._until(deadline)
        if not self._headed and self._error is not None:  # after the head, the error is read's
            raise self._error

    async def read(self, limit: int, deadline: float | None = None) -> bytes:
        """The whole body (inflated), or `TooLarge` as soon as it passes `limit` bytes;
        `TimeoutError` if it is not whole by `deadline` (the loop's clock)."""
        self._limit = limit
        if self._error is None and (self._size > limit or (self._length or 0) > limit):
            self._fail(TooLarge(limit))
            if self._error is None:  # it had come whole already: over the limit all the same
                raise TooLarge(limit)
        while not self._complete and self._error is None:
            await self._until(deadline)
        if self._error is not None:
            raise self._error
        raw = b"".join(self._chunks)
        self._chunks.clear()
        if self._inflater is None:
            return raw
        out = self._inflate(self._pending + raw, limit + 1)
        if len(out) > limit or self._pending:
            raise TooLarge(limit)
        if self._size and not self._inflater.eof:  # cut short inside the compressed stream
            raise BrokenOff("the upstream's answer does not inflate")
        return out

    async def readany(self, within: float | None = None, *, deadline: float | None = None) -> bytes:
        """What arrived since the last call, waiting for it at most `within` s from now or until
        `deadline` (the loop's clock), whichever comes first: `TimeoutError`; b"" at the end of
        the answer."""
        while True:
            if self._chunks or self._pending:
                raw = b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._connection is not None:
                    self._connection.resume()
                if self._inflater is None:
                    return raw
                out = self._inflate(self._pending + raw, _INFLATE_PIECE)
                if out:
                    return out
                continue
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            if within is None:
                await self._until(deadline)
            else:  # a silence is timed from the last bytes that came
                at = asyncio.get_running_loop().time() + within
                await self._until(at if deadline is None else min(at, deadline))

    def _inflate(self, raw: bytes, most: int) -> bytes:
        inflater = self._inflater
        if inflater is None:
            return raw
        try:
            out = inflater.decompress(raw, most)
        except zlib.error:
            if not self._inflated and self._deflate:  # deflate without zlib's header
                self._inflater = inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                return self._inflate(raw, most)
            self._fail(BrokenOff("the upstream's answer does not inflate"))
            raise BrokenOff("the upstream's answer does not inflate") from None
        self._pending = inflater.unconsumed_tail
        self._inflated = True
        return out

    def close(self) -> None:
        """Drop the connection unless the answer was read whole (then it is pooled already)."""
        self._fail(BrokenOff("closed"))

    release = close


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # else woken already, in the same turn of the loop
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One kept-alive connection; the parser's callbacks feed the `Response` being read."""

    def __init__(self, pool: Pool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
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
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.response is not None:
                self.response._fail(BrokenOff(f"the upstream's answer is not HTTP/1.1: {type(exc).__name__}"))
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
        response._fields.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

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
        if self.response is not None:
            self.response._on_body(body)

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


class Pool:
    """Kept-alive connections to upstreams, at most `per_host` open to each (scheme, host, port)."""

    def __init__(
        self,
        resolver: GuardedResolver,
        per_host: int = 1024,
        keepalive_s: float = 60.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.resolver = resolver
        self.per_host = per_host
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._open: dict[tuple[str, str, int], int] = {}
        self._waiting: dict[tuple[str, str, int], deque[asyncio.Future[None]]] = {}
        self._names: dict[tuple[str, int], tuple[float, list[tuple[str, int]]]] = {}
        self._tls = tls
        """https: verifies the certificate and the host name (the system's CAs when None)."""
        self._all: set[_Connection] = set()
        self.closed = False

    async def post(
        self,
        endpoint: Endpoint,
        headers: Mapping[str, str],
        body: bytes,
        *,
        connect_s: float | None,
        deadline: float | None = None,
        sent: Sent | None = None,
        limit: int | None = None,
    ) -> Response:
        """POST `body` with `headers` to `endpoint`; the `Response` once its head is read.

        `deadline` (the loop's clock, `loop.time()`) bounds the whole exchange up to the head:
        the wait for a connection, connecting, the head (`TimeoutError`); connecting alone has
        `connect_s` too (`ConnectTimeout`, when it ends first). `sent`, when given, has its
        `delivered` set once the request is written (`Call`); `limit` bounds the body as it
        arrives (`TooLarge`)."""
        data = endpoint.line + _encode(headers, len(body)) + body
        connection = await self._acquire(endpoint.key, connect_s, deadline)
        response = connection.send(data)
        response._limit = limit
        if sent is not None:
            sent.delivered = True
        try:
            await response._headed_in(deadline)
        except BaseException:
            response.close()
            raise
        return response

    async def _acquire(
        self, key: tuple[str, str, int], connect_s: float | None, deadline: float | None
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = self._idle_connection(key, loop.time())
        if connection is not None:
            return connection
        if self._open.get(key, 0) >= self.per_host:  # only a wait arms a timeout
            async with asyncio.timeout_at(deadline):
                connection = await self._free(key)
            if connection is not None:
                return connection
        self._open[key] = self._open.get(key, 0) + 1
        try:
            if connect_s is None and deadline is None:
                return await self._connect(key)
            at = None if connect_s is None else loop.time() + connect_s
            connecting = at is not None and (deadline is None or at < deadline)  # ends first
            try:
                async with asyncio.timeout_at(at if connecting else deadline):
                    return await self._connect(key)
            except TimeoutError:
                if connecting:
                    raise ConnectTimeout(f"no connection within {connect_s:g} s") from None
                raise
        except BaseException:
            self._open[key] -= 1
            self._wake(key)
            raise

    def _idle_connection(self, key: tuple[str, str, int], now: float) -> _Connection | None:
        """A kept-alive connection to `key` to send on (the newest), or None; those idle past
        the keepalive are closed on the way."""
        if self.closed:  # also for a request woken by close() while it waited
            raise Unreachable(OSError(0, "the gateway is shutting down"))
        idle = self._idle.get(key)  # newest on the right, taken first: the oldest wait on the left
        while idle and now - idle[0].idle_since >= self.keepalive_s:  # else kept open forever
            idle.popleft().abort()
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
            connection.abort()
        return None

    async def _free(self, key: tuple[str, str, int]) -> _Connection | None:
        """Wait until a connection to `key` is released (it, then) or closed (None: one may be
        opened)."""
        loop = asyncio.get_running_loop()
        while True:
            waiter = loop.create_future()
            self._waiting.setdefault(key, deque()).append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # woken, then cancelled: wake the next
                    self._wake(key)
                raise
            connection = self._idle_connection(key, loop.time())
            if connection is not None:
                return connection
            if self._open.get(key, 0) < self.per_host:
                return None

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        error: OSError = OSError(0, "no address")
        for address, family in await self._addresses(host, port):
            connection = _Connection(self, key)
            try:
                await loop.create_connection(
                    lambda c=connection: c,
                    address,
                    port,
                    family=family,
                    ssl=tls,
                    server_hostname=host.strip("[]") if tls is not None else None,
                )
            except OSError as exc:
                error = exc
                continue
            self._all.add(connection)
            return connection
        raise Unreachable(error)

    async def _addresses(self, host: str, port: int) -> list[tuple[str, int]]:
        literal = host.strip("[]")
        try:
            parsed = ipaddress.ip_address(literal)
        except ValueError:
            pass
        else:  # written out in the URL: checked by the caller, not resolved (as aiohttp does)
            return [(literal, socket.AF_INET6 if parsed.version == 6 else socket.AF_INET)]
        now = asyncio.get_running_loop().time()
        cached = self._names.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            found = await self.resolver.resolve(host, port, family=socket.AF_UNSPEC)
        except OSError as exc:
            raise Unreachable(exc) from None
        addresses = [(r["host"], r["family"]) for r in found]
        if len(self._names) > 1024:
            self._names.clear()
        self._names[(host, port)] = (now + _DNS_TTL_S, addresses)
        return addresses

    def _release(self, connection: _Connection) -> None:
        if self.closed:
            connection.abort()
            return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(connection.key, deque()).append(connection)
        self._wake(connection.key)

    def _lost(self, connection: _Connection) -> None:
        if connection in self._all:
            self._all.discard(connection)
            self._open[connection.key] -= 1
            idle = self._idle.get(connection.key)
            if idle and connection in idle:
                idle.remove(connection)
            self._wake(connection.key)

    def _wake(self, key: tuple[str, str, int]) -> None:
        waiting = self._waiting.get(key)
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close every connection (at the app's cleanup, with the session)."""
        self.closed = True
        for connection in list(self._all):
            connection.abort()
        self._idle.clear()
        for waiting in self._waiting.values():  # each fails at once instead of waiting forever
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(None)
        self._waiting.clear()


def _encode(headers: Mapping[str, str], length: int) -> bytes:
    lines = []
    for name, value in headers.items():
        line = f"{name}: {value}\r\n"
        _check(line[:-2])
        lines.append(line)
    lines.append(f"{_AGENT}Accept: */*\r\nAccept-Encoding: identity\r\nContent-Length: {length}\r\n\r\n")
    return "".join(lines).encode("utf-8")

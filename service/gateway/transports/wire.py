"""A lean HTTP/1.1 client for the direct path (issue 22): POST a body, read the answer.

aiohttp's client costs about a third of the event loop's time per relayed request; this one
does only what the direct path needs. Connections are kept alive in a `Pool`, keyed by
(scheme, host, port), at most `per_host` open to one upstream (more wait for one to free up);
`Endpoint` is where a request goes. The exchange on one connection, the answer's parsing and
reading, is `exchange`'s. What it keeps of aiohttp's rules:

- **No redirect is followed**: a 3xx is an answer like any other.
- **Only allowed addresses are connected to**: names go through the same `GuardedResolver`
  the session's connector uses (`SWITCHBOARD_ALLOWED_UPSTREAMS`, after DNS); a refusal is an
  `Unreachable` whose reason names the setting. An address written in the URL is not resolved
  (the caller checks it with `guard.literal_refusal`, as for aiohttp).
- **A header holding CR, LF or NUL is never sent** (`Unsendable`): it could split the request.
- `Accept-Encoding: identity` is asked for (an answer compressed all the same is inflated
  within the body's limit).
- **A request is sent once.** A kept-alive connection the upstream closed without answering
  is a failure (`Disconnected`), never a second sending: the upstream may have read the
  request and acted on it (billed, generated). aiohttp retried no POST either. A connection
  the upstream closed while idle is dropped, not used.
- **TLS** (https): the certificate and the host name are verified (the system's CAs, or
  `SSL_CERT_FILE`), the name is sent as SNI; a refused certificate is an `Unreachable`
  whose reason says so.
- `User-Agent: switchboard/<version>` is sent (some vendors refuse a request without one).
- **One deadline per exchange** (`post(deadline=)`, the loop's clock): it bounds the wait for a
  free connection, connecting and the head, and `Response.read` or `readany` take it for the
  body. Only a wait arms a timeout (none when a kept-alive connection is free).

Its errors (`Unsendable`, `Unreachable`, `ConnectTimeout`) are `errors.WireError`s.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from yarl import URL

from service import __version__
from service.gateway.transports.errors import WireError
from service.gateway.transports.exchange import Connection
from service.gateway.transports.guard import GuardedResolver, UpstreamRefused
from service.gateway.transports.response import Response

_DNS_TTL_S = 300.0
_FIXED = (
    f"User-Agent: switchboard/{__version__}\r\nAccept: */*\r\nAccept-Encoding: identity\r\nContent-Length: "
)
"""What every request's head ends with, before its length."""


class Sent(Protocol):
    """What learns that a request was written whole (a `Call`: the upstream may bill it)."""

    delivered: bool


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


@dataclass(frozen=True, slots=True, eq=False)
class Endpoint:
    """Where a request goes: its pool key, and its request line and `Host` as bytes; with
    `headers` (`with_headers`), the request's head for them, made once."""

    key: tuple[str, str, int]
    line: bytes
    headers: Mapping[str, str] | None = field(default=None, repr=False)
    """The headers `head` was made with: a request sending this very mapping sends `head`.
    Neither is shown: they hold the provider's key."""
    head: bytes = field(default=b"", repr=False)
    """The head for `headers`, up to the value of its `Content-Length`."""

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

    def with_headers(self, headers: Mapping[str, str]) -> Endpoint:
        """This endpoint with its head for `headers` made now, for the requests that send them
        (a provider's own headers: the same on every request); `Unsendable` as `post` would."""
        return Endpoint(self.key, self.line, headers, self.line + _encode(headers))


def _check(text: str) -> None:
    if "\r" in text or "\n" in text or "\0" in text:
        raise Unsendable("a header holds a line break: not sent")


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
        self._idle: dict[tuple[str, str, int], deque[Connection]] = {}
        self._open: dict[tuple[str, str, int], int] = {}
        self._waiting: dict[tuple[str, str, int], deque[asyncio.Future[None]]] = {}
        self._names: dict[tuple[str, int], tuple[float, list[tuple[str, int]]]] = {}
        self._tls = tls
        """https: verifies the certificate and the host name (the system's CAs when None)."""
        self._all: set[Connection] = set()
        self.closed = False
        self.loop = asyncio.get_running_loop()
        """The loop its connections live on, kept: `asyncio.get_running_loop` makes a system
        call (getpid) each time, and the pool is made on its loop (call inside it)."""

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
        head = endpoint.head if headers is endpoint.headers else endpoint.line + _encode(headers)
        data = b"".join((head, b"%d\r\n\r\n" % len(body), body))
        connection = self._idle_connection(endpoint.key)
        if connection is None:
            connection = await self._acquire(endpoint.key, connect_s, deadline)
        response = connection.send(data)
        response._limit = limit
        if sent is not None:
            sent.delivered = True
        try:
            while not response._headed:  # after the head, an error is read's to raise
                if response._error is not None:
                    raise response._error
                await response._until(deadline)
        except BaseException:
            response.close()
            raise
        return response

    async def _acquire(
        self, key: tuple[str, str, int], connect_s: float | None, deadline: float | None
    ) -> Connection:
        """A connection to `key` when none is idle: one freed, or a new one."""
        loop = self.loop
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

    def _idle_connection(self, key: tuple[str, str, int]) -> Connection | None:
        """A kept-alive connection to `key` to send on (the newest), or None; those idle past
        the keepalive are closed on the way."""
        if self.closed:  # also for a request woken by close() while it waited
            raise Unreachable(OSError(0, "the gateway is shutting down"))
        idle = self._idle.get(key)  # newest on the right, taken first: the oldest wait on the left
        if not idle:
            return None
        now = self.loop.time()
        while idle and now - idle[0].idle_since >= self.keepalive_s:  # else kept open forever
            idle.popleft().abort()
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
            connection.abort()
        return None

    async def _free(self, key: tuple[str, str, int]) -> Connection | None:
        """Wait until a connection to `key` is released (it, then) or closed (None: one may be
        opened)."""
        loop = self.loop
        while True:
            waiter = loop.create_future()
            self._waiting.setdefault(key, deque()).append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # woken, then cancelled: wake the next
                    self._wake(key)
                raise
            connection = self._idle_connection(key)
            if connection is not None:
                return connection
            if self._open.get(key, 0) < self.per_host:
                return None

    async def _connect(self, key: tuple[str, str, int]) -> Connection:
        scheme, host, port = key
        loop = self.loop
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        error: OSError = OSError(0, "no address")
        for address, family in await self._addresses(host, port):
            try:  # the connection made once connected: one refused leaves none to collect
                _, connection = await loop.create_connection(
                    partial(Connection, self, key),
                    address,
                    port,
                    family=family,
                    ssl=tls,
                    server_hostname=host.strip("[]") if tls is not None else None,
                )
            except OSError as exc:
                error = exc.with_traceback(None)  # kept, its traceback would hold this frame: a cycle
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
        now = self.loop.time()
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

    def _release(self, connection: Connection) -> None:
        if self.closed:
            connection.abort()
            return
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.key, deque()).append(connection)
        self._wake(connection.key)

    def _lost(self, connection: Connection) -> None:
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


def _encode(headers: Mapping[str, str]) -> bytes:
    """The head's header lines after `Host`, up to the value of `Content-Length`."""
    lines = []
    for name, value in headers.items():
        line = f"{name}: {value}\r\n"
        _check(line[:-2])
        lines.append(line)
    lines.append(_FIXED)
    return "".join(lines).encode("utf-8")

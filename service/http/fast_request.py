"""A request of the fast path (service/http/fast.py) as the gateway's code reads it, and its
answer's bytes as aiohttp writes them: a whole one's made here (`serialized`), any other's
(a stream's) by aiohttp's own `StreamResponse` and `StreamWriter`, onto the connection's
transport (`Outlet`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import ClientConnectionResetError, hdrs, helpers, http_writer, web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from multidict import CIMultiDictProxy

from service.http.stalls import Stall
from service.metrics import Cuts

if TYPE_CHECKING:
    from aiohttp.helpers import HeadersMixin
    from aiohttp.web_urldispatcher import UrlMappingMatchInfo
else:  # not in `aiohttp.helpers.__all__`: without it, `fast_check` tells and the fast path is off
    HeadersMixin = getattr(helpers, "HeadersMixin", object)


def _absent(*args: Any) -> Any:
    raise RuntimeError("a private name of aiohttp the fast path uses is gone from this aiohttp")


_serialize_headers: Callable[[str, Any], bytes] = getattr(http_writer, "_serialize_headers", _absent)
"""aiohttp's own writer of a status line and fields (private): without it (`_absent`), the
fast path is off (`fast_site.missing`) and aiohttp's server answers everything."""
rfc822_formatted_time: Callable[[], str] = getattr(helpers, "rfc822_formatted_time", _absent)
"""aiohttp's `Date` (not in `aiohttp.helpers.__all__`)."""


class Outlet:
    """A connection of the fast path as aiohttp's `StreamWriter` writes to it (the `protocol` it
    is given): its `transport`, and its flow control, `_paused` and `_drain_helper` (private,
    as aiohttp's `BaseProtocol` has them): a write over the transport's limit waits until the
    client has read the buffer down (`resume_writing`), or has left; or, once it has taken
    nothing of it for `send_timeout_s`, until it is let go of (`Stall`), and counted (`cuts`)."""

    transport: asyncio.Transport | None
    loop: asyncio.AbstractEventLoop
    blocked: bool
    """The transport's buffer is over its limit (`pause_writing`)."""
    drained: asyncio.Future[None] | None
    """What a write waiting for `blocked` to end awaits."""
    stall: Stall | None = None
    """The watch on that wait (or on an answer written whole, unread), while it lasts."""
    send_timeout_s: float
    """`SWITCHBOARD_SEND_TIMEOUT_S`."""
    cuts: Cuts
    """The app's metrics' series of cut connections: a client let go of adds to `send_timeout`."""

    @property
    def _paused(self) -> bool:
        return self.blocked

    async def _drain_helper(self) -> None:
        if self.transport is None:
            raise ClientConnectionResetError("Connection lost")
        if not self.blocked:
            return
        waiter = self.drained
        if waiter is None:
            waiter = self.drained = self.loop.create_future()
            self.watch()
        await waiter

    def watch(self) -> None:
        """Watch the client while `blocked`, or while a close waits for it: let go of it once it
        takes nothing for the limit."""
        if self.stall is None and self.transport is not None:
            self.stall = Stall(self.loop, self.transport, self.send_timeout_s, self.cuts.send_timeout)

    def unblock(self) -> None:
        """The buffer is read down, or the connection lost: a waiting write goes on (to find the
        transport gone, in that case)."""
        self.blocked = False
        stall, self.stall = self.stall, None
        if stall is not None:
            stall.cancel()
        waiter, self.drained = self.drained, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class FastRequest(HeadersMixin):
    """What the gateway's code reads of an `aiohttp.web.Request`, for a request of the fast path:
    `app`, `method`, `path`, `headers`, `host`, `content_type`, `content_length`, `body_exists`,
    `content`, `match_info`, `keep_alive`, `version`, and a mapping of its own (`request[CLIENT]`);
    and what aiohttp's `StreamResponse.prepare` reads of one (`_payload_writer`, `_prepare_hook`,
    private), so that a stream is written as aiohttp's server writes it."""

    method = hdrs.METH_POST
    body_exists = True  # the fast path takes only a body of one byte or more

    def __init__(
        self,
        app: web.Application,
        path: str,
        headers: CIMultiDictProxy[str],
        body: bytes,
        match_info: UrlMappingMatchInfo,
        version: HttpVersion,
        keep_alive: bool,
        outlet: Outlet | None = None,
    ) -> None:
        self.app = app
        self.path = path
        self._headers = self.headers = headers
        self.body = body
        self.match_info = match_info
        self.version = version
        self.keep_alive = keep_alive
        self.outlet = outlet
        self.writer: http_writer.StreamWriter | None = None
        """aiohttp's writer of its answer, once one is made (`_payload_writer`)."""
        self._state: dict[Any, Any] = {}

    @property
    def content(self) -> FastRequest:
        """What `openai_api.arrived` reads (`is_eof`, `read_nowait`): the request itself. A
        property, not an attribute: a request that held itself would be a reference cycle,
        its body freed only by the cyclic collector, long after its answer (`YOUNG_ALLOCATIONS`)."""
        return self

    @property
    def _payload_writer(self) -> http_writer.StreamWriter:
        """aiohttp's writer of an answer onto the connection, made for the one answer that is
        not whole (`StreamResponse.prepare` takes it), as aiohttp's server makes one a request."""
        writer = self.writer
        if writer is None:
            outlet = self.outlet
            if outlet is None:
                raise RuntimeError("a fast request without a connection has no writer")
            writer = self.writer = http_writer.StreamWriter(cast(Any, outlet), outlet.loop)
        return writer

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        """aiohttp's sends `on_response_prepare` of the match's apps: an endpoint's match is in
        none (`Gateway.fast`)."""

    @property
    def host(self) -> str:
        return self._headers[hdrs.HOST]  # the fast path takes only a request with one

    def is_eof(self) -> bool:
        return True

    def read_nowait(self) -> bytes:
        return self.body

    def __getitem__(self, key: Any) -> Any:
        return self._state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._state[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)


def serialized(request: FastRequest, response: web.StreamResponse) -> bytes | None:
    """`response`'s status line, headers and body as aiohttp's `Response.prepare` and
    `write_eof` write them (`Response._start`, `StreamResponse._prepare_headers`); None for an
    answer that is not a whole one of bytes (the relay makes no other for a call not a stream).
    The answers' headers are the relay's own: it sets no cookie on them.

    The relay's usual answer is `_plain`'s, any other `_written`'s. What they read of `response`
    they read from its private attributes, not its properties (a call each): that they are what
    its properties give is checked at start (`fast_check.unlike_aiohttp`)."""
    if (
        type(response) is not web.Response
        or response._eof_sent  # `prepared`
        or response._payload_writer is not None
        or response._chunked
        or response._compression
    ):
        return None
    body = response._body
    if body is not None and type(body) is not bytes:
        return None
    return _plain(request, response, body) or _written(request, response, body)


_LINES: dict[tuple[HttpVersion, int, str], str] = {}
"""Status lines already made (at most `_MAX_LINES`)."""
_MAX_LINES = 256
_ABSENT = (hdrs.CONTENT_LENGTH, hdrs.DATE, hdrs.SERVER, hdrs.CONNECTION, hdrs.TRANSFER_ENCODING)
"""The fields aiohttp adds to an answer or judges in it: an answer with one is `_written`."""
_UNTYPED = f"{hdrs.CONTENT_TYPE}: application/octet-stream\r\n".encode()
_SERVER = f"{hdrs.SERVER}: {SERVER_SOFTWARE}\r\n".encode()
_KEPT_10 = f"{hdrs.CONNECTION}: keep-alive\r\n".encode()
_CLOSED_11 = f"{hdrs.CONNECTION}: close\r\n".encode()
_date = ("", b"")
"""aiohttp's `Date` of this second, and its bytes."""


def _plain(request: FastRequest, response: web.Response, body: bytes | None) -> bytes | None:
    """The bytes `_written` makes of `response`, when it is a relay's usual answer: a body, a
    status that has one, and none of the fields aiohttp adds or judges (`_ABSENT`); else None.

    The fields aiohttp would add to `headers` (`Content-Length`, `Content-Type`, `Date`,
    `Server`, `Connection`, in that order, after the others) are added to its writer's bytes
    instead, already made: no field is added to `headers`, no status line made again."""
    if not body:
        return None
    status = response._status
    if status < 200 or status == 204 or status == 304:
        return None
    headers = response._headers
    for name in _ABSENT:
        if name in headers:
            return None
    version = request.version
    key = (version, status, response._reason)
    line = _LINES.get(key)
    if line is None:
        line = f"HTTP/{version[0]}.{version[1]} {status} {key[2]}"
        if len(_LINES) < _MAX_LINES:
            _LINES[key] = line
    head: bytes = _serialize_headers(line, headers)  # which checks the line and the fields
    keep_alive = response._keep_alive
    if keep_alive is None:
        keep_alive = request.keep_alive
    if keep_alive:
        connection = _KEPT_10 if version is HttpVersion10 else b""
    else:
        connection = _CLOSED_11 if version is HttpVersion11 else b""
    global _date
    date = rfc822_formatted_time()
    if date is not _date[0]:  # aiohttp's is made once a second
        _date = (date, f"{hdrs.DATE}: {date}\r\n".encode())
    return b"".join(
        (
            head[:-2],  # its last line's end is the head's
            b"Content-Length: %d\r\n" % len(body),
            b"" if hdrs.CONTENT_TYPE in headers else _UNTYPED,
            _date[1],
            _SERVER,
            connection,
            b"\r\n",
            body,
        )
    )


def _written(request: FastRequest, response: web.Response, body: bytes | None) -> bytes:
    """`serialized`'s bytes as aiohttp's `_prepare_headers` adds the fields and its writer
    writes them."""
    headers = response.headers
    status = response.status
    empty = status < 200 or status == 204 or status == 304  # `must_be_empty_body` of a POST
    if hdrs.CONTENT_LENGTH in headers:
        if empty:  # `should_remove_content_length` of a POST
            del headers[hdrs.CONTENT_LENGTH]
    elif body or status != 304:
        headers[hdrs.CONTENT_LENGTH] = str(len(body)) if body else "0"
    keep_alive = response.keep_alive
    if keep_alive is None:
        keep_alive = request.keep_alive
    if empty:
        headers.popall(hdrs.CONTENT_LENGTH, None)
        headers.popall(hdrs.TRANSFER_ENCODING, None)
    elif headers[hdrs.CONTENT_LENGTH] != "0":
        headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
    if hdrs.DATE not in headers:
        headers[hdrs.DATE] = rfc822_formatted_time()
    headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
    version = request.version
    if hdrs.CONNECTION not in headers:
        if keep_alive:
            if version is HttpVersion10:
                headers[hdrs.CONNECTION] = "keep-alive"
        elif version is HttpVersion11:
            headers[hdrs.CONNECTION] = "close"
    line = f"HTTP/{version[0]}.{version[1]} {status} {response.reason}"
    head: bytes = _serialize_headers(line, headers)
    return head if empty or not body else head + body

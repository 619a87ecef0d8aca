"""The gateway's own HTTP/1.1 server for the endpoints' requests, in front of aiohttp's.

A `FastSite` (`service.http.fast_site`) listens in place of aiohttp's `TCPSite`; each accepted connection is a
`FastConnection`, which parses with httptools and answers by itself only a request that is
all of: a `POST` to one of the gateway's endpoints (`Gateway.routes` with an `Endpoint`),
HTTP/1.1 or 1.0, a `Content-Length` within the app's limit and no `Expect`,
`Transfer-Encoding`, `Content-Encoding` or `Upgrade`, whose whole body has come, with no
earlier request unanswered. It runs the gateway's own code for it (`Gateway.called`,
`Gateway.relayed`) and writes the answer as aiohttp would, byte for byte but the `Date`: a
whole answer by itself (`fast_request.serialized`), a stream (or any answer not whole) by
aiohttp's own `StreamResponse` and `StreamWriter`, which the relay writes as it goes onto the
connection's transport (`FastRequest._payload_writer`), waiting while a slow client reads its
buffer down (`Outlet`). Once the answer has ended the connection goes on to the next request.
A request that does not come whole in time is answered 408 and the connection closed (the
receive timeout, `service.http.stalls`): its one timer, the keep-alive's, times that too (`_idle`).
Each cut (a 408, a client let go of) is counted in the app's metrics, reached through the
site's gateway (`FastSite.cuts`); a malformed request is aiohttp's, counted there.

Any other request hands the connection to aiohttp for the rest of its life, at that
request's first byte: aiohttp's `RequestHandler` is made for the transport, given it, and
fed every byte not yet answered (a follower of `serve --workers N` pipes it to its leader
instead, `service.http.forward`). Nothing of the request has happened by then (no client
admitted, nothing metered or counted).

aiohttp's `Server` keeps the connections, ours too (`connection_made`, `close`,
`shutdown`, `_task_handler`: what it reads of a connection), so that the runner's shutdown
closes idle ones at once and waits for a request in flight, as for its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import repeat
from typing import TYPE_CHECKING, Any, Protocol, cast

import httptools
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.tcp_helpers import tcp_keepalive
from multidict import CIMultiDict, CIMultiDictProxy

from service.gateway.call import Call
from service.http import connections, malformed, stalls
from service.http.fast_request import FastRequest, Outlet, serialized
from service.http.forward import Forwarder

if TYPE_CHECKING:
    from aiohttp.web_server import Server
    from aiohttp.web_urldispatcher import UrlMappingMatchInfo

    from service.http.gateway import Gateway
    from service.http.openai_api import Endpoint
    from service.metrics import Cuts

log = logging.getLogger(__name__)

KEEPALIVE_S = 75.0
"""An idle connection is closed after this long: what `aiohttp.web.run_app` gives its connections."""
MAX_FIELD = 8000
"""A request line or header field longer is aiohttp's to judge (its limit: 8190)."""
MAX_HEADERS = 100
"""More header fields than this are aiohttp's to judge (its limit: 128)."""
MAX_HEAD = 65536
"""A longer head is aiohttp's to judge."""
_VERSIONS = {"HTTP/1.1": HttpVersion11, "HTTP/1.0": HttpVersion10}
_COLON = repeat(":")
"""`str.partition`'s separator for each field line (`map`'s second iterable: never exhausted)."""
_KEYS_ONCE = len(CIMultiDict((("A", ""), ("a", ""))).keys()) == 1
"""A `CIMultiDict`'s keys count each name once, whatever its case (multidict 7's): the count of a
head's fields with a repeated name (ASCII) is one pass in C. Else names are lowered and counted."""


_Head = tuple[
    tuple[str, "UrlMappingMatchInfo", "Endpoint"], CIMultiDictProxy[str], HttpVersion, bool, int, int
]
"""A request's head as the fast path takes it: its endpoint (name, match, `Endpoint`), its
fields, its version, whether the connection is kept alive after it, and where its body begins
and ends in the connection's pending bytes."""


class Site(Protocol):
    """What a connection reads of the site that accepted it (`fast_site.FastSite`, which makes
    the connections, so it is named here by what it gives them, not imported)."""

    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    send_timeout_s: float
    receive_timeout_s: float
    keepalive_s: float
    cuts: Cuts
    handed_off: int
    most: int
    endpoints: dict[str, tuple[str, UrlMappingMatchInfo, Endpoint]]
    forward: Forwarder | None
    """A follower's (`serve --workers N`): where a connection goes instead of to aiohttp."""

    @property
    def server(self) -> Server: ...


class FastConnection(asyncio.Protocol, Outlet):
    """One client connection, on the fast path until a request hands it to aiohttp."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.loop = site.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending = bytearray()
        """The bytes of requests not yet answered, from the first one's first byte."""
        self.task: asyncio.Task[None] | None = None
        """The request being answered."""
        self.closing = False
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        """The connection's one timer: its keep-alive, and the receive timeout (`_idle`)."""
        self.since = 0.0
        """When the request now coming began, or (its body) was last seen to come on."""
        self.seen = 0
        """How much of it had come then (`pending`'s length)."""
        self.head: _Head | None = None
        """The parsed head of the request whose body is awaited, or None."""
        self.refused = False
        """The request being parsed is aiohttp's (told by the parser's callback)."""
        self.paused = False
        """Reading is paused: a client sent more than a request's most while one was answered,
        or while it did not read its answers (`blocked`)."""
        self.blocked = False
        """The transport's buffer is over its limit (`pause_writing`): no request is taken
        and no stream written until the client reads it down, as aiohttp's `drain` waits."""
        self.drained: asyncio.Future[None] | None = None
        self.send_timeout_s = site.send_timeout_s
        self.cuts = site.cuts

    # -- what aiohttp's Server reads of a connection ----------------------------------------

    @property
    def _task_handler(self) -> asyncio.Task[None] | None:
        return self.task

    def close(self) -> None:
        """Stop taking requests: an idle connection closes now, a busy one after its answer."""
        self.closing = True
        if self.task is None and self.transport is not None:
            self._close(self.transport)

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 - aiohttp's Server calls it so
        """Let the request in flight (a stream too) finish within `timeout`, then close.

        On purpose shorter than aiohttp's `RequestHandler.shutdown`, which waits within `timeout`,
        then cancels its request's body (which the fast path has whole) and waits within
        `timeout` again: `serve`'s 10 s is what the deployments' grace periods are sized for
        (docs/reference.md §3.2)."""
        self.closing = True
        task = self.task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except (asyncio.CancelledError, TimeoutError):
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            if not task.done():
                task.cancel()
        if self.transport is not None:
            self._close(self.transport)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        tcp_keepalive(self.transport)  # as aiohttp's connections have it
        self.site.server.connection_made(cast(Any, self), self.transport)
        self.idle_since = self.loop.time()
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        del self.parser  # it holds this connection's callbacks: a cycle, left to the collector
        self.unblock()  # a stream's write waiting for the client goes on, to find it gone
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        task = self.task
        self.site.server.connection_lost(cast(Any, self), exc)
        if task is not None and self.site.server.handler_cancellation:
            task.cancel()

    def pause_writing(self) -> None:
        self.blocked = True

    def resume_writing(self) -> None:
        if self.transport is not None and self.transport.is_closing():
            self.blocked = False  # closed: what is left still watched (`_close`)
            return
        self.unblock()
        if self.task is None and self.transport is not None and not self.closing:  # closing: none taken
            self._next()

    def data_received(self, data: bytes) -> None:
        self.pending += data
        if self.task is not None or self.blocked:  # parsed once it is answered and read
            if len(self.pending) > self.site.most and self.transport is not None:
                self.transport.pause_reading()  # resumed after the answer
                self.paused = True
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # aiohttp answers it
            self._hand_off(len(self.pending) == len(data))
            return
        head = self.head
        if head is None:
            if self.refused:  # its head ended in this read: a head after it began in it too
                self._hand_off(fresh=True)
                return
            if len(self.pending) > MAX_HEAD:  # a head too long: aiohttp judges it
                self._hand_off(len(self.pending) == len(data))
                return
        elif len(self.pending) == head[5]:
            self._take(head)
            return
        elif len(self.pending) > head[5]:  # the next request came with it (pipelined)
            self._hand_off(fresh=True)  # in this read: a request whole in an earlier one was taken
            return
        if len(self.pending) == len(data):  # a request's first read, not all of it: timed (`_idle`)
            self.since = self.loop.time()
            self.seen = len(data)

    # -- httptools' callback: the one it is given, for the fewest calls per request ------------

    def on_headers_complete(self) -> None:
        """Keep the head just parsed (the parser found it well formed) if the fast path takes it;
        else the request is aiohttp's (`refused`).

        It is read again from `pending`, where it begins (a request that does not begin there,
        after empty lines, is aiohttp's): one decoding and passes in C over the head and its lines,
        not a call per field nor a Python loop over them (tests/http/test_fast_head.py)."""
        self.head = head = self._head()
        self.refused = head is None

    # -- the fast path ----------------------------------------------------------------------

    def _head(self) -> _Head | None:
        pending = self.pending
        if not pending.startswith(b"POST /"):
            return None
        end = pending.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD:
            return None
        text = pending[:end].decode("utf-8", "surrogateescape")
        lines = text.split("\r\n")
        if len(lines) > MAX_HEADERS:
            return None
        first = lines[0].split(" ")
        if len(first) != 3:
            return None
        target, version = first[1], _VERSIONS.get(first[2])
        if version is None or len(target) > MAX_FIELD or "%" in target or "#" in target:
            return None
        found = self.site.endpoints.get(target.partition("?")[0])
        if found is None:
            return None
        del lines[0]  # the field lines
        if "\r\n " in text or ("\t" in text and "\r\n\t" in text):  # a field line folded (obsolete
            return None  # line folding): aiohttp's. Each CRLF in the head ends a line, one begins after it
        if len(text) > MAX_FIELD and max(map(len, lines), default=0) > MAX_FIELD:
            return None
        headers = CIMultiDict(
            [(name, value.strip(" \t")) for name, _, value in map(str.partition, lines, _COLON)]
        )
        if len(headers.keys()) != len(headers) or (  # a repeated field: aiohttp's to judge
            not (_KEYS_ONCE and text.isascii()) and len({*map(str.lower, headers)}) != len(headers)
        ):  # (names not ASCII: as the multidict and `str.lower` fold their case, both)
            return None
        if (
            hdrs.EXPECT in headers
            or hdrs.TRANSFER_ENCODING in headers
            or hdrs.CONTENT_ENCODING in headers
            or hdrs.UPGRADE in headers
            or hdrs.HOST not in headers
        ):
            return None
        length = headers.get(hdrs.CONTENT_LENGTH, "")
        if not (length.isascii() and length.isdigit()):
            return None
        size = int(length)
        if not 0 < size <= self.site.gateway.max_body_bytes:
            return None
        keep_alive = self.parser.should_keep_alive()  # read while it is this request's
        return found, CIMultiDictProxy(headers), version, keep_alive, end + 4, end + 4 + size

    def _take(self, head: _Head) -> None:
        """Answer the request just parsed."""
        gateway = self.site.gateway
        (name, match, endpoint), headers, version, keep_alive, start, _ = head
        body = bytes(self.pending[start:])
        request = FastRequest(gateway.app, name, headers, body, match, version, keep_alive, self)
        started = time.perf_counter()
        try:
            call = gateway.called(request, endpoint)  # type: ignore[arg-type]  # what it reads of one
        except Exception as exc:
            self.pending.clear()  # parsed and answered: what comes next is the next request's
            self.head = None
            self._answer(request, gateway.refused(request, name, endpoint, exc, started))  # type: ignore[arg-type]
            return
        self.pending.clear()
        self.head = None
        self.task = self.loop.create_task(self._relay(request, name, endpoint, call, started))

    async def _relay(
        self, request: FastRequest, name: str, endpoint: Endpoint, call: Call, started: float
    ) -> None:
        try:
            response = await self.site.gateway.relayed(request, name, endpoint, call, started)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            # the client left (`connection_lost`). The task keeps this error, whose traceback holds
            # this frame (the connection, the request and its body): held here, it is a cycle
            self.task = None
            raise
        except Exception:  # a bug: no answer to give, and none to wait for
            log.exception("no answer to POST %s", request.path)
            self.task = None
            if self.transport is not None:
                self._close(self.transport)
            return
        if self.transport is None:  # the client left: what is left of its answer goes nowhere
            self.task = None
            return
        writer = request.writer
        if writer is not None and response is not call.prepared:
            # `relayed`'s answer to a failure once a stream began (a bug). Once the stream ended,
            # nothing more is written (as aiohttp's ended writer writes nothing); in its middle,
            # it can neither end as it should nor be answered: the connection is closed; while
            # nothing of it went out (its head waits for its first bytes), the answer goes instead.
            stream = call.prepared
            if stream is not None and stream.body_length:
                response = stream
            elif writer.output_size:
                self.task = None
                self._close(self.transport)
                return
            else:
                request.writer = None  # as if the stream had never been
        if not response.prepared:
            try:
                whole = serialized(request, response)
            except Exception:
                self._failed(request)
                return
            if whole is not None:
                self.task = None
                self._answer(request, response, whole)
                return
        try:  # a stream (its end, if the relay has not written it), or an answer not whole
            await response.prepare(request)  # type: ignore[arg-type]  # what it reads of one
            await response.write_eof()
        except asyncio.CancelledError:  # as above: the task let go of
            self.task = None
            raise
        except ConnectionError:  # the client left (`StreamWriter`'s ClientConnectionResetError)
            self.task = None
            if self.transport is not None:
                self._close(self.transport)
            return
        except Exception:
            self._failed(request)
            return
        self.task = None
        writer = request.writer
        if writer is not None and writer.length is None and not writer.chunked:  # HTTP/1.0
            self.closing = True  # the body ends where the connection does
        self._went(request, response)

    def _failed(self, request: FastRequest) -> None:
        log.exception("the answer to POST %s could not be written", request.path)
        self.task = None
        if self.transport is not None:
            self._close(self.transport)

    def _answer(self, request: FastRequest, response: web.StreamResponse, whole: bytes | None = None) -> None:
        """Write `response`, a whole answer (`whole`, its bytes, if made already), and go on."""
        transport = self.transport
        if transport is None:  # the client left: its answer goes nowhere
            return
        try:
            answer = serialized(request, response) if whole is None else whole
            if answer is None:
                raise TypeError(f"not a whole answer: {type(response).__name__}")
            transport.write(answer)
        except Exception:
            log.exception("the answer to POST %s could not be written", request.path)
            self._close(transport)
            return
        self._went(request, response)

    def _went(self, request: FastRequest, response: web.StreamResponse) -> None:
        """After an answer: close the connection, or take up the next request."""
        transport = self.transport
        if transport is None:
            return
        if self.closing or not request.keep_alive or response.keep_alive is False:
            self._close(transport)
            return
        self.idle_since = self.loop.time()
        if self.blocked:
            # the client reads too slowly: the next request waits for `resume_writing`, read
            # meanwhile up to a request's most as during an answer (`data_received`), not left
            # in the socket, which would make its close a reset, losing the answer's last bytes;
            # a client that reads none of it is let go of after the send timeout
            self.watch()
            return
        self._next()

    def _close(self, transport: asyncio.Transport) -> None:
        """Close the connection: the close waits for the client to read what is left of its
        answer, which one that reads nothing never does, so it is watched (`Stall`) until then."""
        if transport.get_write_buffer_size():
            self.watch()
        transport.close()

    def _next(self) -> None:
        """Take up what came while a request was answered."""
        transport = self.transport
        if transport is None:
            return
        data = bytes(self.pending)
        self.pending.clear()
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if data:
            self.data_received(data)

    def _hand_off(self, fresh: bool = False) -> None:
        """Give the connection to aiohttp, with every byte not yet answered; `fresh`: a head begun
        among them (pipelined after a whole request) began in the read that hands it off, so it is
        timed from now, not from the first read of the request before it (`since`)."""
        transport = self.transport
        if transport is None:
            return
        if fresh:
            self.since = self.loop.time()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.site.handed_off += 1
        server = self.site.server
        server.connection_lost(cast(Any, self), None)
        self.transport = None
        del self.parser  # as in `connection_lost`: no cycle outlives the connection's hand-off
        forward = self.site.forward
        if forward is not None:  # a follower's: the leader answers the rest of the connection
            data, self.pending = bytes(self.pending), bytearray()
            forward(transport, data)
            return
        handler = server()
        handler.connection_made(transport)
        transport.set_protocol(handler)
        data, self.pending = bytes(self.pending), bytearray()
        if data:
            handler.data_received(data)
            if isinstance(handler, connections.Handler):  # a head in its middle: timed from its first byte
                handler.began(self.since)
        if self.closing:
            handler.close()

    # -- keep-alive and the receive timeout ------------------------------------------------

    def _arm(self) -> None:
        """Arm the timer for the keep-alive, but no later than a receive timeout from now: a
        request that begins after this is timed from its first read (`since`) without a timer
        of its own, since this one fires before its limit, and is armed then for that limit."""
        site = self.site
        at = min(self.idle_since + site.keepalive_s, self.loop.time() + site.receive_timeout_s)
        self.timer = self.loop.call_at(at, self._idle)

    def _idle(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():  # its close waits for the client (`Stall`)
            return
        now = self.loop.time()
        if self.task is not None or self.blocked:
            # a request in hand, or its answer being read: as aiohttp's handler, which waits for
            # its answer to be read (`drain`) before its keep-alive counts
            self.idle_since = now
        elif self.pending:  # a request coming: the receive timeout's (service.http.stalls)
            limit_s = self.site.receive_timeout_s
            if self.head is not None and len(self.pending) > self.seen:  # its body came on
                self.since, self.seen = now, len(self.pending)
            elif now - self.since >= limit_s:  # its head did not end in time, or its body stopped
                self._timed_out(transport)
                return
            self.timer = self.loop.call_at(self.since + limit_s, self._idle)
            return
        elif now >= self.idle_since + self.site.keepalive_s:  # idle: as aiohttp's keep-alive
            self._close(transport)
            return
        self._arm()

    def _timed_out(self, transport: asyncio.Transport) -> None:
        """Answer 408 to a request that did not come in time, and close: nothing of it happened."""
        stalls.refuse_late(
            transport,
            self.head is None,
            self.site.receive_timeout_s,
            self.site.cuts.receive_timeout,
            malformed.path_of(bytes(self.pending[: stalls.START])),
        )
        self.pending.clear()
        self.head = None
        self.closing = True
        self._close(transport)

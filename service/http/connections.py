"""aiohttp's server as the service runs it (`install`): its connections (`Handler`) have the
send and receive timeouts of `service.http.stalls`, and answer what they cannot parse with the
service's JSON errors (`service.http.malformed`), each cut counted in the app's metrics. The
fast path hands its connections to this server too (`service.http.fast`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from service.http.malformed import JsonErrors, path_of
from service.http.stalls import START, Stall, refuse_late
from service.metrics import Cuts

log = logging.getLogger("service.http.stalls")  # its lines' logger before it was a module of its own


def _head_after(data: bytes, message: object) -> bytes:
    """The start of a head that follows, in `data`, the whole request `message` it ended with
    (a client that pipelines), when that request has no body: its head's end is then the last
    `CRLF CRLF` of `data` (the head begun holds none, or it would have ended). Empty when nothing
    follows but line ends, which a parser skips between requests, or when the request has a body
    (whose end the parser does not tell: what follows it is then the keep-alive's)."""
    if (
        not isinstance(message, RawRequestMessage)  # a request it refused (answered 400, closed)
        or message.chunked
        or message.headers.get("Content-Length", "0") != "0"
    ):
        return b""
    end = data.rfind(b"\r\n\r\n")
    rest = data[end + 4 :] if end >= 0 else b""
    return rest if rest.strip(b"\r\n") else b""


class Handler(JsonErrors):
    """aiohttp's connection whose writes' waits for the client are watched (`Stall`), whose reads
    of a request are timed (the receive timeout), and whose own answers to what it cannot parse
    are the service's JSON errors (`malformed.JsonErrors`); each cut counted in its server's
    `Cuts`."""

    __slots__ = (
        "_body",
        "_closed_stall",
        "_cuts",
        "_got",
        "_head_since",
        "_receive_timeout_s",
        "_receiving",
        "_seen",
        "_send_timeout_s",
        "_start",
    )

    def __init__(self, manager: Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._send_timeout_s = manager.send_timeout_s
        self._cuts = manager.cuts
        self._closed_stall: Stall | None = None
        """The watch on its close, which waits for the client to read what is left of its
        answer: one that reads nothing would hold it for good."""
        self._receive_timeout_s = manager.receive_timeout_s
        self._receiving: asyncio.TimerHandle | None = None
        """The receive timeout's timer, while a read is incomplete (`_received`)."""
        self._head_since: float | None = None
        """When the head now coming began; None when none is."""
        self._body: StreamReader | None = None
        """The body of the last request parsed, while it has not all come."""
        self._got = 0
        """The bytes received so far (a compressed or chunked body's own, not what they make)."""
        self._seen = -1
        """`_got` when a body coming was last looked at (-1: look again before judging it)."""
        self._start = b""
        """The first bytes of the head coming (`START` at most): its request line names its path."""

    async def start(self) -> None:
        try:
            await super().start()
        finally:  # it closed the connection after its last answer (unless `force_close` did)
            self._watch_close()

    def force_close(self) -> None:  # the keep-alive timeout's close, among others
        self._watch_close()
        super().force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)  # its `force_close` first: no watch outlives the connection
        if self._closed_stall is not None:
            self._closed_stall.cancel()
            self._closed_stall = None
        if self._receiving is not None:
            self._receiving.cancel()
            self._receiving = None
        self._body = None

    def data_received(self, data: bytes) -> None:
        count, body = self._request_count, self._body
        self._got += len(data)
        if body is None and self._head_since is None:  # a head begins here (its request line)
            self._start = bytes(data[:START])
        elif body is None and len(self._start) < START:  # more of a head begun
            self._start += data[: START - len(self._start)]
        super().data_received(data)
        if self._request_count != count:  # a head ended here: its body comes next, if it has one
            self._head_since = None
            message, payload = self._messages[-1]  # the last one parsed (taken in a later turn)
            if payload.is_eof():
                self._body = None
                begun = _head_after(data, message)
                if not begun:
                    return  # whole, and nothing after it
                self._start, self._head_since = begun[:START], self._loop.time()  # pipelined
            self._body = payload
            # a timer armed before it (its head's) fires sooner than a period of the body
            self._seen = -1 if self._receiving is not None else self._got
        elif body is not None:  # more of a body
            if body.is_eof():
                self._body = None
                return  # it ended here (what may follow it, as above)
        elif data and self._head_since is None:  # a head begun, all of this read
            self._head_since = self._loop.time()
        else:
            return
        if self._receiving is None:
            self._receiving = self._loop.call_later(self._receive_timeout_s, self._received)

    def began(self, since: float) -> None:
        """The head coming was begun before this connection was handed to it (by the fast path,
        at `since`): it is timed from there, as it was, not from the hand-off."""
        if self._head_since is None or since >= self._head_since:
            return
        self._head_since = since
        if self._receiving is not None:
            self._receiving.cancel()
        self._receiving = self._loop.call_at(since + self._receive_timeout_s, self._received)

    def _received(self) -> None:
        """The receive timeout's timer: a request coming too slowly is answered 408; else it is
        armed again while one is coming."""
        self._receiving = None
        transport = self.transport
        if transport is None or transport.is_closing():  # closed, or closing after its answer
            return
        loop, limit_s = self._loop, self._receive_timeout_s
        since = self._head_since
        if since is not None:  # a head coming
            if self._request_in_progress:  # after a request being answered: read after it
                self._receiving = loop.call_later(limit_s, self._received)
            elif loop.time() - since >= limit_s:
                self._timed_out(transport, head=True)
            else:
                self._receiving = loop.call_at(since + limit_s, self._received)
            return
        body = self._body
        if body is None:
            return
        if body.is_eof():
            self._body = None
            return
        request = self._current_request
        if (
            self._got == self._seen
            and request is not None
            and request.content is body  # its own request's turn (not the one before it)
            and not request.writer.output_size  # nothing answered yet (one answered without it)
            and transport.is_reading()  # not held back by the server (its buffer full)
        ):
            self._timed_out(transport, head=False)
            return
        self._seen = self._got
        self._receiving = loop.call_later(limit_s, self._received)

    def _timed_out(self, transport: asyncio.Transport, *, head: bool) -> None:
        request = self._current_request
        # the path as the app routes by it (decoded, an absolute-form target's): `path_of`'s
        path = path_of(self._start) if head or request is None else request.path
        refuse_late(transport, head, self._receive_timeout_s, self._cuts.receive_timeout, path)
        self.force_close()  # its request, if one is answered, ends as for a client that left

    def _process_keepalive(self) -> None:
        if self._head_since is not None and self._receiving is not None:
            # a head coming is not an idle connection: it is the receive timeout's (looked at again after it)
            self._keepalive_handle = self._loop.call_later(self._receive_timeout_s, self._process_keepalive)
            return
        super()._process_keepalive()

    def _watch_close(self) -> None:
        transport = self.transport
        if transport is not None and self._closed_stall is None and transport.get_write_buffer_size():
            self._closed_stall = Stall(self._loop, transport, self._send_timeout_s, self._cuts.send_timeout)

    async def _drain_helper(self) -> None:
        # `StreamWriter.drain` calls it only when writing is paused: a write that waits
        transport = self.transport
        if transport is None or not self._paused:
            await super()._drain_helper()
            return
        stall = Stall(self._loop, transport, self._send_timeout_s, self._cuts.send_timeout)
        try:
            await super()._drain_helper()
        finally:
            stall.cancel()

    def refused(self) -> None:  # a request its parser refused, answered 400 (`JsonErrors`)
        self._cuts.malformed.inc()

    def path(self) -> str:  # the path of the head it refused, when its request line came (`JsonErrors`)
        return path_of(self._start)


class Server(web.Server):
    """aiohttp's `Server` whose connections are `Handler`s, counting their cuts in `cuts`."""

    def __init__(
        self, *args: Any, send_timeout_s: float, receive_timeout_s: float, cuts: Cuts, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.send_timeout_s = send_timeout_s
        self.receive_timeout_s = receive_timeout_s
        self.cuts = cuts

    def __call__(self) -> Handler:
        return Handler(self, loop=self._loop, **self._kwargs)


_HANDLER_PRIVATE = (
    "_drain_helper",
    "_paused",
    "_loop",
    "_request_count",
    "_messages",
    "_current_request",
    "_request_in_progress",
    "_process_keepalive",
    "_keepalive_handle",
)
"""What `Handler` uses of aiohttp's `RequestHandler` (its `BaseProtocol`) that is private."""


def install(app: web.Application, send_timeout_s: float, receive_timeout_s: float, cuts: Cuts) -> None:
    """Make `app`'s server (`Application._make_handler`, what any runner calls) a `Server`,
    whose connections count their cuts in `cuts` (the app's metrics').

    It is made from aiohttp's own (its `_loop` and `_kwargs`, private): an aiohttp that lacks
    what it reads, here or of a connection, keeps its own server, said in one log line, without
    the send and receive timeouts on its connections, nor their JSON errors and their counts
    (the fast path's own keep theirs)."""
    usual = app._make_handler

    def make_handler(**kwargs: Any) -> web.Server:
        server = usual(**kwargs)
        lacking = [
            name
            for name in ("_loop", "_kwargs", "request_factory", "handler_cancellation")
            if not hasattr(server, name)
        ] + [f"RequestHandler.{name}" for name in _HANDLER_PRIVATE if not _has(name)]
        if lacking:
            log.warning(
                "aiohttp's server lacks %s: its connections have no send or receive timeout",
                ", ".join(lacking),
            )
            return server
        return Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            send_timeout_s=send_timeout_s,
            receive_timeout_s=receive_timeout_s,
            cuts=cuts,
            **server._kwargs,
        )

    object.__setattr__(app, "_make_handler", make_handler)


def _has(name: str) -> bool:
    """`RequestHandler` has `name` (an attribute of its class, or a slot of its instances)."""
    return any(
        name in vars(kind) or name in getattr(kind, "__slots__", ()) for kind in RequestHandler.__mro__
    )

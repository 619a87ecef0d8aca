"""The send timeout (`SWITCHBOARD_SEND_TIMEOUT_S`): a client that takes nothing of its answer for
that long is let go of, as one that went away.

A write to a client waits while the connection's buffer is over its limit (flow control: the
transport's `pause_writing`, aiohttp's `drain`), so a slow client holds the relay back, not the
service's memory. A client that stops reading with its connection open would hold it forever:
its request's task, its upstream connection, its `max_parallel` slot and budget reservation.
So a write that waits is watched (`Stall`), and only then: a timer a wait, none a chunk. When
the client has taken nothing of the buffer for the whole timeout, the connection is aborted;
the request ends as for a client that went away (its task cancelled, the upstream let go, the
reservation settled and recorded as the ledger records a client that left: docs/reference.md §13).

A slow client that reads is never cut: each time the timer fires, a buffer smaller than when
it was armed (the client took some) arms it again. (nginx's `send_timeout` is the same idea.)

Both servers have it: the gateway's own (`service.http.fast`, whose `Outlet` is its own
`drain`) and aiohttp's, whose connections are made by `Server` here as `Handler`s (a
`RequestHandler` whose `drain` is watched) — the connections the fast path hands to aiohttp too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from service.http.malformed import JsonErrors

log = logging.getLogger(__name__)


class Stall:
    """A wait for a client to read its connection's buffer down, limited to `limit_s` without
    progress: then the connection is aborted (`transport.abort`: its buffer will never go out,
    so `close` would wait for it forever). `cancel` when the wait ends."""

    __slots__ = ("_handle", "_left", "_limit_s", "_loop", "_transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, limit_s: float) -> None:
        self._loop = loop
        self._transport = transport
        self._limit_s = limit_s
        self._left = transport.get_write_buffer_size()
        """What the client had yet to take when last looked: nothing is added while it waits."""
        self._handle = loop.call_later(limit_s, self._fire)

    def cancel(self) -> None:
        self._handle.cancel()

    def _fire(self) -> None:
        transport = self._transport
        if transport.is_closing() and not transport.get_write_buffer_size():  # aborted, or gone
            return
        left = transport.get_write_buffer_size()
        if left < self._left:  # it took some: a slow client, not a gone one
            self._left = left
            self._handle = self._loop.call_later(self._limit_s, self._fire)
            return
        peer = transport.get_extra_info("peername")
        log.warning(
            "client %s took nothing of its answer for %g s (SWITCHBOARD_SEND_TIMEOUT_S): "
            "closing its connection, as a client that went away",
            peer[0] if isinstance(peer, tuple) and peer else "?",
            self._limit_s,
        )
        transport.abort()


class Handler(JsonErrors):
    """aiohttp's connection whose writes' waits for the client are watched (`Stall`), and whose
    own answers to what it cannot parse are the service's JSON errors (`malformed.JsonErrors`)."""

    __slots__ = ("_closed_stall", "_send_timeout_s")

    def __init__(self, manager: Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._send_timeout_s = manager.send_timeout_s
        self._closed_stall: Stall | None = None
        """The watch on its close, which waits for the client to read what is left of its
        answer: one that reads nothing would hold it for good."""

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

    def _watch_close(self) -> None:
        transport = self.transport
        if transport is not None and self._closed_stall is None and transport.get_write_buffer_size():
            self._closed_stall = Stall(self._loop, transport, self._send_timeout_s)

    async def _drain_helper(self) -> None:
        # `StreamWriter.drain` calls it only when writing is paused: a write that waits
        transport = self.transport
        if transport is None or not self._paused:
            await super()._drain_helper()
            return
        stall = Stall(self._loop, transport, self._send_timeout_s)
        try:
            await super()._drain_helper()
        finally:
            stall.cancel()


class Server(web.Server):
    """aiohttp's `Server` whose connections are `Handler`s."""

    def __init__(self, *args: Any, send_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_timeout_s = send_timeout_s

    def __call__(self) -> Handler:
        return Handler(self, loop=self._loop, **self._kwargs)


_HANDLER_PRIVATE = ("_drain_helper", "_paused", "_loop")
"""What `Handler` uses of aiohttp's `RequestHandler` (its `BaseProtocol`) that is private."""


def install(app: web.Application, send_timeout_s: float) -> None:
    """Make `app`'s server (`Application._make_handler`, what any runner calls) a `Server`.

    It is made from aiohttp's own (its `_loop` and `_kwargs`, private): an aiohttp that lacks
    what it reads, here or of a connection, keeps its own server, said in one log line, without
    the send timeout on its connections (the fast path's own keep theirs)."""
    usual = app._make_handler

    def make_handler(**kwargs: Any) -> web.Server:
        server = usual(**kwargs)
        lacking = [
            name
            for name in ("_loop", "_kwargs", "request_factory", "handler_cancellation")
            if not hasattr(server, name)
        ] + [f"RequestHandler.{name}" for name in _HANDLER_PRIVATE if not _has(name)]
        if lacking:
            log.warning("aiohttp's server lacks %s: its connections have no send timeout", ", ".join(lacking))
            return server
        return Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            send_timeout_s=send_timeout_s,
            **server._kwargs,
        )

    object.__setattr__(app, "_make_handler", make_handler)


def _has(name: str) -> bool:
    """`RequestHandler` has `name` (an attribute of its class, or a slot of its instances)."""
    return any(
        name in vars(kind) or name in getattr(kind, "__slots__", ()) for kind in RequestHandler.__mro__
    )

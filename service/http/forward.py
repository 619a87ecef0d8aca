"""A follower's connections that are not the gateway's relayed calls, piped to the leader
(`serve --workers N`, docs/reference.md §3.2).

`Forwarder(path)` is given a client's transport and the bytes of it not yet answered (the fast
path's hand-off, `FastConnection._hand_off`): it connects to the leader's private Unix socket,
writes those bytes, and from then on copies bytes both ways, raw, for the rest of the
connection, so that the leader's aiohttp answers it as if the client had connected to it.
Each side's reading pauses while the other's writing is over its limit (the slower side sets
the pace), a half-close is passed on, and either side closing closes the other once what it
was sent is written. A leader that cannot be reached closes the client's connection (the
follower has nothing of its own to answer with: the next connection may land on another).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import cast

from service.http.stalls import Stall
from service.loop_metrics import Count

log = logging.getLogger(__name__)


class _Side(asyncio.Protocol):
    """One end of a pipe: what it reads is written to `peer`."""

    def __init__(self, pipe: _Pipe, *, client: bool = False) -> None:
        self.pipe = pipe
        self.client = client
        """The client's end (the other: the leader's)."""
        self.stall: Stall | None = None
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.ended = False
        """Whether this end sent its EOF (half-closed): both ends' close the pipe."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write(data)
        else:
            self.pipe.waiting += data  # the leader's end not connected yet
            if self.transport is not None and len(self.pipe.waiting) > _MOST:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.ended = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if peer.ended:  # both ends are done sending: the connection is over (closed both ways)
                peer.transport.close()
                return False
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
                return True  # half-closed: the answer still comes back
            peer.transport.close()
        elif peer is None:
            self.pipe.eof = True
            return True
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.pipe.ended(self)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            transport = peer.transport
            transport.close()  # once what it was sent is written...
            if transport.get_write_buffer_size():  # ...within the send timeout, as any answer
                asyncio.get_running_loop().call_later(self.pipe.send_timeout_s, transport.abort)
        elif peer is None:
            self.pipe.lost = True

    def pause_writing(self) -> None:
        if self.client and self.transport is not None:  # a client that takes nothing is let go of
            self.stall = Stall(
                asyncio.get_running_loop(), self.transport, self.pipe.send_timeout_s, _UNCOUNTED
            )
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()


_UNCOUNTED = Count()
"""A series of no metric: a stalled client's cut is counted by the leader (whose end stalls in
turn), not here too."""
_MOST = 1 << 20
"""Bytes of a client held while the leader's end connects, at most, before its reading pauses."""


class _Pipe:
    def __init__(self, ended: Callable[[_Side], None], send_timeout_s: float) -> None:
        self.send_timeout_s = send_timeout_s
        self.waiting = bytearray()
        self.eof = False
        self.lost = False
        self.ended = ended
        """Called with each side whose connection is lost."""


class _Whole(asyncio.Protocol):
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.forwarder(cast(asyncio.Transport, transport), b"")


class Forwarder:
    """Pipes connections to the Unix socket at `path` (the leader's)."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop, *, send_timeout_s: float) -> None:
        self.path = path
        self.send_timeout_s = send_timeout_s
        """A side closed, the other is given this long to take what it was sent (then let go of)."""
        self.loop = loop
        self.failed = 0
        """Connections closed because the leader could not be reached."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: set[_Side] = set()
        """The client's side of each pipe not yet closed."""
        self._none_open = asyncio.Event()

    @property
    def open(self) -> int:
        """Pipes not yet closed."""
        return len(self._clients)

    def _ended(self, side: _Side) -> None:
        self._clients.discard(side)
        if not self._clients:
            self._none_open.set()

    def __call__(self, transport: asyncio.Transport, data: bytes) -> None:
        """Pipe `transport` (a client's, from now on this pipe's) to the leader, `data` first."""
        pipe = _Pipe(self._ended, self.send_timeout_s)
        client = _Side(pipe, client=True)
        self._clients.add(client)
        self._none_open.clear()
        client.transport = transport
        transport.set_protocol(client)
        pipe.waiting += data
        task = self.loop.create_task(self._connect(pipe, client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, pipe: _Pipe, client: _Side) -> None:
        try:
            _, leader = await self.loop.create_unix_connection(lambda: _Side(pipe), self.path)
        except OSError as exc:
            self.failed += 1
            log.warning("workers: the leader cannot be reached (%s): a connection closed", type(exc).__name__)
            if client.transport is not None:
                client.transport.abort()
            return
        transport = client.transport
        if transport is None or pipe.lost:  # the client left meanwhile
            if leader.transport is not None:
                leader.transport.close()
            return
        client.peer, leader.peer = leader, client
        out = leader.transport
        if out is None:  # the leader closed it at once
            transport.close()
            return
        if pipe.waiting:
            out.write(bytes(pipe.waiting))
            pipe.waiting.clear()
        if pipe.eof and out.can_write_eof():
            out.write_eof()
        if not transport.is_reading():
            transport.resume_reading()

    def protocol(self) -> asyncio.Protocol:
        """A protocol that pipes its whole connection (a follower without the fast path)."""
        return _Whole(self)

    async def aclose(self, timeout_s: float = 0.0) -> None:
        """The service is stopping (no new connection comes): wait up to `timeout_s` for each
        pipe to be closed (the leader closes each once it answered the request in it, as at
        its own stop), then close the rest."""
        loop = self.loop
        deadline = loop.time() + timeout_s
        if self._clients:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_open.wait(), max(0.0, deadline - loop.time()))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in list(self._clients):
            if client.transport is not None:
                client.transport.abort()
        self._clients.clear()

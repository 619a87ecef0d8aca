"""A client that stalls, on either side of its request: it is let go of.

The send timeout (`SWITCHBOARD_SEND_TIMEOUT_S`): a client that takes nothing of its answer for
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

The receive timeout (`SWITCHBOARD_RECEIVE_TIMEOUT_S`): a client that trickles its request (a
head that never ends, a body that stops coming) would hold its connection, and its socket, for
good: a few hundred such clients exhaust the service's open files (slowloris). A request whose
head has not ended within the timeout of its first byte, or whose body sent nothing for a whole
period of it (it is cut between one and two periods after its last byte), is answered 408
and its connection closed, one log line saying so (`refuse_late`). Nothing of the request has
happened: a handler reads its body before it acts on it (its authentication aside), so no call
was made, nothing metered, counted or recorded, and the handler waiting for it ends as for a
client that left. Only a read that is incomplete is timed (a request that comes whole in one
read arms nothing), and an idle connection between requests is the keep-alive's, as before. A
body that comes on, however slowly, is never cut, nor one the server is not reading (its buffer
full, the request before it still answered, or one answered without it). (nginx's
`client_header_timeout` and `client_body_timeout` are the same idea.)

Both servers have both: the gateway's own (`service.http.fast`, whose `Outlet` is its own
`drain`, and whose connection times what it reads itself) and aiohttp's, whose connections are
made by `connections.Server` as `connections.Handler`s (a `RequestHandler` whose `drain` is watched, and whose
reads are timed) — the connections the fast path hands to aiohttp too.

Each cut is counted in the app's metrics (`switchboard_http_cut_total`, by reason:
`receive_timeout`, `send_timeout`, and `malformed` for a request aiohttp's parser refused):
the server is given the app's `metrics.Cuts`, and its connections keep it, adding to it only
when they cut one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from email.utils import formatdate

from aiohttp.http import SERVER_SOFTWARE

from service.errors import RequestTimeout
from service.http.malformed import shaped
from service.loop_metrics import Count

log = logging.getLogger(__name__)


class Stall:
    """A wait for a client to read its connection's buffer down, limited to `limit_s` without
    progress: then the connection is aborted (`transport.abort`: its buffer will never go out,
    so `close` would wait for it forever), and counted in `cut` (`Cuts.send_timeout`). `cancel`
    when the wait ends."""

    __slots__ = ("_cut", "_handle", "_left", "_limit_s", "_loop", "_transport")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, limit_s: float, cut: Count
    ) -> None:
        self._loop = loop
        self._transport = transport
        self._limit_s = limit_s
        self._cut = cut
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
        log.warning(
            "client %s took nothing of its answer for %g s (SWITCHBOARD_SEND_TIMEOUT_S): "
            "closing its connection, as a client that went away",
            _peer(transport),
            self._limit_s,
        )
        self._cut.inc()
        transport.abort()


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


def refuse_late(transport: asyncio.Transport, head: bool, limit_s: float, cut: Count, path: str = "") -> None:
    """Answer 408 to a request that did not come within `limit_s` (its `head` did not end, or
    its body stopped), count it (`cut`) and log it in one line: its client's address, nothing it
    sent. `path` is the request's, when its request line came (`path_of`): it chooses the
    answer's shape (`_answer`). Both servers' connections call it, each
    closing itself after."""
    log.warning(
        "client %s %s (SWITCHBOARD_RECEIVE_TIMEOUT_S): answered 408, its connection closed",
        _peer(transport),
        f"did not end its request's head within {limit_s:g} s"
        if head
        else f"sent nothing of its request's body for {limit_s:g} s",
    )
    cut.inc()
    transport.write(_answer(path))


START = 512
"""How much of a request's first bytes a connection keeps while its head comes (`path_of`):
enough for the request line of any gateway path."""
_TIMED_OUT = RequestTimeout("the request did not come within the server's receive timeout")


def _answer(path: str) -> bytes:
    """The 408 to a request that did not come in time, whole: the server's own answer (no route
    is chosen), as an error's JSON (`{"error": {"type", "message"}}`), after which the connection
    is closed (`Connection: close`). On a gateway path (its request line came) it carries the
    gateway's headers, and on Anthropic's Messages paths it comes in Anthropic's shape
    (`{"type": "error", "error": {...}}`), as every error there does (`malformed.shaped`;
    docs/reference.md §14)."""
    error, headers = shaped(_TIMED_OUT, _TIMED_OUT.status, path)
    body = json.dumps(error).encode()
    fields = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers.items())
    return (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: %d\r\nDate: %s\r\nServer: %s\r\nConnection: close\r\n"
        b"%sX-Content-Type-Options: nosniff\r\n\r\n%s"
        % (len(body), formatdate(usegmt=True).encode(), SERVER_SOFTWARE.encode(), fields, body)
    )

"""An answer read on a connection of the lean upstream client (`exchange.Connection`): its head
as parsed, its body read within its bounds and deadlines, inflated when gzip or deflate.

- **Deadlines**: `read` and `readany` take one for the body (the loop's clock). A wait arms
  one `loop.call_at` timer, cancelled when it wakes; nothing is armed when nothing is waited
  for (a body that came with its head). A stream's silences (`readany`'s `within`, a wait a
  chunk) share one timer, moved on only when it fires early (`Response._silenced`).
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Protocol

from multidict import CIMultiDict

from service.gateway.transports.errors import BrokenOff, Disconnected, TooLarge

_INFLATE_PIECE = 1 << 20
_CODINGS = frozenset(
    ("br", "zstd", "compress", "x-compress", "dcb", "dcz", "aes128gcm", "exi", "pack200-gzip")
)
"""Content codings named in a refusal (IANA's registry); another value is the upstream's own
text, which may quote the request's key (docs/reference.md §2.4): not repeated."""


class Carrier(Protocol):
    """What an answer needs of the connection it is read on (`exchange.Connection`): its loop,
    whether its reading is paused, and to resume it or drop it."""

    loop: asyncio.AbstractEventLoop
    paused: bool

    def resume(self) -> None: ...

    def abort(self) -> None: ...


class Response:
    """An answer whose head was read; its body comes with `read` or `readany`.

    Its `headers` are the answer's `exchange.KEPT` ones, their names in lower case."""

    __slots__ = (  # one per exchange: made in half the time without a __dict__
        "_buffered",
        "_chunks",
        "_complete",
        "_connection",
        "_deflate",
        "_delimited",
        "_error",
        "_fields",
        "_headed",
        "_inflated",
        "_inflater",
        "_length",
        "_limit",
        "_loop",
        "_news",
        "_pending",
        "_silent_at",
        "_size",
        "_timer",
        "_timer_at",
        "_waiter",
        "headers",
        "received",
        "status",
    )

    def __init__(self, connection: Carrier) -> None:
        self._connection: Carrier | None = connection
        self._loop = connection.loop
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
        self._silent_at: float | None = None
        """The deadline of the silence being waited out (`readany`'s `within`); None: no such wait."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        """When `_timer`, the silences' one timer, fires."""
        self._inflater: zlib._Decompress | None = None
        self._pending = b""
        self._inflated = False
        self._deflate = False
        self._news = False
        """Something for the reader came in the bytes being parsed: it is woken once they are."""
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
            named = f" ({encoding})" if encoding in _CODINGS else ""  # never any text of the upstream's
            self._fail(BrokenOff(f"the upstream's answer is in an encoding not asked for{named}"))
            return
        self._headed = True
        self._news = True

    def _on_complete(self) -> None:
        self._complete = True
        self._connection = None
        self._news = True

    def _on_eof(self, clean: bool) -> None:
        if self._complete or self._error is not None:
            return
        if self._headed and not self._delimited and clean:  # no length: the body ends with the connection
            self._on_complete()
            self._wake()
        elif self._headed:
            self._fail(BrokenOff("the upstream broke off its answer"))
        else:
            self._fail(Disconnected())

    # -- read by the caller ----------------------------------------------------------------

    async def _until(self, deadline: float | None) -> None:
        """Wait for the connection's next event; `TimeoutError` once the loop's clock passes
        `deadline` (None: no limit).

        One `call_at` timer fails the waiter, and is cancelled on waking: about half the cost of
        `asyncio.timeout_at` or `wait_for`, on every wait of every exchange. The loop is the
        connection's (`asyncio.get_running_loop` makes a system call each time)."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            del waiter  # failed (`_expire`), it holds its error, whose traceback holds this frame: a cycle

    def _silenced(self) -> None:
        """The silences' timer fired (`readany`'s waits with `within`, one a chunk of a stream).

        Arming a timer and cancelling it cost more than the rest of a wait (~2.2 µs on uvloop),
        and a stream waits once a chunk, each wait's deadline a little later than the last's.
        So one timer serves them all: it is left armed when a wait ends; when it fires and the
        wait then under way has a later deadline, it is armed again for that (once a silence's
        length, not once a chunk). A wait whose deadline comes before it moves it earlier. A
        wait still fails with `TimeoutError` at its own deadline, as `_until`'s would."""
        at, waiter = self._silent_at, self._waiter
        if at is None or waiter is None or waiter.done():  # no silence waited out now: the next arms one
            self._timer = None
        elif at > self._timer_at:  # a later wait's: its deadline is still to come
            self._timer = self._loop.call_at(at, self._silenced)
            self._timer_at = at
        else:
            self._timer = None
            waiter.set_exception(TimeoutError())

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
                connection = self._connection
                if connection is not None and connection.paused:
                    connection.resume()
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
                continue
            loop = self._loop  # a silence, timed from the last bytes that came (`_silenced`)
            at = loop.time() + within
            if deadline is not None and deadline < at:
                at = deadline
            waiter = self._waiter = loop.create_future()
            self._silent_at = at
            timer = self._timer
            if timer is None or self._timer_at > at:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(at, self._silenced)
                self._timer_at = at
            try:
                await waiter  # here, not in a coroutine of its own: one frame fewer to resume a chunk
            finally:
                self._waiter = None
                self._silent_at = None
                del waiter  # as in `_until`: a failed one would be a cycle with this frame

    @property
    def ended(self) -> bool:
        """The whole answer is read and taken: `readany` has nothing more to give (b"")."""
        return self._complete and self._error is None and not self._chunks and not self._pending

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        error = self._error
        if error is None and not self._complete:
            self._fail(BrokenOff("closed"))
            return
        if error is not None:
            # raised by a read, its traceback holds the frames that read this answer (this one,
            # the exchange's body too): a cycle, once its reader is done with it (it closes it)
            error.__traceback__ = None
        self._wake()  # what `_fail` does then, without making an error that goes nowhere (every stream's end)

    release = close


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # else woken already, in the same turn of the loop
        waiter.set_exception(TimeoutError())

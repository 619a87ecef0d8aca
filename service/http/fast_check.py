"""The fast path's check at start (`unlike_aiohttp`): that what it uses of aiohttp, private
names among them, makes the requests and answers aiohttp's own server would. Anything amiss
turns the fast path off (`fast_site.missing`), and aiohttp's server answers everything."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

from service.http import fast_request
from service.metrics import Cuts


def unlike_aiohttp() -> str | None:
    """What is amiss in a request and an answer of the fast path made once, at start, with what
    it uses of aiohttp (`HeadersMixin`, `_serialize_headers`, the `Date`, and for a stream
    `StreamResponse` and `StreamWriter`): None when they are as aiohttp's. Run in the loop."""
    fields = CIMultiDictProxy(
        CIMultiDict({"Host": "h", "Content-Type": "Application/JSON; charset=utf-8", "Content-Length": "2"})
    )
    try:
        request = fast_request.FastRequest(None, "/", fields, b"{}", None, HttpVersion11, True)  # type: ignore[arg-type]
        if request.content_type != "application/json":
            return f"content_type {request.content_type!r}"
        if request.content_length != 2:
            return f"content_length {request.content_length!r}"
        answer = fast_request.serialized(request, web.Response(body=b"{}", content_type="application/json"))
        amiss = _private_unlike_public()
    except Exception as exc:
        return repr(exc)
    if amiss is not None:
        return amiss
    date = (answer or b"").partition(b"\r\nDate: ")[2].partition(b"\r\n")[0]
    expected = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nDate: %s\r\n"
        b"Server: %s\r\n\r\n{}" % (date, SERVER_SOFTWARE.encode())
    )
    if not date or answer != expected:
        return f"an answer {answer!r}"
    try:
        return _stream_unlike_aiohttp(fields)
    except Exception as exc:
        return f"a stream: {exc!r}"


def _private_unlike_public() -> str | None:
    """Which private attribute of aiohttp's `Response` that `serialized` reads is not what its
    property gives (None: each is), on answers as the relay makes them and as it does not."""
    plain = web.Response(body=b"{}", status=201, reason="Made", headers={"x-a": "1"})
    closed = web.Response(text="t", status=422)
    closed.force_close()
    closed.enable_compression()
    chunked = web.Response(body=b"")
    chunked.enable_chunked_encoding()
    for response in (plain, closed, chunked):
        pairs = {
            "_status": (response._status, response.status),
            "_reason": (response._reason, response.reason),
            "_headers": (response._headers, response.headers),
            "_body": (response._body, response.body),
            "_keep_alive": (response._keep_alive, response.keep_alive),
            "_chunked": (response._chunked, response.chunked),
            "_compression": (response._compression, response.compression),
            "_eof_sent, _payload_writer": (
                response._eof_sent or response._payload_writer is not None,
                response.prepared,
            ),
        }
        for name, (private, public) in pairs.items():
            if private is not public and private != public:
                return f"Response.{name} {private!r}, not {public!r}"
    return None


class Recorder:
    """What aiohttp's `StreamWriter` calls of a transport, keeping what it is given."""

    def __init__(self) -> None:
        self.written = bytearray()

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks: list[bytes]) -> None:
        self.written += b"".join(chunks)


def _ran(coroutine: Coroutine[Any, Any, Any]) -> bool:
    """Run `coroutine` until it waits (False) or ends (True), without a loop's turn."""
    try:
        coroutine.send(None)
    except StopIteration:
        return True
    return False


def _stream_unlike_aiohttp(fields: CIMultiDictProxy[str]) -> str | None:
    """What is amiss in a stream written by aiohttp's `StreamResponse` and `StreamWriter` onto an
    `Outlet`: its bytes, and a write over the buffer's limit waiting while the outlet is
    `blocked` (what they read of a request and a connection, private, is as the fast path has it),
    and its `body_length` told once its end is written, not before."""
    outlet = fast_request.Outlet()
    outlet.transport = cast(asyncio.Transport, recorder := Recorder())
    outlet.loop, outlet.blocked, outlet.drained = asyncio.get_running_loop(), False, None
    outlet.send_timeout_s = 60.0  # its wait is watched too (and unwatched once it ends)
    outlet.cuts = Cuts()  # counted nowhere
    request = fast_request.FastRequest(None, "/", fields, b"{}", None, HttpVersion11, True, outlet)  # type: ignore[arg-type]
    answer = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/event-stream"})
    much = b"x" * 0x10001  # over `StreamWriter.write`'s limit: it drains
    if not _ran(answer.prepare(cast(web.Request, request))):
        return "a stream's head waits"
    outlet.blocked = True
    writing = answer.write(much)
    if _ran(writing) or outlet.drained is None:
        return "a stream's write does not wait for a blocked connection"
    outlet.unblock()
    if not _ran(writing):
        return "a stream's write waits for an unblocked connection"
    if answer.body_length:  # told once its end is written: `FastConnection._relay` reads it
        return "a stream's body_length is told before its end"
    if not _ran(answer.write_eof(b"end")):
        return "a stream's end waits for an unblocked connection"
    if not answer.body_length:
        return "a stream's body_length is not told at its end"
    date = recorder.written.partition(b"\r\nDate: ")[2].partition(b"\r\n")[0]
    expected = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Date: %s\r\nServer: %s\r\n\r\n10001\r\n%s\r\n3\r\nend\r\n0\r\n\r\n"
        % (date, SERVER_SOFTWARE.encode(), much)
    )
    return None if date and recorder.written == expected else f"a stream {bytes(recorder.written[:300])!r}"

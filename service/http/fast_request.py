"""A request of the fast path (service/http/fast.py) as the gateway's code reads it, and its
answer's bytes as aiohttp writes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, helpers, http_writer, web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from aiohttp.helpers import HeadersMixin
    from aiohttp.web_urldispatcher import UrlMappingMatchInfo
else:  # not in `aiohttp.helpers.__all__`: without it, `unlike_aiohttp` tells and the fast path is off
    HeadersMixin = getattr(helpers, "HeadersMixin", object)


def _absent(*args: Any) -> Any:
    raise RuntimeError("a private name of aiohttp the fast path uses is gone from this aiohttp")


_serialize_headers: Callable[[str, Any], bytes] = getattr(http_writer, "_serialize_headers", _absent)
"""aiohttp's own writer of a status line and fields (private): without it (`_absent`), the
fast path is off (`fast.missing`) and aiohttp's server answers everything."""
rfc822_formatted_time: Callable[[], str] = getattr(helpers, "rfc822_formatted_time", _absent)
"""aiohttp's `Date` (not in `aiohttp.helpers.__all__`)."""


class FastRequest(HeadersMixin):
    """What the gateway's code reads of an `aiohttp.web.Request`, for a request of the fast path:
    `app`, `method`, `path`, `headers`, `host`, `content_type`, `content_length`, `body_exists`,
    `content`, `match_info`, `keep_alive`, `version`, and a mapping of its own (`request[CLIENT]`)."""

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
    ) -> None:
        self.app = app
        self.path = path
        self._headers = self.headers = headers
        self.content = self  # what `openai_api.arrived` reads: `is_eof`, `read_nowait`
        self.body = body
        self.match_info = match_info
        self.version = version
        self.keep_alive = keep_alive
        self._state: dict[Any, Any] = {}

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
    The answers' headers are the relay's own: it sets no cookie on them."""
    if type(response) is not web.Response or response.prepared or response.chunked or response.compression:
        return None
    body = response.body
    if body is not None and type(body) is not bytes:
        return None
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


def unlike_aiohttp() -> str | None:
    """What is amiss in a request and an answer of the fast path made once, at start, with what
    it uses of aiohttp (`HeadersMixin`, `_serialize_headers`, the `Date`): None when they are
    as aiohttp's."""
    fields = CIMultiDictProxy(
        CIMultiDict({"Host": "h", "Content-Type": "Application/JSON; charset=utf-8", "Content-Length": "2"})
    )
    try:
        request = FastRequest(None, "/", fields, b"{}", None, HttpVersion11, True)  # type: ignore[arg-type]
        if request.content_type != "application/json":
            return f"content_type {request.content_type!r}"
        if request.content_length != 2:
            return f"content_length {request.content_length!r}"
        answer = serialized(request, web.Response(body=b"{}", content_type="application/json"))
    except Exception as exc:
        return repr(exc)
    date = (answer or b"").partition(b"\r\nDate: ")[2].partition(b"\r\n")[0]
    expected = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nDate: %s\r\n"
        b"Server: %s\r\n\r\n{}" % (date, SERVER_SOFTWARE.encode())
    )
    return None if date and answer == expected else f"an answer {answer!r}"

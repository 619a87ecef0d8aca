"""litellm's HTTP client, carried by the gateway's own upstream session (docs/reference.md §7).

litellm sends through httpx, with a client of its own unless it is given one. It is given
one whose transport is `SessionTransport`: every request litellm makes goes out through the
gateway's pooled aiohttp session, and so keeps that session's rules (`transports.guard`): no
redirect is followed, and only allowed upstreams are connected to, checked at connect time.
The transport also bounds what is read: a non-streamed answer (and, for a stream, an answer
that is not an event stream: an error) past `SWITCHBOARD_MAX_UPSTREAM_BYTES` fails with
`TooLarge` as it is read, never held whole. Bodies are counted as they come out of
decompression, so a small gzip answer cannot inflate past the limit either.

litellm does not use the client it is given on every path (its Gemini embeddings and
Cohere chat build their own). `install` makes every client litellm builds for itself send
through `CURRENT` as well, which the litellm transport sets for the length of each call: no
path of litellm's reaches the network around the session while a gateway call runs.

Imported only with litellm (`transports.litellm`), so the direct path loads neither.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

import aiohttp
import httpx
from yarl import URL

from service.gateway.call import Call
from service.gateway.transports.base import Delivered, TooLarge

_NOT_SENT = frozenset(("host", "content-length", "transfer-encoding", "connection", "accept-encoding"))
"""Request headers aiohttp writes itself (Accept-Encoding: those it can decode)."""
_NOT_PASSED = frozenset((b"content-encoding", b"content-length", b"transfer-encoding"))
"""Answer headers that no longer describe the body once aiohttp has decoded it."""
_REDIRECT = frozenset((b"location", b"uri"))
"""Dropped from a 3xx: with nowhere named, no httpx client can follow it (docs/reference.md §7)."""
_SSE = "text/event-stream"


class SessionTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends through an aiohttp session, reading within `limit` bytes.

    `streams`: the calls it carries ask for event streams, which are read without a limit
    (docs/reference.md §7 bounds non-streamed answers); any other answer to them is still bounded.
    """

    def __init__(self, session: aiohttp.ClientSession, limit: int, *, streams: bool) -> None:
        self.session = session
        self.limit = limit
        self.streams = streams

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        call = CALL.get()
        timeouts = request.extensions.get("timeout", {})
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in _NOT_SENT]
        try:
            response = await self.session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=Delivered(body, call) if body and call is not None else body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeouts.get("connect"), sock_read=timeouts.get("read")
                ),
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc), request=request) from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        if call is not None:
            call.upstream_status = response.status
        media = response.headers.get("Content-Type", "")[: len(_SSE)].lower()  # names have no case
        streamed = self.streams and media == _SSE
        limit = None if streamed else self.limit
        encoded = "Content-Encoding" in response.headers
        if limit is not None and not encoded and (response.content_length or 0) > limit:
            response.close()
            raise TooLarge(limit)
        dropped = _NOT_PASSED | _REDIRECT if 300 <= response.status < 400 else _NOT_PASSED
        passed = [(k, v) for k, v in response.raw_headers if k.lower() not in dropped]
        return httpx.Response(
            response.status, headers=passed, stream=_Body(response, limit, request), request=request
        )


class _Body(httpx.AsyncByteStream):
    """An aiohttp answer's body as httpx reads it: decoded, counted, and closed with it."""

    def __init__(self, response: aiohttp.ClientResponse, limit: int | None, request: httpx.Request) -> None:
        self.response = response
        self.limit = limit
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        try:
            while chunk := await self.response.content.readany():
                if not size:
                    _began(self.response.status)
                size += len(chunk)
                if self.limit is not None and size > self.limit:
                    raise TooLarge(self.limit)
                yield chunk
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=self.request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=self.request) from exc
        finally:
            self._done()

    async def aclose(self) -> None:
        self._done()

    def _done(self) -> None:
        """Give the connection back when the body was read to its end; otherwise drop it."""
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()


CALL: ContextVar[Call | None] = ContextVar("switchboard_litellm_call", default=None)
"""The gateway call litellm's requests are made for (set by the litellm transport): its requests
mark it `delivered` once written, and its `upstream_status` once answered."""
CURRENT: ContextVar[SessionTransport | None] = ContextVar("switchboard_litellm_transport", default=None)
"""The transport of the gateway call running in this context (None outside one)."""
BEGAN: ContextVar[asyncio.Future[int] | None] = ContextVar("switchboard_litellm_began", default=None)
"""Told the status of the vendor's answer once the first bytes of its body came: the client's
answer to a stream may begin then, before litellm has a chunk to give (`litellm._began`)."""


def _began(status: int) -> None:
    began = BEGAN.get()
    if began is not None and not began.done():
        began.set_result(status)


class _Routed(httpx.AsyncBaseTransport):
    """The transport of a client litellm built itself: `CURRENT` while a gateway call runs,
    litellm's own transport otherwise (litellm used elsewhere in the process, as by itself)."""

    def __init__(self, own: httpx.AsyncBaseTransport | None) -> None:
        self.own = own

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        current = CURRENT.get()
        if current is not None:
            return await current.handle_async_request(request)
        if self.own is None:
            self.own = httpx.AsyncHTTPTransport()
        return await self.own.handle_async_request(request)

    async def aclose(self) -> None:
        if self.own is not None:
            await self.own.aclose()


def install(handler: Any) -> None:
    """Make every client litellm's `AsyncHTTPHandler` builds send through `CURRENT` while it is
    set. RuntimeError when litellm no longer builds its transports where this expects: the
    gateway then refuses to use litellm rather than let it send around the session."""
    build: Callable[..., httpx.AsyncBaseTransport | None] | None = getattr(
        handler, "create_async_transport", None
    )
    if build is None or not callable(build):
        raise RuntimeError("litellm's AsyncHTTPHandler.create_async_transport is gone: cannot guard litellm")
    if getattr(build, "switchboard_routed", False):
        return

    def routed(*args: Any, **kwargs: Any) -> httpx.AsyncBaseTransport:
        return _Routed(build(*args, **kwargs))

    routed.switchboard_routed = True  # type: ignore[attr-defined]
    handler.create_async_transport = staticmethod(routed)
    if hasattr(handler, "_create_async_transport"):
        handler._create_async_transport = staticmethod(routed)

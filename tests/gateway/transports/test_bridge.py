"""litellm's httpx requests sent through the gateway's aiohttp session (`transports/bridge.py`)."""

from __future__ import annotations

import aiohttp
import httpx
import pytest
from aiohttp import web

from service.gateway.transports.base import TooLarge
from service.gateway.transports.bridge import SessionTransport
from tests.support.upstreams import serving

EVENTS = b"".join(b'data: {"n": %d}\n\n' % n for n in range(200))
"""An event stream of ~2.6 KB: past the bound the test gives whole answers."""


@pytest.mark.parametrize("media", ["text/event-stream", "Text/Event-Stream; charset=utf-8"])
async def test_an_event_stream_in_any_case_is_read_without_the_bound_of_a_whole_answer(media: str) -> None:
    """docs/reference.md §7 bounds a non-streamed answer (`max_upstream_bytes`), not a stream;
    a media type's name has no case (RFC 9110 §8.3.1): `Text/Event-Stream` is a stream too (it
    was bounded as a whole answer, and a long one cut short)."""

    async def events(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(headers={"Content-Type": media})
        await answer.prepare(request)
        await answer.write(EVENTS)
        return answer

    app = web.Application()
    app.router.add_post("/v1/chat", events)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        streamed = httpx.AsyncClient(transport=SessionTransport(session, 1024, streams=True))
        async with streamed.stream("POST", f"{url}/v1/chat", content=b"{}") as response:
            assert b"".join([chunk async for chunk in response.aiter_raw()]) == EVENTS
        whole = httpx.AsyncClient(transport=SessionTransport(session, 1024, streams=False))
        with pytest.raises(TooLarge):
            async with whole.stream("POST", f"{url}/v1/chat", content=b"{}") as response:
                [chunk async for chunk in response.aiter_raw()]

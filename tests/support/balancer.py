"""A per-request round-robin reverse proxy: each request goes to the next upstream, whatever
came before (no affinity), as most HTTP load balancers do by default."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

_SESSION = web.AppKey("session", aiohttp.ClientSession)
_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length", "upgrade"}


class RoundRobin:
    """Counts what it forwarded, and to where (`sent`)."""

    def __init__(self, upstreams: Sequence[str]) -> None:
        self.upstreams = list(upstreams)
        self._next = itertools.cycle(range(len(upstreams)))
        self.sent: list[str] = []
        self.url = ""

    async def forward(self, request: web.Request) -> web.StreamResponse:
        target = self.upstreams[next(self._next)]
        self.sent.append(target)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        session = request.app[_SESSION]
        async with session.request(
            request.method, target + request.rel_url.path_qs, headers=headers, data=await request.read()
        ) as answer:
            body = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            return web.Response(status=answer.status, body=body, headers=kept)


@asynccontextmanager
async def round_robin(upstreams: Sequence[str]) -> AsyncIterator[RoundRobin]:
    """The proxy on a free loopback port, in front of `upstreams` (base URLs)."""
    proxy = RoundRobin(upstreams)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.forward)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=400)) as session:
        app[_SESSION] = session
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        proxy.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield proxy
        finally:
            await runner.cleanup()

"""A client that stops reading a stream but keeps its connection open
(service/http/stalls.py): once it has taken nothing for SWITCHBOARD_SEND_TIMEOUT_S, the
request ends as a client that went away, on the gateway's own server and on aiohttp's alike;
a slow client that reads is never cut."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import yaml
from aiohttp import web

from service.http.context import RELAY
from tests.conftest import Service, SopsProject, eventually, serve
from tests.http.test_fast_path import HAND_OFF, STREAM, _address, _exchange, _request
from tests.http.test_fast_streams import PRICING, _event, _Records
from tests.support.gateway import write_provider, write_routing
from tests.support.upstreams import serving

TOKEN = "sb-stalls-client-token-0123456789ab"
READER = "sb-stalls-reader-token-0123456789ab"
LIMIT_S = 0.3
"""The send timeout the tests run with: short, so that a stalled client is cut at once."""
PATHS = ["fast path", "aiohttp", "handed off"]
"""Where the stream is written: the gateway's own server, aiohttp's (the fast path off), or
aiohttp's on a connection the fast path handed to it."""


def _write_clients(project: SopsProject) -> None:
    """`client` (TOKEN) with a budget, so that its requests are metered and reserve; `reader`."""
    entries = [
        {
            "name": "client",
            "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
            "scopes": ["completions"],
            "limits": {"budget": {"usd": "1000000000", "period": "day"}, "max_parallel": 4},
        },
        {
            "name": "reader",
            "token_sha256": hashlib.sha256(READER.encode()).hexdigest(),
            "scopes": ["usage:read"],
        },
    ]
    path = project.providers / "clients.yaml"
    path.write_text(yaml.safe_dump({"kind": "clients", "clients": entries}, sort_keys=False))


class _Endless:
    """An upstream streaming big chunks as fast as it is read, far more than any buffer holds;
    `ended` once its handler is done (the gateway let go of it, or it wrote them all)."""

    def __init__(self, count: int = 400, size: int = 50_000) -> None:
        self.events = [_event({"choices": [{"index": 0, "delta": {"content": f"{i:05d}" + "x" * size}}]})
                       for i in range(count)]  # fmt: skip
        self.ended = asyncio.Event()
        self.whole = False

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.StreamResponse:
            try:
                await request.read()
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                for event in self.events:
                    await response.write(event)
                await response.write_eof()
                self.whole = True
                return response
            finally:
                self.ended.set()

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


@contextlib.asynccontextmanager
async def _metered(
    project: SopsProject, up: web.Application, *, fast: bool, **settings: Any
) -> AsyncIterator[tuple[Service, _Records]]:
    async with serving(up) as url:
        write_provider(
            project, "a", provider="openai", base_url=f"{url}/v1", api_key="sk-up", pricing=PRICING
        )
        write_routing(project, chat="a")
        _write_clients(project)
        async with serve(project, fast=fast, **settings) as service:
            records = _Records()
            meter = service.app[RELAY].meter
            assert meter is not None
            meter.sink = records
            yield service, records


async def _connect(service: Service) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection whose receive buffer is small, as is the server's send buffer for it,
    so that a client that stops reading fills them at once."""
    server = service.runner.server
    assert server is not None
    before = set(server.connections)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, _address(service))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    (ours,) = await eventually(lambda: [c for c in server.connections if c not in before] or False)
    assert ours.transport is not None
    ours.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return reader, writer


def _stream_request(path: str) -> bytes:
    request = _request(STREAM, token=TOKEN)
    if path != "handed off":
        return request
    head, _, body = request.partition(b"\r\n\r\n")
    return head + b"\r\n" + HAND_OFF.encode() + b"\r\n" + body


async def _used(service: Service) -> dict[str, Any]:
    status, limits = await service.get("/api/v1/llm-config/limits", token=READER)
    assert status == 200
    return cast(dict[str, Any], next(c for c in limits["clients"] if c["name"] == "client")["used"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.xfail(strict=True, reason="a stalled client holds its request forever: no send timeout yet")
async def test_a_client_that_stops_reading_is_let_go_as_one_that_left(
    sops_project: SopsProject, path: str
) -> None:
    """It reads the stream's head, then nothing, its connection open: after the send timeout the
    connection is closed, the upstream let go, the reservation settled (charged, as a client that
    left mid-stream is) and the request recorded; no 500 is written, and others are served."""
    up = _Endless()
    async with _metered(sops_project, up.app(), fast=path != "aiohttp") as (
        service,
        records,
    ):
        reader, writer = await _connect(service)
        try:
            writer.write(_stream_request(path))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            cast(asyncio.Transport, writer.transport).pause_reading()  # then reads nothing, ever
            assert head.startswith(b"HTTP/1.1 200 ")
            await eventually(lambda: len(records.kept) == 1, timeout=10)
            await asyncio.wait_for(up.ended.wait(), 10)
            assert not up.whole  # let go of, not read to its end
            used = await _used(service)
            assert (used["in_flight"], used["budget_reserved_usd"]) == (0, "0")
            cast(asyncio.Transport, writer.transport).resume_reading()
            rest = b""
            with contextlib.suppress(ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
                    rest += chunk
        finally:
            writer.close()
        (after,) = await _exchange(service, _request(token=TOKEN))
        assert after.status == 200
        assert await service.metric("switchboard_http_requests_total", status="500") == 0
    assert b"HTTP/1." not in rest and len(rest) < len(b"".join(up.events))  # cut, and nothing after
    (record,) = records.kept
    assert record.stream and record.status == 200 and record.estimated and record.cost_usd > 0

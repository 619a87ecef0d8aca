"""A client that stops reading a stream but keeps its connection open
(service/http/stalls.py): once it has taken nothing for SWITCHBOARD_SEND_TIMEOUT_S, the
request ends as a client that went away, on the gateway's own server and on aiohttp's alike;
a slow client that reads is never cut."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import yaml
from aiohttp import web

from service.http.context import RELAY
from service.http.fast import FastConnection
from service.http.fast_site import FastSite
from service.http.gateway import GATEWAY
from tests.conftest import Service, SopsProject, eventually, serve
from tests.http.test_fast_path import (
    CHAT,
    HAND_OFF,
    MESSAGES_STREAM,
    STREAM,
    _address,
    _exchange,
    _gateway,
    _request,
)
from tests.http.test_fast_streams import PRICING, _chunks, _dechunked, _event, _Records, _streaming
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


async def _connect(
    service: Service, limit: int = 1 << 24
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection whose receive buffer is small, as is the server's send buffer for it,
    so that a client that stops reading fills them at once; its reader takes from the socket up
    to twice `limit` ahead of what is read of it."""
    server = service.runner.server
    assert server is not None
    before = set(server.connections)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, _address(service))
    reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
    (ours,) = await eventually(lambda: [c for c in server.connections if c not in before] or False)
    assert ours.transport is not None
    ours.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return reader, writer


async def _rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """What the client reads once it reads again, until the server closed or cut the connection."""
    cast(asyncio.Transport, writer.transport).resume_reading()
    rest = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            rest += chunk
    return rest


def _stream_request(path: str, body: bytes = STREAM) -> bytes:
    request = _request(body, token=TOKEN)
    if path != "handed off":
        return request
    head, _, body = request.partition(b"\r\n\r\n")
    return head + b"\r\n" + HAND_OFF.encode() + b"\r\n" + body


LET_GO = {"receive_timeout": 0, "send_timeout": 1, "malformed": 0}
"""The cuts once one client was let go of by the send timeout."""
NONE_CUT = {"receive_timeout": 0, "send_timeout": 0, "malformed": 0}


async def _used(service: Service) -> dict[str, Any]:
    status, limits = await service.get("/api/v1/llm-config/limits", token=READER)
    assert status == 200
    return cast(dict[str, Any], next(c for c in limits["clients"] if c["name"] == "client")["used"])


@pytest.mark.parametrize("path", PATHS)
async def test_a_client_that_stops_reading_is_let_go_as_one_that_left(
    sops_project: SopsProject, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """It reads the stream's head, then nothing, its connection open: after the send timeout the
    connection is closed, the upstream let go, the reservation settled (charged, as a client that
    left mid-stream is) and the request recorded; no 500 is written, and others are served."""
    up = _Endless()
    async with _metered(sops_project, up.app(), fast=path != "aiohttp", send_timeout_s=LIMIT_S) as (
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
            rest = await _rest(reader, writer)
        finally:
            writer.close()
        (after,) = await _exchange(service, _request(token=TOKEN))
        assert after.status == 200
        assert await service.metric("switchboard_http_requests_total", status="500") == 0
        assert await service.cuts() == LET_GO
    assert b"HTTP/1." not in rest and len(rest) < len(b"".join(up.events))  # cut, and nothing after
    assert "took nothing of its answer for 0.3 s (SWITCHBOARD_SEND_TIMEOUT_S)" in caplog.text
    record = records.kept[0]  # the stalled stream's (the next, the request after it)
    assert record.stream and record.status == 200 and record.estimated and record.cost_usd > 0


@pytest.mark.parametrize("path", PATHS)
async def test_a_slow_client_that_reads_is_never_cut(sops_project: SopsProject, path: str) -> None:
    """It reads a little at a time, so slowly that the stream's writes wait for it far longer
    than the send timeout: it took some each time, and gets the whole stream, usage and all."""
    events = _chunks(" ".join(f"{i:05d}" + "x" * 5_000 for i in range(40)))  # ~200 kB
    async with _metered(sops_project, _streaming(events), fast=path != "aiohttp", send_timeout_s=LIMIT_S) as (
        service,
        records,
    ):
        server = service.runner.server
        assert server is not None
        reader, writer = await _connect(service, limit=4096)
        try:
            writer.write(_stream_request(path))
            got, held, longest = b"", 0.0, 0.0
            loop = asyncio.get_running_loop()
            while not got.endswith(b"\r\n0\r\n\r\n"):
                chunk = await asyncio.wait_for(reader.read(4096), 10)
                assert chunk, "cut"
                got += chunk
                waiting = any(
                    c.transport is not None and c.transport.get_write_buffer_size() > 16384
                    for c in server.connections
                )  # over asyncio's low-water mark: the writes wait for the client
                now = loop.time()
                held = (held or now) if waiting else 0.0
                longest = max(longest, now - held) if held else longest
                await asyncio.sleep(0.04)
        finally:
            writer.close()
        await eventually(lambda: len(records.kept) == 1, timeout=10)
        assert await service.cuts() == NONE_CUT
    assert longest > LIMIT_S  # the writes waited longer than the send timeout, and went on
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert _dechunked(body) == b"".join(events[:-2] + events[-1:])  # but the usage chunk
    assert records.kept[0].completion_tokens == 2 and not records.kept[0].estimated


@pytest.mark.parametrize("closing", [False, True], ids=["kept alive", "Connection: close"])
@pytest.mark.parametrize("path", PATHS)
async def test_a_client_that_reads_none_of_a_whole_answer_is_let_go(
    sops_project: SopsProject, path: str, closing: bool
) -> None:
    """A big answer that is not a stream, written whole, that its client does not read: its
    connection is closed after the send timeout rather than held for good, one the server
    closes after the answer (`Connection: close`: its close waits for the buffer) too."""
    content = "x" * 3_000_000

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        message = {"role": "assistant", "content": content}
        usage = {"prompt_tokens": 5, "completion_tokens": 2}
        return web.json_response({"id": "x", "object": "chat.completion", "model": "fake-model",
                                  "choices": [{"index": 0, "message": message}], "usage": usage})  # fmt: skip

    up = web.Application()
    up.router.add_post("/v1/chat/completions", chat)
    async with _metered(sops_project, up, fast=path != "aiohttp", send_timeout_s=LIMIT_S) as (
        service,
        records,
    ):
        server = service.runner.server
        assert server is not None
        before = set(server.connections)  # the test's own session's
        reader, writer = await _connect(service)
        try:
            request = _stream_request(path, CHAT)
            if closing:
                head, _, body = request.partition(b"\r\n\r\n")
                request = head + b"\r\nConnection: close\r\n\r\n" + body
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            cast(asyncio.Transport, writer.transport).pause_reading()
            assert head.startswith(b"HTTP/1.1 200 ")
            await eventually(lambda: not set(server.connections) - before, timeout=10)
            rest = await _rest(reader, writer)
        finally:
            writer.close()
        (after,) = await _exchange(service, _request(token=TOKEN))
        assert after.status == 200
        assert await service.cuts() == LET_GO
    assert len(rest) < len(content)
    assert records.kept[0].status == 200 and records.kept[0].completion_tokens == 2


async def test_a_connection_closed_when_idle_with_its_answer_unread_is_let_go(
    sops_project: SopsProject,
) -> None:
    """An answer under the buffer's limit (no write waits for it), that its client does not read:
    once idle for the keep-alive timeout, the connection is closed, and its close waits for the
    client to read the rest. A client that never does is let go of after the send timeout."""
    prompt = "x" * 40_000  # an answer of about as much: the stand-in echoes it; under 64 KiB
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}).encode()
    async with _gateway(sops_project, send_timeout_s=LIMIT_S) as (service, _):
        site = FastSite(service.runner, service.app[GATEWAY], "127.0.0.1", 0, keepalive_s=0.2)
        await site.start()
        server = service.runner.server
        assert server is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", service.runner.addresses[-1][1]))
        _, writer = await asyncio.open_connection(sock=sock)
        try:
            (ours,) = await eventually(
                lambda: [c for c in server.connections if isinstance(c, FastConnection)]
            )
            assert ours.transport is not None
            ours.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            cast(asyncio.Transport, writer.transport).pause_reading()  # reads nothing, ever
            writer.write(_request(body))
            await eventually(lambda: ours.transport is None or ours.transport.is_closing(), timeout=5)
            await eventually(lambda: ours not in server.connections, timeout=5)  # let go of
        finally:
            writer.close()
        assert await service.cuts() == LET_GO


@pytest.mark.parametrize("path", ["aiohttp", "handed off"])
async def test_aiohttp_closing_with_its_answer_unread_lets_go(sops_project: SopsProject, path: str) -> None:
    """aiohttp's server closes a connection after its answer (`Connection: close`) with part of
    it unsent, under the buffer's limit (no write waited for it): a client that never reads it
    is let go of after the send timeout, not held with it for good."""
    prompt = "x" * 40_000  # an answer of about as much: the stand-in echoes it; under 64 KiB
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}).encode()
    async with _gateway(sops_project, fast=path != "aiohttp", send_timeout_s=LIMIT_S) as (service, _):
        server = service.runner.server
        assert server is not None
        before = set(server.connections)
        _, writer = await _connect(service)
        try:
            cast(asyncio.Transport, writer.transport).pause_reading()  # reads nothing, ever
            head, _, rest = _stream_request(path, body).partition(b"\r\n\r\n")
            writer.write(head + b"\r\nConnection: close\r\n\r\n" + rest)
            await asyncio.sleep(LIMIT_S)
            await eventually(lambda: not set(server.connections) - before, timeout=5)  # let go of
        finally:
            writer.close()
        assert await service.cuts() == LET_GO


TRANSLATED = {"/v1/messages": MESSAGES_STREAM}
"""Streams translated from an upstream's chat stream (docs/reference.md §14)."""


@pytest.mark.parametrize("endpoint", list(TRANSLATED))
@pytest.mark.parametrize("path", PATHS)
async def test_a_client_that_stops_reading_a_translated_stream_is_let_go(
    sops_project: SopsProject, path: str, endpoint: str
) -> None:
    """As a chat stream's, a stream translated to Messages events: let go of, settled, no 500."""
    up = _Endless()
    async with _metered(sops_project, up.app(), fast=path != "aiohttp", send_timeout_s=LIMIT_S) as (
        service,
        records,
    ):
        reader, writer = await _connect(service)
        try:
            request = _request(TRANSLATED[endpoint], path=endpoint, token=TOKEN)
            if path == "handed off":
                head, _, body = request.partition(b"\r\n\r\n")
                request = head + b"\r\n" + HAND_OFF.encode() + b"\r\n" + body
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            cast(asyncio.Transport, writer.transport).pause_reading()
            assert head.startswith(b"HTTP/1.1 200 "), head
            await eventually(lambda: len(records.kept) == 1, timeout=10)
            await asyncio.wait_for(up.ended.wait(), 10)
            assert not up.whole
            used = await _used(service)
            assert (used["in_flight"], used["budget_reserved_usd"]) == (0, "0")
        finally:
            writer.close()
        assert await service.metric("switchboard_http_requests_total", status="500") == 0
        assert await service.cuts() == LET_GO
    assert records.kept[0].status == 200


async def test_a_stream_cut_by_a_failure_with_its_answer_unread_is_let_go(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection the gateway's own server closes on a failure of its relay (a bug) with part
    of a stream unsent: a client that reads none of it is let go of after the send timeout."""
    events = _chunks(" ".join("x" * 10_000 for _ in range(4)))  # ~40 kB: no write waits
    async with _metered(sops_project, _streaming(events), fast=True, send_timeout_s=LIMIT_S) as (service, _):
        gateway = service.app[GATEWAY]
        relayed = gateway.relayed

        async def failing(*args: Any) -> web.StreamResponse:
            await relayed(*args)
            raise RuntimeError("a bug after the stream")

        monkeypatch.setattr(gateway, "relayed", failing)
        server = service.runner.server
        assert server is not None
        before = set(server.connections)
        _, writer = await _connect(service)
        try:
            cast(asyncio.Transport, writer.transport).pause_reading()  # reads nothing, ever
            writer.write(_stream_request("fast path"))
            (ours,) = set(server.connections) - before
            await eventually(lambda: ours.transport is None or ours.transport.is_closing(), timeout=5)
            assert ours.transport is None or ours.transport.get_write_buffer_size()
            await eventually(lambda: ours not in server.connections, timeout=5)  # let go of
        finally:
            writer.close()
        assert await service.cuts() == LET_GO

"""A client that trickles its request (service/http/stalls.py, the receive timeout): a head that
has not ended SWITCHBOARD_RECEIVE_TIMEOUT_S after its first byte, or a body that sent nothing
for that long, is answered 408 and its connection closed, nothing of the request done, on the
gateway's own server and on aiohttp's alike; a slow body that comes on is served, and an idle
connection is the keep-alive's, as before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

import pytest
from aiohttp import web

from service.http.fast import MAX_HEAD
from tests.conftest import Service, SopsProject, eventually, git, git_init, serve, write_routing, write_server
from tests.http.test_fast_path import CHAT, HAND_OFF, _address, _read_answer, _request
from tests.http.test_stalls import NONE_CUT, TOKEN, _metered, _used

LIMIT_S = 0.3
"""The receive timeout the tests run with."""
SERVERS = ["fast path", "aiohttp", "handed off"]
"""Where the request is read: the gateway's own server, aiohttp's (the fast path off), or
aiohttp's on a connection the fast path handed to it (before the request, or in its middle)."""
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
"""A request the fast path hands to aiohttp with its connection."""
TIMED_OUT = {"receive_timeout": 1, "send_timeout": 0, "malformed": 0}
"""The cuts once one request was answered 408."""


class _Upstream:
    """A vendor answering every chat completion, counting them."""

    def __init__(self) -> None:
        self.calls = 0

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.Response:
            await request.read()
            self.calls += 1
            return web.json_response(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "model": "fake-model",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2},
                }
            )

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it closes the connection."""
    got = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(1 << 16), 10):
            got += chunk
    return got


async def _trickled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    """Send `data` a byte at a time, a sixth of the timeout apart, until the server closes the
    connection (or all is sent); what it sent back."""
    closed = asyncio.ensure_future(_until_closed(reader))
    for byte in data:
        if closed.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(LIMIT_S / 6)
    return await asyncio.wait_for(closed, 10)


def _timed_out(got: bytes) -> dict[str, Any]:
    """The 408 in `got`, all it holds, checked; its body."""
    head, _, body = got.partition(b"\r\n\r\n")
    line, *fields = head.decode().split("\r\n")
    assert line == "HTTP/1.1 408 Request Timeout", got
    headers = {name.lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert int(headers["content-length"]) == len(body)
    answer: dict[str, Any] = json.loads(body)
    assert answer["error"]["type"] == "request_timeout" and answer["error"]["message"]
    return answer


def _split(request: bytes, server: str) -> tuple[bytes, bytes]:
    """`request`'s head (with what makes the fast path hand it to aiohttp, for "handed off") and body."""
    head, _, body = request.partition(b"\r\n\r\n")
    if server == "handed off":
        head += b"\r\n" + HAND_OFF.encode()[:-2]
    return head + b"\r\n\r\n", body


async def _chat(service: Service) -> int:
    """The status of a chat completion asked for on a connection of its own."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with service.http.post(service.url + "/v1/chat/completions", data=CHAT, headers=headers) as answer:
        return answer.status


async def _sent_until_closed(service: Service, data: bytes) -> bytes:
    """Send `data` on a connection of its own and nothing more: what came back before the
    server closed it."""
    reader, writer = await asyncio.open_connection(*_address(service))
    try:
        writer.write(data)
        return await asyncio.wait_for(_until_closed(reader), 10)
    finally:
        writer.close()


async def _head_trickled(service: Service, server: str) -> tuple[bytes, float]:
    """A request's head trickled on a connection of its own (after a request that gave the
    connection to aiohttp, when `server` says so): what came back, and after how long."""
    reader, writer = await asyncio.open_connection(*_address(service))
    try:
        if server == "handed off":  # a request before it gave the connection to aiohttp
            writer.write(HEALTHZ)
            assert (await _read_answer(reader)).status == 200
        head, _ = _split(_request(token=TOKEN), "fast path")
        started = asyncio.get_running_loop().time()
        got = await _trickled(reader, writer, head)
        return got, asyncio.get_running_loop().time() - started
    finally:
        writer.close()


async def _nothing_happened(service: Service, up: _Upstream, records: Any) -> None:
    """No call went upstream, nothing was recorded or counted against the client, nothing held;
    but the one 408 is counted, as a cut of the receive timeout."""
    await asyncio.sleep(LIMIT_S)
    assert up.calls == 0 and records.kept == []
    used = await _used(service)
    assert (used["in_flight"], used["requests_60s"], used["budget_reserved_usd"]) == (0, 0, "0")
    assert await service.metric("switchboard_http_requests_total", status="500") == 0
    assert await service.metric("switchboard_http_requests_total", status="408") == 0  # no route's
    assert await service.cuts() == TIMED_OUT


@pytest.mark.parametrize("server", SERVERS)
async def test_a_head_that_does_not_end_in_time_is_answered_408_and_closed(
    sops_project: SopsProject, caplog: pytest.LogCaptureFixture, server: str
) -> None:
    """A head sent a byte at a time, far too slowly to end: 408 once the timeout has passed
    since its first byte, then the connection closed; one log line, with no byte of the request
    (its token) in it. The service serves on."""
    up = _Upstream()
    async with _metered(sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S) as (
        service,
        records,
    ):
        got, waited = await _head_trickled(service, server)
        await _nothing_happened(service, up, records)
        assert await _chat(service) == 200
    _timed_out(got)
    assert LIMIT_S * 0.9 <= waited < LIMIT_S * 3, waited
    lines = [r.getMessage() for r in caplog.records if "SWITCHBOARD_RECEIVE_TIMEOUT_S" in r.getMessage()]
    assert lines == [
        "client 127.0.0.1 did not end its request's head within 0.3 s (SWITCHBOARD_RECEIVE_TIMEOUT_S): "
        "answered 408, its connection closed"
    ]
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("server", SERVERS)
async def test_a_body_that_stops_coming_is_answered_408_and_nothing_of_it_happens(
    sops_project: SopsProject, caplog: pytest.LogCaptureFixture, server: str
) -> None:
    """`Content-Length: 1000`, then 10 bytes, then silence: 408 and the connection closed; no
    call went upstream, nothing is recorded or counted, no `max_parallel` slot is held, no 500."""
    up = _Upstream()
    async with _metered(sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S) as (
        service,
        records,
    ):
        head, body = _split(_request(b'{"model": "fake-model", ' + b" " * 976, token=TOKEN), server)
        assert b"Content-Length: 1000\r\n" in head
        got = await _sent_until_closed(service, head + body[:10])
        await _nothing_happened(service, up, records)
        for _ in range(5):  # more than its `max_parallel` (4), one after another
            assert await _chat(service) == 200
        assert up.calls == 5
    _timed_out(got)
    assert "sent nothing of its request's body for 0.3 s (SWITCHBOARD_RECEIVE_TIMEOUT_S)" in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("server", ["fast path", "aiohttp"])
async def test_a_chunked_body_that_stops_coming_is_answered_408(
    sops_project: SopsProject, server: str
) -> None:
    """A body in chunks (aiohttp's to read): one chunk, then silence, is answered 408 too."""
    up = _Upstream()
    async with _metered(sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S) as (
        service,
        records,
    ):
        head = (
            _request(CHAT, token=TOKEN)
            .partition(b"\r\n\r\n")[0]
            .replace(b"Content-Length: %d" % len(CHAT), b"Transfer-Encoding: chunked")
        )
        reader, writer = await asyncio.open_connection(*_address(service))
        try:
            writer.write(head + b"\r\n\r\n" + b"a\r\n" + CHAT[:10] + b"\r\n")
            got = await asyncio.wait_for(_until_closed(reader), 10)
        finally:
            writer.close()
        await _nothing_happened(service, up, records)
    _timed_out(got)


@pytest.mark.parametrize("server", ["fast path", "aiohttp"])
async def test_a_body_that_stops_after_100_continue_is_answered_408(
    sops_project: SopsProject, server: str
) -> None:
    """`Expect: 100-continue` (aiohttp's to answer): the interim `100 Continue` is no answer begun,
    so a body that stops coming after it is answered 408 too."""
    up = _Upstream()
    async with _metered(sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S) as (
        service,
        records,
    ):
        head, body = _split(_request(CHAT, token=TOKEN, extra="Expect: 100-continue\r\n"), server)
        reader, writer = await asyncio.open_connection(*_address(service))
        try:
            writer.write(head)
            assert (
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
            )
            writer.write(body[:10])
            got = await asyncio.wait_for(_until_closed(reader), 10)
        finally:
            writer.close()
        await _nothing_happened(service, up, records)
    _timed_out(got)


@pytest.mark.parametrize("server", SERVERS)
async def test_a_body_that_comes_on_slowly_is_never_cut(sops_project: SopsProject, server: str) -> None:
    """A head, then its body in pieces a third of the timeout apart, over more than three times
    the timeout: the request is answered, recorded, as any other."""
    up = _Upstream()
    async with _metered(sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S) as (
        service,
        records,
    ):
        head, body = _split(_request(CHAT, token=TOKEN), server)
        pieces = [body[i : i + 6] for i in range(0, len(body), 6)]
        assert len(pieces) * LIMIT_S / 3 > LIMIT_S * 3
        reader, writer = await asyncio.open_connection(*_address(service))
        try:
            writer.write(head)
            for piece in pieces:
                await asyncio.sleep(LIMIT_S / 3)
                writer.write(piece)
            answer = await _read_answer(reader)
        finally:
            writer.close()
        await eventually(lambda: len(records.kept) == 1)
        assert await service.metric("switchboard_http_requests_total", status="500") == 0
        assert await service.cuts() == NONE_CUT
    assert answer.status == 200 and b'"hi"' in answer.body
    assert up.calls == 1 and records.kept[0].status == 200


@pytest.mark.parametrize("server", SERVERS)
async def test_an_idle_connection_is_not_timed(sops_project: SopsProject, server: str) -> None:
    """A connection that sends nothing, before its first request and between two, for three
    times the timeout: nothing is sent to it, and it serves its next request (the keep-alive's,
    75 s, closes it)."""
    up = _Upstream()
    async with _metered(sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S) as (
        service,
        _,
    ):
        reader, writer = await asyncio.open_connection(*_address(service))
        try:
            if server == "handed off":
                writer.write(HEALTHZ)
                assert (await _read_answer(reader)).status == 200
            for _ in range(2):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(reader.read(1), LIMIT_S * 3)  # nothing comes
                writer.write(_request(token=TOKEN))
                assert (await _read_answer(reader)).status == 200
        finally:
            writer.close()
        assert await service.cuts() == NONE_CUT
    assert up.calls == 2


@pytest.mark.parametrize("before", [False, True], ids=["idle from the start", "idle after a request"])
@pytest.mark.parametrize("server", SERVERS)
async def test_an_idle_connection_is_closed_silently_by_the_keepalive(
    sops_project: SopsProject, server: str, before: bool
) -> None:
    """A receive timeout shorter than the keep-alive's does not make an idle connection's close
    a 408: it is closed when the keep-alive says, with nothing sent."""
    up = _Upstream()
    async with _metered(
        sops_project,
        up.app(),
        fast=server != "aiohttp",
        keepalive_s=LIMIT_S * 3,
        receive_timeout_s=LIMIT_S / 3,
    ) as (service, _):
        reader, writer = await asyncio.open_connection(*_address(service))
        try:
            if server == "handed off":
                writer.write(HEALTHZ)
                assert (await _read_answer(reader)).status == 200
            if before:
                writer.write(_request(token=TOKEN))
                assert (await _read_answer(reader)).status == 200
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing sent
            waited = asyncio.get_running_loop().time() - started
        finally:
            writer.close()
        assert await service.cuts() == NONE_CUT  # the keep-alive's close is none
    assert waited >= LIMIT_S * 2.5, waited


@pytest.mark.parametrize("server", SERVERS)
async def test_a_head_coming_is_the_receive_timeouts_not_the_keepalives(
    sops_project: SopsProject, server: str
) -> None:
    """A keep-alive timeout shorter than the receive timeout does not cut a head coming, however
    slowly: it is a request's, answered 408 once the receive timeout has passed."""
    up = _Upstream()
    async with _metered(
        sops_project,
        up.app(),
        fast=server != "aiohttp",
        keepalive_s=LIMIT_S / 2,
        receive_timeout_s=LIMIT_S * 2,
    ) as (service, _):
        got, waited = await _head_trickled(service, server)
        assert await service.cuts() == TIMED_OUT
    _timed_out(got)
    assert waited >= LIMIT_S * 2 * 0.9, waited


@pytest.mark.parametrize("server", ["fast path", "aiohttp"])
async def test_a_write_whose_body_stops_coming_is_answered_408_and_nothing_is_written(
    sops_project: SopsProject, server: str
) -> None:
    """Not the gateway's: a configuration write (`PUT …/active/chat`, aiohttp's to answer, on the
    connection the fast path hands it) whose body stops coming is answered 408; nothing is
    committed, the file is as it was."""
    root = sops_project.root
    git_init(root)
    (root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    git(root, "add", "-A")
    git(root, "commit", "-qm", "setup")
    routing = (sops_project.providers / "routing.yaml").read_text()
    body = json.dumps({"primary": ["gpu"], "weights": {"gpu": 2}}).encode()
    head = (
        b"PUT /api/v1/llm-config/active/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    async with serve(sops_project, fast=server == "fast path", receive_timeout_s=LIMIT_S) as service:
        before = git(root, "rev-parse", "HEAD")
        got = await _sent_until_closed(service, head + body[:10])
        await asyncio.sleep(LIMIT_S)
        assert git(root, "rev-parse", "HEAD") == before
        assert (sops_project.providers / "routing.yaml").read_text() == routing
        assert await service.metric("switchboard_http_requests_total", status="500") == 0
        assert await service.cuts() == TIMED_OUT
        reader, writer = await asyncio.open_connection(*_address(service))
        try:
            writer.write(head + body)  # the same write, whole: done
            assert (await _read_answer(reader)).status == 200
        finally:
            writer.close()
        assert git(root, "rev-parse", "HEAD") != before
    _timed_out(got)


@pytest.mark.parametrize("server", ["fast path", "aiohttp"])
async def test_a_head_handed_to_aiohttp_in_its_middle_is_timed_from_its_first_byte(
    sops_project: SopsProject, server: str
) -> None:
    """A head longer than the fast path takes (`fast.MAX_HEAD`) is handed to aiohttp before it
    ends: it is still answered 408 once the timeout has passed since its first byte, not a whole
    timeout after the hand-off (which a slowloris would time to just before its deadline)."""
    up = _Upstream()
    async with _metered(sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S) as (
        service,
        records,
    ):
        head, _ = _split(_request(token=TOKEN), "fast path")
        fields = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 7000) for i in range(10))
        assert len(fields) > MAX_HEAD
        begun = head[:-2] + fields
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(*_address(service))
        try:
            started = loop.time()
            writer.write(begun[:60_000])  # under the fast path's most
            await asyncio.sleep(LIMIT_S * 0.8)
            writer.write(begun[60_000:])  # over it: handed to aiohttp, its head not ended
            got = await _trickled(reader, writer, b"X-More: " + b"b" * 100)
            waited = loop.time() - started
        finally:
            writer.close()
        await _nothing_happened(service, up, records)
    _timed_out(got)
    assert waited < LIMIT_S * 1.6, waited


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("stall", ["head", "body"])
async def test_a_408_on_a_messages_path_comes_in_anthropics_shape(
    sops_project: SopsProject, server: str, stall: str
) -> None:
    """docs/reference.md §14: every error on Anthropic's Messages paths comes in Anthropic's shape,
    the receive timeout's 408 too, once its request line has come (its query aside); on the
    other gateway paths it is the usual error, and every gateway path's carries the gateway's
    headers."""
    up = _Upstream()
    async with _metered(sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S) as (
        service,
        _,
    ):
        got = {}
        for path in ("/v1/messages?beta=true", "/v1/messages/count_tokens", "/v1/responses"):
            head, body = _split(
                _request(b'{"model": "fake-model", ' + b" " * 976, path=path, token=TOKEN), server
            )
            reader, writer = await asyncio.open_connection(*_address(service))
            try:
                if stall == "head" and server == "handed off":  # a request gave the connection to aiohttp
                    writer.write(HEALTHZ)
                    assert (await _read_answer(reader)).status == 200
                writer.write(head[:-30] if stall == "head" else head + body[:10])
                got[path] = (await asyncio.wait_for(_until_closed(reader), 10)).partition(b"HTTP/1.1 408")
            finally:
                writer.close()
    for path, (_, line, answer) in got.items():
        fields, _, text = answer.partition(b"\r\n\r\n")
        error = json.loads(text)
        assert line and b"\r\nx-switchboard-provider: none\r\nx-switchboard-attempts: 0\r\n" in fields, path
        assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", fields), path  # every gateway answer's
        if path.startswith("/v1/messages"):
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", path
            assert "receive timeout" in error["error"]["message"]
        else:
            assert error["error"]["type"] == "request_timeout", path


@pytest.mark.parametrize("server", ["fast path", "aiohttp"])
async def test_a_pipelined_head_that_does_not_end_in_time_is_answered_408(
    sops_project: SopsProject, server: str
) -> None:
    """A request answered and the start of the next one's head in the same write (pipelined):
    the first is answered, and the second, whose head does not end, is answered 408 once the
    receive timeout has passed since it came, not left to the keep-alive."""
    up = _Upstream()
    async with _metered(
        sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S, keepalive_s=30
    ) as (service, _):
        started = asyncio.get_running_loop().time()
        got = await _sent_until_closed(service, HEALTHZ + b"POST /v1/chat/completions HTTP/1.1\r\nHost: 1")
        waited = asyncio.get_running_loop().time() - started
        assert await service.cuts() == TIMED_OUT
    first, separator, rest = got.partition(b"HTTP/1.1 408")
    assert first.startswith(b"HTTP/1.1 200 OK") and separator, got
    _timed_out(separator + rest)
    assert waited < LIMIT_S * 5, waited


@pytest.mark.parametrize("server", ["fast path", "aiohttp"])
@pytest.mark.parametrize("first", ["get", "post"])
async def test_a_pipelined_head_is_timed_from_its_own_first_byte_not_the_request_before_it(
    sops_project: SopsProject, server: str, first: str
) -> None:
    """A request without a body whose head came in two reads, the second with the start of the
    next head (pipelined): that head is timed from the read it began in, so one that ends within
    the receive timeout of it is answered, though the request before it began longer ago."""
    up = _Upstream()
    async with _metered(
        sops_project, up.app(), fast=server != "aiohttp", receive_timeout_s=LIMIT_S, keepalive_s=30
    ) as (service, _):
        before = HEALTHZ if first == "get" else _request(b"", token=TOKEN)  # whole once its head is
        last = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        reader, writer = await asyncio.open_connection(*_address(service))
        try:
            closed = asyncio.ensure_future(_until_closed(reader))
            writer.write(before[:20])
            await asyncio.sleep(LIMIT_S * 0.7)
            writer.write(before[20:] + HEALTHZ[:10])  # the next head begins
            await asyncio.sleep(LIMIT_S * 0.6)  # over the timeout since the first, not since it
            writer.write(HEALTHZ[10:] + last)
            got = await asyncio.wait_for(closed, 10)
        finally:
            writer.close()
        assert await service.cuts() == NONE_CUT
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", got)
    assert statuses == [b"200" if first == "get" else b"400", b"200", b"200"], got

"""The gateway's own HTTP/1.1 server (service/http/fast.py): whole, non-stream endpoint requests
answered by it byte for byte as aiohttp answers them, anything else handed to aiohttp with the
connection, at that request's first byte."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import inspect
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from typing import Any, NoReturn, cast

import pytest
from aiohttp import hdrs, web
from aiohttp.helpers import HeadersMixin, must_be_empty_body, should_remove_content_length
from aiohttp.http_writer import _serialize_headers
from aiohttp.web_server import Server
from multidict import CIMultiDict

from service.http.context import HEALTH, RELAY
from service.http.fast import KEEPALIVE_S, FastConnection
from service.http.fast_site import FastSite
from service.http.gateway import GATEWAY
from tests.conftest import Service, SopsProject, eventually, serve
from tests.support.gateway import write_clients, write_provider, write_routing
from tests.support.upstreams import FakeUpstream

_VARYING = ("date", "x-request-id")
TOKEN = "sb-fast-path-token-0123456789abcdef"
NO_SCOPE = "sb-fast-path-token-no-scope-012345"
CHAT = b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}'
STREAM = CHAT.replace(b'"model"', b'"stream": true, "model"')
MESSAGES_STREAM = b'{"model": "fake-model", "max_tokens": 9, "stream": true, ' + CHAT.partition(b", ")[2]
HAND_OFF = "X-Hand-Off: 1\r\nX-Hand-Off: 1\r\n"
"""A repeated field: the fast path leaves the request to aiohttp, which answers it as any other."""


def _site(service: Service) -> FastSite:
    return next(site for site in service.runner.sites if isinstance(site, FastSite))


def _address(service: Service) -> tuple[str, int]:
    host, port = service.url.removeprefix("http://").split(":")
    return host, int(port)


def _request(
    body: bytes = CHAT,
    *,
    path: str = "/v1/chat/completions",
    token: str | None = None,
    extra: str = "",
    version: str = "1.1",
) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


class Answer:
    """An HTTP answer read off the wire: its status line, its fields in order, its body."""

    def __init__(self, line: bytes, fields: list[tuple[str, str]], body: bytes) -> None:
        self.line, self.fields, self.body = line, fields, body

    @property
    def status(self) -> int:
        return int(self.line.split(b" ")[1])

    def field(self, name: str) -> str | None:
        return next((v for n, v in self.fields if n.lower() == name.lower()), None)

    def comparable(self) -> tuple[bytes, list[tuple[str, str]], bytes]:
        """All but what differs between two answers to one request: `Date`, the request id, and
        what the stand-in upstream counts (its remaining requests) or stamps (`created`)."""
        masked = [
            (n, "-" if n.lower() in _VARYING or n.startswith("x-ratelimit-remaining") else v)
            for n, v in self.fields
        ]
        return self.line, masked, re.sub(rb'"created": \d+', b'"created": 0', self.body)


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    """An answer's head and body; a chunked body as it came, its chunks' framing too."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    line, *lines = head[:-4].split(b"\r\n")
    fields = [tuple(part.strip() for part in raw.decode().split(":", 1)) for raw in lines]
    pairs = [(name, value) for name, value in fields]
    if any(n.lower() == "transfer-encoding" and v == "chunked" for n, v in pairs):
        return Answer(line, pairs, await asyncio.wait_for(_read_chunks(reader), 10))
    length = next((int(v) for n, v in pairs if n.lower() == "content-length"), 0)
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return Answer(line, pairs, body)


async def _read_chunks(reader: asyncio.StreamReader) -> bytes:
    read = b""
    while True:
        size = await reader.readuntil(b"\r\n")
        read += size + await reader.readexactly(int(size, 16) + 2)
        if int(size, 16) == 0:  # the last chunk (no trailer fields)
            return read


async def _exchange(service: Service, *requests: bytes, close: bool = False) -> list[Answer]:
    """Send `requests` on one connection, one after another, and read an answer to each."""
    reader, writer = await asyncio.open_connection(*_address(service))
    try:
        answers = []
        for request in requests:
            writer.write(request)
            answers.append(await _read_answer(reader))
        if close:
            assert await asyncio.wait_for(reader.read(), 10) == b""  # the server closed it
        return answers
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _gateway(project: SopsProject, **settings: Any) -> AsyncIterator[tuple[Service, FakeUpstream]]:
    async with FakeUpstream(name="a") as up:
        write_provider(project, "a", base_url=up.base_url, models=["fake-model"])
        write_routing(project, chat="a")
        async with serve(project, **settings) as service:
            yield service, up


# -- parity --------------------------------------------------------------------------------


async def test_every_class_of_answer_is_the_same_byte_for_byte_on_both_paths(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same request on the fast path and handed to aiohttp: the same status line, fields in
    the same order (but `Date` and the request id) and body, for every class of answer; a
    stream's body chunk by chunk (its events come in reads of their own: one chunk each)."""
    write_clients(sops_project, {"app": (TOKEN, ["completions"]), "reader": (NO_SCOPE, ["usage:read"])})
    async with _gateway(sops_project, max_body_bytes=4096, circuit_failures=1) as (service, up):
        site = _site(service)
        up.chunk_interval_s = 0.01
        cases: list[tuple[str, bytes, dict[str, Any]]] = [
            ("200", _request(token=TOKEN), {}),
            ("400", _request(b"{not json", token=TOKEN), {}),
            ("401", _request(), {}),
            ("403", _request(token=NO_SCOPE), {}),
            ("404 model", _request(CHAT.replace(b"fake-model", b"no-such-model"), token=TOKEN), {}),
            ("413", _request(b"x" * 5000, token=TOKEN), {}),
            ("422 upstream", _request(token=TOKEN), {"fail": 422}),
            ("429 upstream", _request(token=TOKEN), {"fail": 429}),
            ("502", _request(token=TOKEN), {"fail": 500}),
            ("503 upstream", _request(token=TOKEN), {"fail": 503}),
            ("504 upstream", _request(token=TOKEN), {"fail": 504}),
            ("503 no provider", _request(token=TOKEN), {"fail": 500, "open": True}),
            ("400 messages", _request(b'{"model": "fake-model"}', path="/v1/messages", token=TOKEN), {}),
            ("500 bug", _request(token=TOKEN), {"bug": True}),
            ("200 stream", _request(STREAM, token=TOKEN), {}),
            ("200 messages stream", _request(MESSAGES_STREAM, path="/v1/messages", token=TOKEN), {}),
            ("502 stream", _request(STREAM, token=TOKEN), {"fail": 500}),  # before its first byte
            ("422 stream", _request(STREAM, token=TOKEN), {"fail": 422}),  # the upstream's, whole
            ("500 bug stream", _request(STREAM, token=TOKEN), {"bug": True}),
        ]
        relay = service.app[RELAY].relay

        def broken(*args: object) -> NoReturn:
            raise RuntimeError("a bug")

        statuses = {}
        for label, request, how in cases:
            answers = []
            for extra in ("", HAND_OFF):
                service.app[HEALTH].reset("a")  # each request finds the provider as the first did
                if "fail" in how:
                    up.fail(how["fail"], times=1)
                if how.get("open"):  # its circuit opened by a failure, nothing is left to try
                    await _exchange(service, _request(token=TOKEN))
                monkeypatch.setattr(service.app[RELAY], "relay", broken if how.get("bug") else relay)
                handed = site.handed_off
                head, _, body = request.partition(b"\r\n\r\n")
                (answer,) = await _exchange(service, head + b"\r\n" + extra.encode() + b"\r\n" + body)
                answers.append(answer)
                assert site.handed_off == handed + (1 if extra or label == "413" else 0), label
            fast, usual = answers
            assert fast.comparable() == usual.comparable(), label
            statuses[label] = fast.status
    assert statuses == {
        "200": 200,
        "400": 400,
        "401": 401,
        "403": 403,
        "404 model": 404,
        "413": 413,
        "422 upstream": 422,
        "429 upstream": 502,  # retried, then every provider failed
        "502": 502,
        "503 upstream": 502,
        "504 upstream": 502,
        "503 no provider": 503,
        "400 messages": 400,
        "500 bug": 500,
        "200 stream": 200,
        "200 messages stream": 200,
        "502 stream": 502,
        "422 stream": 422,
        "500 bug stream": 500,
    }


# -- hand-offs -----------------------------------------------------------------------------


async def test_a_get_then_a_post_on_one_connection_are_both_aiohttps(sops_project: SopsProject) -> None:
    async with _gateway(sops_project) as (service, _):
        site, before = _site(service), _site(service).handed_off
        get = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        answers = await _exchange(service, get, _request())
        assert [a.status for a in answers] == [200, 200] and site.handed_off == before + 1
        assert json.loads(answers[1].body)["choices"][0]["message"]["content"] == "a says: hi"


async def test_a_post_then_a_get_hand_off_at_the_get(sops_project: SopsProject) -> None:
    async with _gateway(sops_project) as (service, _):
        site, before = _site(service), _site(service).handed_off
        get = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        answers = await _exchange(service, _request(), _request(), get, _request())
        assert [a.status for a in answers] == [200, 200, 200, 200] and site.handed_off == before + 1
        assert answers[2].body == b'{"status": "ok"}'


async def test_a_stream_is_the_fast_paths_and_a_whole_request_follows_it_on_the_connection(
    sops_project: SopsProject,
) -> None:
    """A stream, told from the body's bytes or only once it is parsed, is answered on the fast
    path, and the connection is kept alive after it: the next request is answered on it too."""
    escaped = CHAT.replace(b'"model"', b'"\\u0073tream": true, "model"')
    async with _gateway(sops_project) as (service, _):
        site, before = _site(service), _site(service).handed_off
        for asked in (STREAM, escaped):
            reader, writer = await asyncio.open_connection(*_address(service))
            writer.write(_request(asked))
            answer = await _read_stream(reader)
            assert answer.startswith(b"HTTP/1.1 200 OK") and b"data: [DONE]" in answer
            writer.write(_request())
            assert (await _read_answer(reader)).status == 200
            writer.write(_request(asked))
            assert b"data: [DONE]" in await _read_stream(reader)
            writer.close()
        assert site.handed_off == before


async def _read_stream(reader: asyncio.StreamReader) -> bytes:
    read = b""
    while not read.endswith(b"0\r\n\r\n"):  # the chunked body's end
        read += await asyncio.wait_for(reader.read(65536), 10)
    return read


async def test_pipelined_requests_are_answered_in_order(sops_project: SopsProject) -> None:
    one, two = (CHAT.replace(b'"hi"', word) for word in (b'"one"', b'"two"'))
    async with _gateway(sops_project) as (service, _):
        before = _site(service).handed_off
        reader, writer = await asyncio.open_connection(*_address(service))
        writer.write(_request(one) + _request(two))
        answers = [await _read_answer(reader), await _read_answer(reader)]
        writer.close()
        said = [json.loads(a.body)["choices"][0]["message"]["content"] for a in answers]
        assert said == ["a says: one", "a says: two"] and _site(service).handed_off == before + 1


async def test_a_request_sent_while_one_is_answered_waits_its_turn(sops_project: SopsProject) -> None:
    """Sent before the first is answered (its upstream takes a while): answered after it, in
    order, on the fast path both."""
    async with FakeUpstream(name="a", latency_s=0.2) as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with serve(sops_project) as service:
            before = _site(service).handed_off
            reader, writer = await asyncio.open_connection(*_address(service))
            writer.write(_request(CHAT.replace(b'"hi"', b'"one"')))
            await asyncio.sleep(0.05)
            writer.write(_request(CHAT.replace(b'"hi"', b'"two"')))
            answers = [await _read_answer(reader), await _read_answer(reader)]
            writer.close()
            said = [json.loads(a.body)["choices"][0]["message"]["content"] for a in answers]
            assert said == ["a says: one", "a says: two"] and _site(service).handed_off == before


async def test_a_body_in_several_writes_is_awaited_whole(sops_project: SopsProject) -> None:
    """Nothing is done before the whole body came: the fast path waits for it."""
    async with _gateway(sops_project) as (service, _):
        before = _site(service).handed_off
        reader, writer = await asyncio.open_connection(*_address(service))
        request = _request()
        for start in range(0, len(request), 40):
            writer.write(request[start : start + 40])
            await writer.drain()
            await asyncio.sleep(0.01)
        answer = await _read_answer(reader)
        writer.close()
        assert answer.status == 200 and _site(service).handed_off == before


@pytest.mark.parametrize(
    ("label", "request_bytes"),
    [
        ("expect", _request(extra="Expect: 100-continue\r\n")),
        (
            "chunked",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(CHAT):x}\r\n".encode() + CHAT + b"\r\n0\r\n\r\n",
        ),
        ("gzip", _request(gzip.compress(CHAT), extra="Content-Encoding: gzip\r\n")),
    ],
)
async def test_what_the_fast_path_does_not_take_aiohttp_answers(
    sops_project: SopsProject, label: str, request_bytes: bytes
) -> None:
    async with _gateway(sops_project) as (service, _):
        before = _site(service).handed_off
        reader, writer = await asyncio.open_connection(*_address(service))
        writer.write(request_bytes)
        answer = await _read_answer(reader)
        if answer.status == 100:  # Expect: the interim answer, then the answer
            answer = await _read_answer(reader)
        writer.close()
        assert answer.status == 200, label
        assert json.loads(answer.body)["choices"][0]["message"]["content"] == "a says: hi"
        assert _site(service).handed_off == before + 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/chat/completions HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"x" * 9000 + b"\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Name: 1\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"x" * 70000,
    ],
    ids=["request-line", "field-too-long", "field-name", "head-without-end"],
)
async def test_a_malformed_request_gets_aiohttps_answer(
    sops_project: SopsProject, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    answers = []
    for on_fast in (True, False):
        async with FakeUpstream(name="a") as up:
            write_provider(sops_project, "a", base_url=up.base_url)
            write_routing(sops_project, chat="a")
            async with serve(sops_project, fast=on_fast) as service:
                reader, writer = await asyncio.open_connection(*_address(service))
                writer.write(request_bytes)
                answers.append(await _read_answer(reader))
                writer.close()
                # on the connection handed to aiohttp, or aiohttp's own
                assert await service.cuts() == {"receive_timeout": 0, "send_timeout": 0, "malformed": 1}
    fast, usual = answers
    assert fast.status >= 400 and fast.comparable() == usual.comparable()


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_http_1_0_is_answered_in_1_0_kept_alive_only_when_asked(
    sops_project: SopsProject, keep_alive: bool
) -> None:
    extra = "Connection: keep-alive\r\n" if keep_alive else ""
    request = _request(extra=extra, version="1.0")
    async with _gateway(sops_project) as (service, _):
        answers = []
        for on_fast in (True, False):
            hand = "" if on_fast else HAND_OFF
            head, _, body = request.partition(b"\r\n\r\n")
            forced = head + b"\r\n" + hand.encode() + b"\r\n" + body
            if keep_alive:
                answers += await _exchange(service, forced, forced)
            else:
                answers += await _exchange(service, forced, close=True)
        assert all(a.line == b"HTTP/1.0 200 OK" for a in answers)
        assert answers[0].field("Connection") == ("keep-alive" if keep_alive else None)
        half = len(answers) // 2
        assert [a.comparable() for a in answers[:half]] == [a.comparable() for a in answers[half:]]


async def test_connection_close_closes_after_the_answer(sops_project: SopsProject) -> None:
    async with _gateway(sops_project) as (service, _):
        before = _site(service).handed_off
        (answer,) = await _exchange(service, _request(extra="Connection: close\r\n"), close=True)
        assert answer.status == 200 and answer.field("Connection") == "close"
        assert _site(service).handed_off == before


async def test_a_connection_is_kept_alive_by_tcp_as_aiohttps_are(sops_project: SopsProject) -> None:
    async with _gateway(sops_project) as (service, _):
        reader, writer = await asyncio.open_connection(*_address(service))
        writer.write(_request())
        assert (await _read_answer(reader)).status == 200
        assert service.runner.server is not None
        ours = [c for c in service.runner.server.connections if isinstance(c, FastConnection)]
        sockets = [c.transport.get_extra_info("socket") for c in ours if c.transport is not None]
        assert sockets and all(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) for s in sockets)
        writer.close()


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(sops_project: SopsProject) -> None:
    assert inspect.signature(web.run_app).parameters["keepalive_timeout"].default == KEEPALIVE_S
    async with _gateway(sops_project) as (service, _):
        site = FastSite(service.runner, service.app[GATEWAY], "127.0.0.1", 0, keepalive_s=0.2)
        await site.start()
        port = service.runner.addresses[-1][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request())
        assert (await _read_answer(reader)).status == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed once idle
        writer.close()


async def test_a_connection_whose_answer_is_read_slowly_is_not_idle(sops_project: SopsProject) -> None:
    """A client reading a large answer for longer than the keep-alive timeout, with a request
    sent behind it: the connection is not idle meanwhile (as aiohttp's, whose handler waits for
    the answer to be read), and the request behind it is answered once the client has read."""
    prompt = "x" * 300_000  # an answer of about as much: the stand-in echoes it
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}).encode()
    async with _gateway(sops_project) as (service, _):
        site = FastSite(service.runner, service.app[GATEWAY], "127.0.0.1", 0, keepalive_s=0.2)
        await site.start()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", service.runner.addresses[-1][1]))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
        assert service.runner.server is not None
        await asyncio.sleep(0.05)
        (ours,) = [c for c in service.runner.server.connections if isinstance(c, FastConnection)]
        assert ours.transport is not None
        ours.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        incoming = cast(asyncio.Transport, writer.transport)
        incoming.pause_reading()  # the client reads nothing yet
        writer.write(_request(body))
        await eventually(lambda: ours.blocked and ours.task is None, timeout=10)
        writer.write(_request())  # behind the answer not read
        await asyncio.sleep(0.6)  # thrice the keep-alive timeout
        incoming.resume_reading()
        first = await _read_answer(reader)
        second = await _read_answer(reader)
        writer.close()
    assert first.status == 200 and len(first.body) > 300_000
    assert second.status == 200 and b"a says: hi" in second.body


# -- shutdown and clients that leave ---------------------------------------------------------


async def test_shutdown_closes_idle_connections_and_lets_a_request_in_flight_finish(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a", latency_s=0.3) as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with serve(sops_project) as service:
            idle_reader, idle_writer = await asyncio.open_connection(*_address(service))
            busy_reader, busy_writer = await asyncio.open_connection(*_address(service))
            busy_writer.write(_request())
            await asyncio.sleep(0.1)  # the request is with the upstream
            stopping = asyncio.create_task(service.stop())
            assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # closed at once
            answer = await _read_answer(busy_reader)
            assert answer.status == 200
            assert await asyncio.wait_for(busy_reader.read(), 5) == b""
            await stopping
            idle_writer.close()
            busy_writer.close()


async def test_an_answer_read_slowly_is_read_whole_when_shutdown_closes_its_connection(
    sops_project: SopsProject,
) -> None:
    """A client that reads nothing of a large answer yet and sends a request behind it: shutdown
    closes the connection once the answer is written out, and the client reads all of it, then
    the connection's end, as from aiohttp's server. The request behind it is read (not left in
    the socket, which a close would answer with a reset, losing the answer's last bytes) but
    not taken."""
    prompt = "x" * 300_000  # an answer of about as much: the stand-in echoes it
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}).encode()
    async with _gateway(sops_project) as (service, up):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, _address(service))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
        assert service.runner.server is not None
        await asyncio.sleep(0.05)
        (ours,) = [c for c in service.runner.server.connections if isinstance(c, FastConnection)]
        assert ours.transport is not None
        ours.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        incoming = cast(asyncio.Transport, writer.transport)
        incoming.pause_reading()  # the client reads nothing yet
        writer.write(_request(body))
        await eventually(lambda: ours.blocked and ours.task is None, timeout=10)
        before = len(up.requests)
        writer.write(_request())  # behind the answer not read
        await asyncio.sleep(0.1)
        await service.stop()
        incoming.resume_reading()
        answer = await _read_answer(reader)
        end = await asyncio.wait_for(reader.read(), 10)  # the connection's end, not a reset
        writer.close()
        assert len(up.requests) == before
    assert answer.status == 200 and len(answer.body) == int(answer.field("Content-Length") or 0) > 300_000
    assert end == b""


async def test_a_client_that_leaves_mid_request_cancels_it_and_the_service_goes_on(
    sops_project: SopsProject, caplog: pytest.LogCaptureFixture
) -> None:
    """As on aiohttp with handler cancellation (how `serve` runs it): the relay is cancelled."""
    caplog.set_level(logging.WARNING)
    async with FakeUpstream(name="a", latency_s=0.3) as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with serve(sops_project) as service:
            _, writer = await asyncio.open_connection(*_address(service))
            writer.write(_request())
            await asyncio.sleep(0.1)
            writer.close()
            await asyncio.sleep(0.4)
            (answer,) = await _exchange(service, _request())
            assert answer.status == 200
            metrics = await service.text("/metrics")
    assert 'route="/v1/chat/completions",status="200"} 1.0' in metrics[1]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- what the fast path relies on in aiohttp ---------------------------------------------------


def test_aiohttps_header_writer_is_what_the_answers_are_written_with() -> None:
    """`aiohttp.http_writer._serialize_headers` (private): the status line and fields, in order."""
    headers = CIMultiDict([("Content-Type", "application/json"), ("x-a", "1")])
    assert _serialize_headers("HTTP/1.1 200 OK", headers) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-a: 1\r\n\r\n"
    )


def test_the_bodiless_statuses_of_a_post_are_aiohttps() -> None:
    """`_serialized` tells a POST's bodiless answers without aiohttp's helpers: the same ones."""
    for status in range(100, 600):
        empty = status < 200 or status in (204, 304)
        assert must_be_empty_body(hdrs.METH_POST, status) == empty
        assert should_remove_content_length(hdrs.METH_POST, status) == empty


def test_aiohttps_server_keeps_a_connection_while_its_task_handler_runs() -> None:
    """What aiohttp's `Server` reads of a connection it keeps: `close`, `shutdown`, and
    `_task_handler` (private) when it is lost; and `HeadersMixin`, whose `content_type` and
    `content_length` the fast path's requests answer with."""
    source = inspect.getsource(Server)
    assert "handler._task_handler" in source and "conn.close()" in source and "conn.shutdown(" in source
    mixin = HeadersMixin()
    mixin._headers = CIMultiDict({"Content-Type": "Application/JSON; charset=utf-8", "Content-Length": "7"})
    assert (mixin.content_type, mixin.content_length) == ("application/json", 7)
    assert {"_runner", "_server", "_host", "_port", "_backlog"} <= {
        *web.TCPSite.__slots__,
        *web.BaseSite.__slots__,
    }
    assert hasattr(web.AppRunner, "_reg_site")


# -- hostile clients -------------------------------------------------------------------------


async def test_a_client_that_reads_no_answer_is_not_answered_without_end(sops_project: SopsProject) -> None:
    """As aiohttp waits for a client to read an answer before it takes the next request
    (`drain`): the fast path takes none while the transport's buffer is over its limit, so a
    client that sends and never reads neither fills the service's memory nor runs up calls."""
    prompt = "x" * 30000  # an answer of about as much: the stand-in echoes it
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}).encode()
    async with _gateway(sops_project) as (service, up):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, _address(service))
        _, writer = await asyncio.open_connection(sock=sock)
        assert service.runner.server is not None
        await asyncio.sleep(0.05)
        (ours,) = [c for c in service.runner.server.connections if isinstance(c, FastConnection)]
        assert ours.transport is not None
        ours.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        before, most = len(up.requests), 0
        for _ in range(40):
            writer.write(_request(body))
            await asyncio.sleep(0.03)
            if ours.transport is not None:
                most = max(most, ours.transport.get_write_buffer_size())
        taken = len(up.requests) - before
        writer.transport.abort()
    assert most < 200_000 and taken < 10, (most, taken)


async def test_a_bug_after_the_relay_closes_the_connection_and_the_service_goes_on(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception out of `Gateway.relayed` (a bug) leaves no connection waiting forever:
    it is logged and the connection closed, and the next connection is answered."""
    async with _gateway(sops_project) as (service, _):
        gateway = service.app[GATEWAY]

        async def broken(*args: object) -> NoReturn:
            raise RuntimeError("a bug")

        monkeypatch.setattr(gateway, "relayed", broken)
        reader, writer = await asyncio.open_connection(*_address(service))
        writer.write(_request())
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        monkeypatch.undo()
        (answer,) = await _exchange(service, _request())
        assert answer.status == 200
    assert any("a bug" in str(r.exc_info) for r in caplog.records if r.exc_info)


# -- an aiohttp without the private names the fast path uses ----------------------------------


def test_the_answers_module_imports_without_aiohttps_private_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    """An aiohttp without `http_writer._serialize_headers` or `helpers`' private names: the module
    still imports (`serve` starts), and the fast path knows it lacks them (`missing`)."""
    import importlib.util

    from aiohttp import helpers, http_writer

    from service.http import fast_check, fast_request

    monkeypatch.delattr(http_writer, "_serialize_headers")
    monkeypatch.delattr(helpers, "HeadersMixin")  # not in `aiohttp.helpers.__all__` either
    monkeypatch.delattr(helpers, "rfc822_formatted_time")
    spec = importlib.util.spec_from_file_location("fast_request_copy", fast_request.__file__)
    assert spec is not None and spec.loader is not None
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy._serialize_headers is copy._absent
    monkeypatch.setattr(fast_check, "fast_request", copy)
    assert fast_check.unlike_aiohttp() is not None


async def test_without_a_private_name_serve_runs_on_aiohttps_server_alone(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp upgraded within the allowed range and a private name the fast path uses is gone:
    the site starts as aiohttp's `TCPSite`, saying so in one log line, and answers as ever."""
    from service.http import fast_request

    monkeypatch.setattr(fast_request, "_serialize_headers", fast_request._absent)
    caplog.set_level(logging.WARNING, logger="service.http.fast")
    async with _gateway(sops_project) as (service, _):
        (answer,) = await _exchange(service, _request())
        assert answer.status == 200
        assert service.runner.server is not None
        assert not [c for c in service.runner.server.connections if isinstance(c, FastConnection)]
    said = [r.getMessage() for r in caplog.records if r.name == "service.http.fast"]
    assert len(said) == 1 and "_serialize_headers" in said[0], said


async def test_a_site_lacking_a_private_attribute_is_told(sops_project: SopsProject) -> None:
    from service.http.fast_site import missing

    async with _gateway(sops_project) as (service, _):
        site = FastSite(service.runner, service.app[GATEWAY], "127.0.0.1", 0)
        assert missing(site) == []
        del site._backlog
        assert missing(site) == ["BaseSite._backlog"]


async def test_a_server_that_reads_more_of_a_connection_is_told(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's `Server` renamed what it reads of a connection it keeps (`_task_handler`): the
    fast path is off rather than an AttributeError when a connection is lost."""
    from service.http.fast_site import missing

    def connection_lost(self: Server, handler: Any, exc: BaseException | None = None) -> None:
        if handler in self._connections:
            if handler._handler_task:
                handler._handler_task.add_done_callback(lambda f: self._connections.pop(handler, None))
            else:
                del self._connections[handler]

    async with _gateway(sops_project) as (service, _):
        site = FastSite(service.runner, service.app[GATEWAY], "127.0.0.1", 0)
        assert missing(site) == []
        with monkeypatch.context() as patched:
            patched.setattr(Server, "connection_lost", connection_lost)
            assert missing(site) == ["Server.connection_lost as it was (it uses _handler_task)"]


async def test_a_fast_answer_unlike_aiohttps_turns_the_fast_path_off(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the fast path uses of aiohttp, changed in a way no name tells (`HeadersMixin`, the
    `Date`): a request and an answer made at start show it, and the fast path is off."""
    from service.http import fast_check, fast_request
    from service.http.fast_site import missing

    async with _gateway(sops_project) as (service, _):
        site = FastSite(service.runner, service.app[GATEWAY], "127.0.0.1", 0)
        assert fast_check.unlike_aiohttp() is None and missing(site) == []
        with monkeypatch.context() as patched:
            patched.setattr(HeadersMixin, "content_length", property(lambda self: "7"))
            assert missing(site) == ["a fast request or answer as aiohttp's (content_length '7')"]
        with monkeypatch.context() as patched:

            def gone() -> str:
                raise AttributeError("rfc822_formatted_time")

            patched.setattr(fast_request, "rfc822_formatted_time", gone)
            assert missing(site) == [
                "a fast request or answer as aiohttp's (AttributeError('rfc822_formatted_time'))"
            ]

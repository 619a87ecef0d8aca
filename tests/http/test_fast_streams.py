"""Streams on the gateway's own server (service/http/fast.py): written by aiohttp's own
`StreamResponse` and `StreamWriter` onto the fast path's connection, as aiohttp's server writes
them; the connection goes on after them, a client that leaves or reads slowly is felt by the
relay, and a shutdown lets a stream finish within its timeout."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any, cast

import pytest
import yaml
from aiohttp import http_writer, web

from service.http.context import RELAY
from service.http.fast import FastConnection
from service.http.fast_site import FastSite, missing
from service.http.gateway import GATEWAY
from service.usage.record import Record
from tests.conftest import Service, SopsProject, eventually, serve
from tests.http.test_fast_path import (
    HAND_OFF,
    STREAM,
    _address,
    _exchange,
    _read_answer,
    _read_stream,
    _request,
    _site,
)
from tests.support.gateway import write_provider, write_routing
from tests.support.upstreams import FakeUpstream, serving

TOKEN = "sb-fast-streams-token-0123456789abc"
PRICING = {"*": {"input": 1_000_000, "output": 2_000_000}}
"""1 USD a token in, 2 out."""


class _Records:
    """The meter's sink: every record kept."""

    def __init__(self) -> None:
        self.kept: list[Record] = []

    def submit(self, record: Record) -> None:
        self.kept.append(record)


def _write_client(project: SopsProject) -> None:
    """One client, TOKEN, with a budget: its requests are metered."""
    entry = {
        "name": "client",
        "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
        "scopes": ["completions"],
        "limits": {"budget": {"usd": "1000000000", "period": "day"}},
    }
    path = project.providers / "clients.yaml"
    path.write_text(yaml.safe_dump({"kind": "clients", "clients": [entry]}, sort_keys=False))


@contextlib.asynccontextmanager
async def _metered(
    project: SopsProject, up_url: str, *, fast: bool = True
) -> AsyncIterator[tuple[Service, _Records]]:
    write_provider(project, "a", provider="openai", base_url=up_url, api_key="sk-up", pricing=PRICING)
    write_routing(project, chat="a")
    _write_client(project)
    async with serve(project, fast=fast) as service:
        records = _Records()
        meter = service.app[RELAY].meter
        assert meter is not None
        meter.sink = records
        yield service, records


def _ours(service: Service) -> list[FastConnection]:
    assert service.runner.server is not None
    return [c for c in service.runner.server.connections if isinstance(c, FastConnection)]


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _chunks(text: str) -> list[bytes]:
    """A chat stream saying `text`, a word an event, with its usage and `[DONE]`."""
    words = [_event({"choices": [{"index": 0, "delta": {"content": w}}]}) for w in text.split(" ")]
    usage = _event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    return [*words, usage, b"data: [DONE]\n\n"]


def _streaming(events: list[bytes], *, pause_s: float = 0.0, json_answer: bool = False) -> web.Application:
    """An upstream answering every chat request with `events` (a pause between them), or, with
    `json_answer`, with a whole JSON answer whatever the request asked (a server ignoring `stream`)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        if json_answer:
            return web.json_response(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "model": "fake-model",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, event in enumerate(events):
            if i and pause_s:
                await asyncio.sleep(pause_s)
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _dechunked(body: bytes) -> bytes:
    out, at = b"", 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        out += body[end + 2 : end + 2 + size]
        at = end + 4 + size
        if not size:
            return out


# -- the same answers as aiohttp's -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["not a stream after all", "a stream over the writer's limit"])
async def test_a_stream_is_answered_as_aiohttp_answers_it(sops_project: SopsProject, kind: str) -> None:
    """A stream request whose upstream answers whole JSON, and a stream whose writes go past
    aiohttp's `StreamWriter` limit (it drains): the same bytes on both paths (but `Date`)."""
    big = kind != "not a stream after all"
    events = _chunks(" ".join(["x" * 40_000] * 4)) if big else []
    app = _streaming(events, pause_s=0.02, json_answer=not big)
    async with serving(app) as url:
        write_provider(sops_project, "a", base_url=f"{url}/v1")
        write_routing(sops_project, chat="a")
        async with serve(sops_project) as service:
            site, before = _site(service), _site(service).handed_off
            request = _request(STREAM)
            head, _, body = request.partition(b"\r\n\r\n")
            answers = []
            for extra in ("", HAND_OFF):
                (answer,) = await _exchange(service, head + b"\r\n" + extra.encode() + b"\r\n" + body)
                answers.append(answer)
            assert site.handed_off == before + 1  # the second, for its repeated field
    fast, usual = answers
    assert fast.comparable() == usual.comparable()
    assert fast.status == 200
    if big:
        assert fast.field("Transfer-Encoding") == "chunked"
        assert _dechunked(fast.body).endswith(b"data: [DONE]\n\n") and len(fast.body) > 160_000
    else:
        assert fast.field("Content-Length") and b'"whole"' in fast.body


async def test_a_stream_through_litellm_is_answered_as_aiohttp_answers_it(sops_project: SopsProject) -> None:
    """The litellm bridge's stream (a `StreamResponse` whose head goes out alone at `prepare`,
    then a write a chunk): the same bytes on both paths, but what litellm stamps on each call."""
    async with FakeUpstream(protocol="anthropic", name="claude", chunk_interval_s=0.01) as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key="sk-up")
        write_routing(sops_project, chat="claude")
        async with serve(sops_project) as service:
            before = _site(service).handed_off
            request = _request(STREAM.replace(b"fake-model", b"claude-x"))
            head, _, body = request.partition(b"\r\n\r\n")
            answers = []
            for extra in ("", HAND_OFF):
                (answer,) = await _exchange(service, head + b"\r\n" + extra.encode() + b"\r\n" + body)
                answers.append(answer)
            assert _site(service).handed_off == before + 1
    fast, usual = answers
    assert fast.status == 200 and b" says" in fast.body and b"data: [DONE]" in fast.body
    assert fast.field("Transfer-Encoding") == "chunked"
    line, fields, body = fast.comparable()
    assert (line, fields, _stamps(body)) == (*usual.comparable()[:2], _stamps(usual.comparable()[2]))


def _stamps(body: bytes) -> bytes:
    """`body` without what litellm stamps on each call (its ids, its times), kept as long."""
    return re.sub(rb'"(id|created)":("[^"]*"|\d+)', lambda m: re.sub(rb"[0-9a-zA-Z-]", b"x", m[0]), body)


async def test_a_stream_in_http_1_0_ends_with_the_connection(sops_project: SopsProject) -> None:
    """HTTP/1.0 has no chunks: the stream's body ends where the connection does, so the fast
    path closes it after the stream even when the client asked to keep it alive (aiohttp's
    server writes the same bytes and then keeps the connection, its body without an end)."""
    async with FakeUpstream(name="a", chunk_interval_s=0.01) as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with serve(sops_project) as service:
            request = _request(STREAM, version="1.0", extra="Connection: keep-alive\r\n")
            head, _, body = request.partition(b"\r\n\r\n")
            bodies = []
            for extra in ("", HAND_OFF):
                reader, writer = await asyncio.open_connection(*_address(service))
                writer.write(head + b"\r\n" + extra.encode() + b"\r\n" + body)
                read = b""
                if extra:  # aiohttp's: read up to the stream's last event
                    while not read.endswith(b"data: [DONE]\n\n"):
                        read += await asyncio.wait_for(reader.read(65536), 10)
                else:  # the fast path's: up to its end, the connection's
                    read = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                bodies.append(read)
    fast, usual = (_masked(b) for b in bodies)
    assert fast == usual
    assert fast.startswith(b"HTTP/1.0 200 OK\r\n") and b"Transfer-Encoding" not in fast
    assert b"\r\nConnection:" not in fast and fast.endswith(b"data: [DONE]\n\n")


def _masked(answer: bytes) -> bytes:
    answer = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", answer)
    answer = re.sub(rb"\r\nx-ratelimit-remaining-requests: \d+", b"", answer)
    answer = re.sub(rb"\r\nx-request-id: [^\r]*", b"", answer)
    return re.sub(rb'"created": \d+', b'"created": 0', answer)


# -- the connection after a stream --------------------------------------------------------------


async def test_a_request_sent_during_a_stream_is_answered_after_it(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a", chunk_interval_s=0.05) as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with serve(sops_project) as service:
            before = _site(service).handed_off
            reader, writer = await asyncio.open_connection(*_address(service))
            writer.write(_request(STREAM))
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # the stream's head
            writer.write(_request())  # while the stream goes on
            stream = await _read_stream(reader)
            answer = await _read_answer(reader)
            writer.close()
            assert stream.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            assert answer.status == 200 and b"a says: hi" in answer.body
            assert _site(service).handed_off == before


# -- clients that leave or read slowly ----------------------------------------------------------


async def test_a_client_that_leaves_mid_stream_is_charged_recorded_and_its_connection_closed(
    sops_project: SopsProject,
) -> None:
    """As on aiohttp with handler cancellation: the relay is cancelled, the stream is charged its
    reservation and recorded, and the connection is gone from the server's."""
    async with (
        FakeUpstream(name="a", chunk_interval_s=0.2) as up,
        _metered(sops_project, up.base_url) as (service, records),
    ):
        before = _site(service).handed_off
        reader, writer = await asyncio.open_connection(*_address(service))
        writer.write(_request(STREAM, token=TOKEN))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)  # the first event, then away
        (ours,) = _ours(service)
        relaying = ours.task
        writer.transport.abort()
        await eventually(lambda: len(records.kept) == 1, timeout=10)
        await eventually(lambda: not _ours(service), timeout=5)
        assert relaying is not None and relaying.cancelled()
        assert ours.transport is None and ours.task is None  # let go of: no cycle (test_fast_cycles)
        (after,) = await _exchange(service, _request(token=TOKEN))
        assert _site(service).handed_off == before
    record = records.kept[0]
    sent_id = re.search(rb"\r\nx-request-id: ([^\r]*)", head, re.IGNORECASE)
    assert sent_id is not None and record.id == sent_id[1].decode()
    assert record.stream and record.estimated and record.status == 200 and record.cost_usd > Decimal(0)
    assert after.status == 200


async def test_a_slow_reader_holds_the_relay_back_not_the_services_memory(sops_project: SopsProject) -> None:
    """A client that reads nothing: the stream's writes wait for it (`pause_writing`, the
    `StreamWriter`'s drain), so what the service holds for it stays bounded; once it reads, it
    gets the whole stream, in order."""
    events = _chunks(" ".join(f"{i:05d}" + "x" * 20_000 for i in range(100)))  # ~2 MB
    async with (
        serving(_streaming(events)) as url,
        _metered(sops_project, f"{url}/v1") as (service, records),
    ):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, _address(service))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
        await asyncio.sleep(0.05)
        (ours,) = _ours(service)
        assert ours.transport is not None
        ours.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        incoming = cast(asyncio.Transport, writer.transport)
        incoming.pause_reading()  # the client reads nothing
        writer.write(_request(STREAM, token=TOKEN))
        most = 0
        for _ in range(30):
            await asyncio.sleep(0.02)
            if ours.transport is not None:
                most = max(most, ours.transport.get_write_buffer_size())
        assert ours.blocked and ours.drained is not None  # the relay waits for the client
        assert most < 300_000 and not records.kept, most
        incoming.resume_reading()
        answer = await _read_answer(reader)
        writer.close()
        await eventually(lambda: len(records.kept) == 1, timeout=10)
    assert _dechunked(answer.body) == b"".join(events[:-2] + events[-1:])  # but the usage chunk
    assert records.kept[0].completion_tokens == 2 and not records.kept[0].estimated


@pytest.mark.parametrize("fast", [True, False])
async def test_a_bug_after_a_stream_ended_writes_nothing_more_and_the_connection_goes_on(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """An exception out of the relay after its stream was written whole (a bug: `relayed`
    answers it with a 500): the client has its answer, and nothing more is written, as aiohttp's
    ended writer writes nothing; the next request on the connection gets its own answer."""
    async with FakeUpstream(name="a", chunk_interval_s=0.01) as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with serve(sops_project, fast=fast) as service:
            relay = service.app[RELAY].relay

            async def late(call: Any, snapshot: Any) -> web.StreamResponse:
                await relay(call, snapshot)
                monkeypatch.undo()  # the next request is relayed as usual
                raise RuntimeError("a bug")

            monkeypatch.setattr(service.app[RELAY], "relay", late)
            reader, writer = await asyncio.open_connection(*_address(service))
            writer.write(_request(STREAM))
            stream = await _read_answer(reader)
            writer.write(_request())
            after = await _read_answer(reader)
            writer.close()
    assert stream.status == 200 and stream.body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert after.status == 200 and b"a says: hi" in after.body


@pytest.mark.parametrize("written", [True, False])
async def test_a_bug_once_a_stream_began_closes_the_connection_unless_nothing_went_out(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch, written: bool
) -> None:
    """An exception out of the relay once its stream was prepared (a bug). Once bytes of it went
    out, it cannot end as it should, nor an error answer be written in its middle (aiohttp's
    server writes one as a chunk of the stream): the connection is closed, the stream cut, which
    the client can tell. While none did (its head held for its first bytes), the error answer
    goes instead, whole, and the connection goes on."""
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with serve(sops_project) as service:

            async def broken(call: Any, snapshot: Any) -> web.StreamResponse:
                answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                answer._send_headers_immediately = False  # as the relay's (`sse.Answer`)
                await answer.prepare(call.request)
                call.prepared = answer
                if written:
                    await answer.write(b"data: {}\n\n")
                raise RuntimeError("a bug")

            monkeypatch.setattr(service.app[RELAY], "relay", broken)
            reader, writer = await asyncio.open_connection(*_address(service))
            writer.write(_request(STREAM))
            if written:
                read = await asyncio.wait_for(reader.read(), 5)  # up to the connection's end
            else:
                answer = await _read_answer(reader)
                monkeypatch.undo()
                writer.write(_request())
                after = await _read_answer(reader)
            writer.close()
            monkeypatch.undo()
            (last,) = await _exchange(service, _request())
    if written:
        assert read.startswith(b"HTTP/1.1 200 OK\r\n")
        assert read.endswith(b"\r\n\r\na\r\ndata: {}\n\n\r\n"), read  # the chunk written, no more
    else:
        assert answer.status == 500 and answer.field("Content-Type") == "application/json; charset=utf-8"
        assert json.loads(answer.body)["error"]["type"] == "internal_error"
        assert after.status == 200
    assert last.status == 200


# -- shutdown -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("pause_s", [0.02, 0.4])
async def test_shutdown_lets_a_stream_finish_within_its_timeout(
    sops_project: SopsProject, pause_s: float, fast: bool
) -> None:
    """Shut down during a stream (`serve`'s shutdown timeout: 0.5 s): one that ends within it
    (0.1 s after its first event) is written whole, then its connection closed; one that does
    not (2 s) is cut at the timeout (docs/reference.md §3.2). aiohttp's server, which cancels
    the request's body at the timeout and waits as long again, cuts it at twice the timeout."""
    events = _chunks("one two three four")
    async with (
        serving(_streaming(events, pause_s=pause_s)) as url,
        _metered(sops_project, f"{url}/v1", fast=fast) as (service, _),
    ):
        reader, writer = await asyncio.open_connection(*_address(service))
        writer.write(_request(STREAM, token=TOKEN))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        started = time.perf_counter()
        stopping = asyncio.create_task(service.stop())
        read = await asyncio.wait_for(reader.read(), 5)  # up to the connection's end
        await asyncio.wait_for(stopping, 5)
        took = time.perf_counter() - started
        writer.close()
    if pause_s * (len(events) - 1) < 0.5:
        assert read.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") and took < 1.0
    elif fast:
        assert b"data: [DONE]" not in read and 0.4 < took < 0.9
    else:
        assert b"data: [DONE]" not in read and 0.9 < took < 2.0


# -- what the fast path relies on in aiohttp ----------------------------------------------------


async def test_an_aiohttp_writing_streams_otherwise_turns_the_fast_path_off(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `StreamWriter` that no longer waits through the connection's `_drain_helper`, or a
    `StreamResponse` that reads another name of a request, or that does not tell its
    `body_length` once ended: told at start, the fast path is off."""
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with serve(sops_project) as service:
            site = FastSite(service.runner, service.app[GATEWAY], "127.0.0.1", 0)
            assert missing(site) == []
            with monkeypatch.context() as patched:

                async def drain(self: http_writer.StreamWriter) -> None:
                    return None

                patched.setattr(http_writer.StreamWriter, "drain", drain)
                assert missing(site) == [
                    "a fast request or answer as aiohttp's "
                    "(a stream's write does not wait for a blocked connection)"
                ]
            with monkeypatch.context() as patched:

                async def start(self: web.StreamResponse, request: Any) -> Any:
                    return request._stream_writer

                patched.setattr(web.StreamResponse, "_start", start)
                (said,) = missing(site)
                assert said.startswith("a fast request or answer as aiohttp's (a stream: AttributeError(")
            with monkeypatch.context() as patched:  # what `_relay` reads to tell a stream ended
                patched.setattr(web.StreamResponse, "body_length", property(lambda self: 0))
                assert missing(site) == [
                    "a fast request or answer as aiohttp's (a stream's body_length is not told at its end)"
                ]

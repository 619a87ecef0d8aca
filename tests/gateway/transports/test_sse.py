"""Relaying an event stream to the client (`transports.sse`), through one `OpenAITransport`:
what the client gets, in how many writes, and what is counted.

The client's socket writes are counted on its real transport (`transport.write` wrapped, the
bytes still written), so that the head, the stream and its end going out together is seen
as the client's kernel gets it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from service.config.models import Provider
from service.gateway.call import Call
from service.gateway.transports.base import open_session
from service.gateway.transports.openai import OpenAITransport
from service.gateway.transports.response import Response
from tests.gateway.transports.test_openai import server
from tests.support.upstreams import serving
from tests.support.wire import raw, read_request

EVENTS = [
    {"id": "c", "model": "up-model", "choices": [{"index": 0, "delta": {"content": "one"}}], "usage": None},
    {"id": "c", "model": "up-model", "choices": [{"index": 0, "delta": {"content": " two"}}], "usage": None},
]
USAGE = {"id": "c", "model": "up-model", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def chunked(body: bytes) -> bytes:
    """A whole event-stream answer in HTTP/1.1's chunked coding."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@dataclass
class Relayed:
    """A client in front of one transport: the calls it relayed, the socket writes of each answer."""

    url: str
    http: aiohttp.ClientSession
    calls: list[Call] = field(default_factory=list)
    writes: list[list[bytes]] = field(default_factory=list)

    async def stream(self, body: dict[str, Any]) -> tuple[int, bytes]:
        async with self.http.post(f"{self.url}/chat/completions", json=body) as response:
            return response.status, await response.read()


@contextlib.asynccontextmanager
async def relaying(provider: Provider) -> AsyncIterator[Relayed]:
    async with open_session() as session, aiohttp.ClientSession() as http:
        transport = OpenAITransport(session)
        relayed = Relayed("", http)

        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            call = Call(request, "chat", "/chat/completions", body, json.loads(body))
            relayed.calls.append(call)
            writes: list[bytes] = []
            relayed.writes.append(writes)
            socket = request.transport
            assert socket is not None
            socket.write = _counted(socket.write, writes)  # type: ignore[method-assign]
            socket.writelines = _counted_lines(socket.writelines, writes)  # type: ignore[method-assign]
            return await transport.send(call, provider, {"x-switchboard-provider": provider.id})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        async with serving(app) as url:
            relayed.url = f"{url}/v1"
            yield relayed


def _counted(write: Callable[[Any], None], writes: list[bytes]) -> Callable[[Any], None]:
    def counted(data: Any) -> None:
        writes.append(bytes(data))
        write(data)

    return counted


def _counted_lines(writelines: Callable[[Any], None], writes: list[bytes]) -> Callable[[Any], None]:
    def counted(lines: Any) -> None:
        lines = list(lines)
        writes.append(b"".join(bytes(line) for line in lines))
        writelines(lines)

    return counted


def _body(written: bytes) -> bytes:
    """The body of a chunked answer as written: its chunks' bytes, joined."""
    rest = written.split(b"\r\n\r\n", 1)[1]
    body = b""
    while True:
        size, rest = rest.split(b"\r\n", 1)
        length = int(size, 16)
        if not length:
            assert rest == b"\r\n"
            return body
        body, rest = body + rest[:length], rest[length + 2 :]


async def test_a_stream_read_whole_reaches_the_client_in_one_write() -> None:
    wire = sse(*EVENTS, USAGE)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(chunked(wire))  # head, events and end in one read of the gateway
        await writer.drain()
        await reader.read()

    async with raw(upstream) as url, relaying(server(url.removesuffix("/x"))) as relayed:
        asked = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
        status, body = await relayed.stream(asked)
    assert (status, body) == (200, wire)
    [written] = relayed.writes  # the status line, the headers, the events and the end, together
    assert len(written) == 1
    assert written[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/event-stream\r\n" in written[0]
    assert b"\r\nCache-Control: no-cache\r\n" in written[0]
    assert b"\r\nTransfer-Encoding: chunked\r\n" in written[0]
    assert _body(written[0]) == wire
    call = relayed.calls[0]
    assert call.usage == {"prompt_tokens": 5, "completion_tokens": 2}
    assert call.answer_model == "up-model"
    assert call.broken is None


async def test_the_usage_chunk_asked_for_is_dropped_from_a_stream_read_whole() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(chunked(sse(*EVENTS, USAGE)))
        await writer.drain()
        await reader.read()

    async with raw(upstream) as url, relaying(server(url.removesuffix("/x"))) as relayed:
        status, body = await relayed.stream({"model": "m", "messages": [], "stream": True})
    assert (status, body) == (200, sse(*EVENTS))  # the last event and its blank line too
    assert len(relayed.writes[0]) == 1
    assert relayed.calls[0].usage == {"prompt_tokens": 5, "completion_tokens": 2}


async def test_the_head_is_not_held_back_for_a_torn_first_event() -> None:
    more = asyncio.Event()
    wire = sse(*EVENTS, USAGE)

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(wire[:9])  # no whole event: the relay has nothing to write yet
        await asyncio.wait_for(more.wait(), 5)  # the client must have the head by then
        await response.write(wire[9:])
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", stream)
    async with serving(upstream) as url, relaying(server(f"{url}/v1")) as relayed:
        body = {"model": "m", "messages": [], "stream": True}  # the usage chunk dropped: whole events only
        async with relayed.http.post(f"{relayed.url}/chat/completions", json=body) as response:
            more.set()  # the head came alone, before any event
            relayed_body = await response.read()
    assert response.status == 200
    assert relayed_body == sse(*EVENTS)
    assert relayed.writes[0][0].endswith(b"\r\n\r\n") and b"data:" not in relayed.writes[0][0]
    assert relayed.calls[0].usage == {"prompt_tokens": 5, "completion_tokens": 2}


async def test_a_stream_cut_short_ends_with_its_error_event_in_the_last_write() -> None:
    first = sse(EVENTS[0]).removesuffix(b"data: [DONE]\n\n")

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()  # broken off inside the chunked body

    async with raw(upstream) as url, relaying(server(url.removesuffix("/x"))) as relayed:
        asked = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
        status, body = await relayed.stream(asked)
    assert status == 200
    assert body.startswith(first)
    error = json.loads(body[len(first) :].strip().removeprefix(b"data: "))
    assert error["error"]["type"] == "upstream_failed"
    assert error["error"]["message"].startswith("stream cut short")
    written = relayed.writes[0]
    assert len(written) == 2  # the head with the first event; the error event with the end
    assert written[1].endswith(b"\r\n0\r\n\r\n") and b"upstream_failed" in written[1]
    assert relayed.calls[0].broken is not None and relayed.calls[0].broken.startswith("stream cut short")


async def test_a_steady_stream_many_silences_long_is_whole_and_the_silence_after_it_cut_at_the_limit() -> (
    None
):
    # The waits share one timer, re-armed as the chunks come: none of them cuts a stream whose
    # chunks each come within the limit, and the silence after them is cut at the limit.
    idle, chunks = 0.15, 25
    loop = asyncio.get_running_loop()
    times: dict[str, float] = {}

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        times["first"] = loop.time()
        for _ in range(chunks):  # one every 0.04 s: about seven limits in all
            await response.write(sse(EVENTS[0]).removesuffix(b"data: [DONE]\n\n"))
            times["last"] = loop.time()
            await asyncio.sleep(0.04)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # the gateway dropped the connection
            times["cut"] = loop.time()
            raise
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", stream)
    async with serving(upstream) as url, relaying(server(f"{url}/v1", idle_timeout_s=idle)) as relayed:
        status, body = await relayed.stream({"model": "m", "messages": [], "stream": True})
        for _ in range(100):
            if "cut" in times:
                break
            await asyncio.sleep(0.01)
    assert status == 200
    assert body.count(b'"content": "one"') == chunks
    assert times["last"] - times["first"] > 5 * idle
    error = json.loads(body.rstrip().rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))
    assert error["error"]["message"] == f"stream cut short: no chunk within {idle:g} s"
    assert relayed.calls[0].broken is not None
    assert (
        idle - 0.01 <= times["cut"] - times["last"] < 2 * idle + 0.1
    )  # not before the limit, nor long after


async def test_no_silence_timer_is_left_armed_after_streams_whole_or_left_by_their_client() -> None:
    left: list[asyncio.BaseTransport] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if body.get("leave"):
            assert request.transport is not None
            left.append(request.transport)
        for event in (*EVENTS, USAGE):
            await response.write(sse(event).removesuffix(b"data: [DONE]\n\n"))
            await asyncio.sleep(0.01)
        await response.write(b"data: [DONE]\n\n")
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", stream)
    async with serving(upstream) as url, relaying(server(f"{url}/v1", idle_timeout_s=30)) as relayed:
        for i in range(10):
            body = {"model": "m", "messages": [], "stream": True, "leave": i % 2 == 1}
            if not body["leave"]:
                assert await relayed.stream(body) == (200, sse(*EVENTS))
                continue
            async with (
                aiohttp.ClientSession() as once,  # its connection goes with it, mid-stream
                once.post(f"{relayed.url}/chat/completions", json=body) as response,
            ):
                assert (await response.content.readany()).startswith(b"data: ")
        await asyncio.sleep(0.2)
        gc.collect()
        armed = [
            r
            for r in gc.get_objects()
            if isinstance(r, Response) and r._timer is not None and not r._timer.cancelled()
        ]
        assert armed == []  # a timer left armed would hold its answer for the idle limit (30 s)
        assert len(left) == 5 and all(transport.is_closing() for transport in left)  # dropped, not pooled
    assert [call.usage for call in relayed.calls[::2]] == [{"prompt_tokens": 5, "completion_tokens": 2}] * 5

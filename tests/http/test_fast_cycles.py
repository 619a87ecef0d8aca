"""No reference cycle outlives a request: what one holds (its body, the upstream's answer, a
stream's chunks, its connections, a task) is freed by reference counting as its answer ends,
not left to the cyclic collector, which `serve` runs rarely (`YOUNG_ALLOCATIONS`): a 1 MB body
held by a cycle is 1 MB a request until the next collection.

Each test sends requests of one kind on both paths (the fast path, and handed to aiohttp) with
the collector off, then asks it what it would free (`gc.DEBUG_SAVEALL`). asyncio's own
selector transport holds itself (a bound method, in CPython 3.11), closed and small: not ours,
and not on uvloop, `serve`'s loop; it is not looked for."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import httptools
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler

from service.http.context import HEALTH
from tests.conftest import Service, SopsProject, eventually, serve
from tests.http.test_fast_path import CHAT, HAND_OFF, STREAM, TOKEN, _address, _read_answer, _request, _site
from tests.support.gateway import write_clients, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, closed_port_url

LARGE = 100_000
"""A `bytes` or `bytearray` this long, held by garbage, is a body (or an answer) held by a cycle."""
BIG = CHAT.replace(b'"hi"', b'"' + b"y" * 1_000_000 + b'"')
PROVIDERS = ("a", "down", "b")
"""The chat route: `a` first, then `down` (nobody listens: refused), then `b`."""
_HELD = (
    web.StreamResponse,
    web.BaseRequest,
    StreamWriter,
    RequestHandler,
    httptools.HttpRequestParser,
    httptools.HttpResponseParser,
    asyncio.Future,  # a task too
    types.FrameType,
    types.TracebackType,
    BaseException,
)


@contextlib.asynccontextmanager
async def _gateway(project: SopsProject) -> AsyncIterator[tuple[Service, FakeUpstream, FakeUpstream]]:
    write_clients(project, {"app": (TOKEN, ["completions"])})
    async with FakeUpstream(name="a") as a, FakeUpstream(name="b") as b:
        write_provider(project, "a", base_url=a.base_url, models=["fake-model"], timeout_s=0.2)
        write_provider(project, "down", base_url=closed_port_url(), models=["fake-model"])
        write_provider(project, "b", base_url=b.base_url, models=["fake-model"])
        write_routing(project, chat={"primary": "a", "fallbacks": ["down", "b"]})
        async with serve(project) as service:
            yield service, a, b


async def _send(service: Service, request: bytes, *, leave: bool = False) -> int:
    """Send `request` on a connection of its own; its answer's status. `leave`: the client
    leaves once the answer's head and first bytes came."""
    for provider in PROVIDERS:  # each request finds the providers as the first did
        service.app[HEALTH].reset(provider)
    reader, writer = await asyncio.open_connection(*_address(service))
    try:
        writer.write(request)
        if leave:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.transport.abort()
            return int(head.split(b" ")[1])
        return (await _read_answer(reader)).status
    finally:
        writer.close()


def _held(garbage: list[object]) -> str:
    """What of `garbage` a request's cycle would hold: the kinds of objects above, the types of
    the service's own, and large bodies (`bytes` is not tracked by the collector: it is looked
    for among what the garbage refers to)."""
    kinds = Counter(
        type(o).__qualname__
        for o in garbage
        if isinstance(o, _HELD) or type(o).__module__.startswith("service.")
    )
    large = sum(
        1
        for o in garbage
        for r in gc.get_referents(o)
        if isinstance(r, bytes | bytearray) and len(r) >= LARGE
    )
    if large:
        kinds[f"bytes of {LARGE} or more"] = large
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))


async def _left_to_collector(
    service: Service, label: str, send: Callable[[str], Awaitable[int]], expected: int, times: int = 3
) -> None:
    """Send `times` requests of a kind (`send`, given the extra fields of a path) on each path,
    the collector off: once they are answered and their connections gone, it finds none of
    what a request holds."""
    server = _site(service).server
    for path, extra in (("the fast path", ""), ("aiohttp's path", HAND_OFF)):
        kept = set(server.connections)  # the test's own session's, kept alive
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what it would free is kept in gc.garbage, to be told
        try:
            statuses = [await send(extra) for _ in range(times)]
            await eventually(lambda kept=kept: set(server.connections) <= kept)  # their tasks ended
            for _ in range(3):  # an upstream connection aborted is lost a turn of the loop later
                await asyncio.sleep(0)
            gc.collect()
            held = _held(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert statuses == [expected] * times, f"{label} over {path}"
        assert not held, f"{label} over {path}: left to the cyclic collector: {held}"


def _with(request: bytes, extra: str) -> bytes:
    """`request` with the fields `extra` (`HAND_OFF`: it is aiohttp's)."""
    head, _, body = request.partition(b"\r\n\r\n")
    return head + b"\r\n" + extra.encode() + b"\r\n" + body


async def test_an_answer_of_each_kind_leaves_no_cycle(sops_project: SopsProject) -> None:
    """A whole answer, a stream, the gateway's refusals, a large body: the request (which held
    itself as its `content`) and its connection (held by its parser's callbacks) go with it."""
    async with _gateway(sops_project) as (service, _, _):
        kinds: list[tuple[str, bytes, int]] = [
            ("a chat completion", _request(token=TOKEN), 200),
            ("a stream", _request(STREAM, token=TOKEN), 200),
            ("a 401 (no token)", _request(), 401),
            ("a 400 (no JSON)", _request(b"{not json", token=TOKEN), 400),
            ("a 1 MB body", _request(BIG, token=TOKEN), 200),
        ]
        for label, request, status in kinds:
            await _left_to_collector(
                service, label, lambda extra, r=request: _send(service, _with(r, extra)), status
            )


async def test_a_client_that_leaves_mid_stream_leaves_no_cycle(sops_project: SopsProject) -> None:
    """The request's task, cancelled, keeps its `CancelledError`, whose traceback holds the
    frames that held the connection, the request and its body: the connection lets go of it."""
    async with _gateway(sops_project) as (service, a, _):
        a.chunk_interval_s = 0.2  # the stream is under way when the client leaves

        async def leave(extra: str) -> int:
            return await _send(service, _with(_request(STREAM, token=TOKEN), extra), leave=True)

        await _left_to_collector(service, "a stream the client left", leave, 200)


async def test_an_upstream_timeout_leaves_no_cycle(sops_project: SopsProject) -> None:
    """A wait for the upstream's answer failed by its deadline keeps its `TimeoutError`, whose
    traceback holds the frames that sent the request (its 1 MB body): the frame lets go of it."""
    async with _gateway(sops_project) as (service, a, _):

        async def timed_out(extra: str) -> int:
            a.hang(1.0, times=1)  # over `a`'s timeout_s: then `down`, refused, then `b`
            return await _send(service, _with(_request(BIG, token=TOKEN), extra))

        await _left_to_collector(service, "a 1 MB body whose upstream timed out", timed_out, 200, times=2)


async def test_an_upstream_that_breaks_off_leaves_no_cycle(sops_project: SopsProject) -> None:
    """An answer broken off keeps its error (`Response._error`), raised to its reader: its
    traceback holds the frames that read it, the answer among them; and the upstream connection,
    gone, is held by its parser's callbacks. Neither outlives the exchange."""
    async with _gateway(sops_project) as (service, a, _):

        async def broken_off(request: bytes, extra: str) -> int:
            a.drop_after(1, times=1)  # a whole answer cut in half, a stream after its first event
            return await _send(service, _with(request, extra))

        for label, request in (
            ("a whole answer", _request(token=TOKEN)),
            ("a stream", _request(STREAM, token=TOKEN)),
        ):
            await _left_to_collector(
                service, f"{label} the upstream broke off", lambda extra, r=request: broken_off(r, extra), 200
            )


async def test_a_refused_upstream_leaves_no_cycle(sops_project: SopsProject) -> None:
    """A connection refused keeps its `OSError` (told in the attempt's reason), whose traceback
    held the frame that kept it: kept without it. The `Connection` is made once connected only."""
    async with _gateway(sops_project) as (service, a, b):

        async def refused(status: int, extra: str) -> int:
            a.fail(500, times=1)  # then `down`, refused
            if status == 502:
                b.fail(503, times=1)
            return await _send(service, _with(_request(token=TOKEN), extra))

        await _left_to_collector(
            service, "a fallback past a refused upstream", lambda e: refused(200, e), 200
        )
        await _left_to_collector(service, "a 502, every upstream failed", lambda e: refused(502, e), 502)

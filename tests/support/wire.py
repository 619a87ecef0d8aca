"""Real servers on port 0 for the lean upstream client's tests (`gateway.transports.wire` and
`.exchange`): raw asyncio servers, for what no well-behaved server sends, and a `Pool` and a
`post` to talk to them with."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from service.config.upstreams import AllowedUpstreams, Lookup, system_lookup
from service.gateway.transports.guard import GuardedResolver
from service.gateway.transports.wire import Endpoint, Pool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw(handler: Handler) -> AsyncIterator[str]:
    """A raw TCP server on port 0 running `handler` per connection; yields its URL."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/x"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """A request's head and its Content-Length's body, as read."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def pool(allowed: str = "", lookup: Lookup = system_lookup, **options: Any) -> AsyncIterator[Pool]:
    """A pool on a resolver allowing `allowed` (anything when empty), closed on the way out."""
    limits = AllowedUpstreams.parse(allowed) if allowed else AllowedUpstreams()
    made = Pool(GuardedResolver(limits, lookup), **options)
    try:
        yield made
    finally:
        made.close()


async def post(p: Pool, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    """POST `body` to `url`: the answer's status and its whole body."""
    response = await p.post(Endpoint.of(url), {"Content-Type": "application/json"}, body, connect_s=5)
    return response.status, await response.read(1 << 20)


def answer_of(status: int, body: bytes, *extra: bytes) -> bytes:
    """An answer with `body` and its length, and the header lines `extra`."""
    head = b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n" % (status, len(body))
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body

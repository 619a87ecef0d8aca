"""Redis replies bounded from their headers (`redis_replies.bounded`), for RESP2 and RESP3."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as redis
from redis._parsers import _AsyncRESP2Parser, _AsyncRESP3Parser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import InvalidResponse

from service.redis_replies import bounded


@asynccontextmanager
async def answering(reply: bytes) -> AsyncIterator[str]:
    """A server at the URL yielded that answers `HELLO` as Redis 7 does (RESP3), and every other
    command with `reply`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(b"%1\r\n+proto\r\n:3\r\n" if b"HELLO" in data else reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


PARSERS = [_AsyncRESP2Parser, _AsyncRESP3Parser]


def client(url: str, parser: type[_AsyncRESP2Parser] | type[_AsyncRESP3Parser]) -> redis.Redis:
    """A client whose replies are bounded to strings of 16 bytes and aggregates of 4 items."""
    return redis.Redis.from_url(
        url,
        protocol=2 if parser is _AsyncRESP2Parser else 3,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
        parser_class=bounded(parser, 16, 4),
    )


@pytest.mark.parametrize("parser", PARSERS)
async def test_a_reply_within_the_bounds_is_read(parser: type[_AsyncRESP2Parser]) -> None:
    async with answering(b"$16\r\n" + b"x" * 16 + b"\r\n") as url:
        connection = client(url, parser)
        try:
            assert await connection.get("k") == b"x" * 16
        finally:
            await connection.aclose()


@pytest.mark.parametrize(
    ("parser", "header"),
    [
        (_AsyncRESP2Parser, b"$17"),
        (_AsyncRESP2Parser, b"*5"),
        (_AsyncRESP3Parser, b"$1500000000"),
        (_AsyncRESP3Parser, b"*100000000"),
        (_AsyncRESP3Parser, b"%5"),
        (_AsyncRESP3Parser, b"~5"),
        (_AsyncRESP3Parser, b"=17"),
    ],
)
async def test_a_reply_announcing_more_is_refused_before_it_is_read(
    parser: type[_AsyncRESP2Parser], header: bytes
) -> None:
    async with answering(header + b"\r\n") as url:  # nothing follows: a read would wait
        connection = client(url, parser)
        try:
            with pytest.raises(InvalidResponse, match="larger than Redis sends here"):
                await connection.get("k")
        finally:
            await connection.aclose()

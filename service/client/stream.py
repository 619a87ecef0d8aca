"""The event stream as the Python client reads it: followed across broken connections and
replicas (`follow`, behind `Switchboard.events`), in its wire format, Server-Sent Events whose
lines may be longer than aiohttp's own line limit."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp

from service.client.errors import Unavailable, raise_for
from service.client.models import Event

log = logging.getLogger("service.client")  # the logger applications configured before the split

REPLICA_HEADER = "X-Switchboard-Replica"
STREAM_SILENCE_S = 45.0
"""An event stream that brings not a byte for this long is reopened: the service sends a
comment every 15 s, so three missed mean it went silent."""

MAX_EVENT_BYTES = 64 << 20
"""The longest line of the event stream read: an event of a provider with a long models list
is over aiohttp's own line limit (128 or 512 KiB, by version)."""


async def read_lines(stream: aiohttp.StreamReader, limit: int = MAX_EVENT_BYTES) -> AsyncIterator[bytes]:
    """The lines of `stream`, each up to `limit` bytes (aiohttp's own `readline` stops at 128 KiB)."""
    buffer = bytearray()
    async for chunk in stream.iter_any():
        searched = len(buffer)
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", max(start, searched))) >= 0:
            yield bytes(buffer[start : end + 1])
            start = end + 1
        del buffer[:start]
        if len(buffer) > limit:
            raise aiohttp.ClientPayloadError(f"an event stream line is over {limit} bytes")
    if buffer:
        yield bytes(buffer)


async def parse_sse(stream: aiohttp.StreamReader) -> AsyncIterator[Event]:
    """Server-sent events (`id:`, `event:`, `data:` lines, a blank line ends one; `:` comments)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    async for raw in read_lines(stream):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                try:
                    payload = json.loads("\n".join(data))
                    seq = int(fields.get("id", payload.get("seq", 0)))
                except (ValueError, AttributeError):
                    payload, seq = None, 0
                if isinstance(payload, dict):
                    yield Event(seq, fields.get("event", str(payload.get("type", "message"))), payload)
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue  # a keep-alive comment
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value


async def follow(
    session: Callable[[], aiohttp.ClientSession],
    url: str,
    own_headers: Mapping[str, str],
    after: int | None,
    request_timeout_s: float,
    backoff: Callable[[int], float],
) -> AsyncIterator[Event]:
    """The events of the stream at `url`, reopened after `backoff(failures)` seconds when it
    breaks and resumed after the last one seen, as `Switchboard.events` says; `session` gives
    the client's session at each opening."""
    last = after
    replica: str | None = None
    """Whose log `last` counts in, once a stream has been opened."""
    opened = False
    failures = 0
    while True:
        headers = dict(own_headers)
        if last is not None:
            headers["Last-Event-ID"] = str(last)
        try:
            async with session().get(
                url,
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=request_timeout_s, sock_read=STREAM_SILENCE_S
                ),
            ) as response:
                await raise_for(response)
                answered_by = response.headers.get(REPLICA_HEADER)
                if opened and answered_by != replica and last is not None:
                    # Closed before reading: what it replays after `last` is another log's.
                    log.info("event stream: replica %r answers, not %r; starting over", answered_by, replica)
                    last = None
                    opened = False
                    continue
                replica, opened = answered_by, True
                failures += 1  # until it gives an event: one that ends at once is a failure too
                async for event in parse_sse(response.content):
                    failures = 0
                    last = event.seq
                    yield event
        except (aiohttp.ClientError, TimeoutError, Unavailable) as exc:
            failures += 1
            log.debug("event stream broken (%s); reopening", type(exc).__name__)
        await asyncio.sleep(backoff(failures))

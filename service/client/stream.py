"""The event stream's wire format as the Python client reads it: Server-Sent Events whose
lines may be longer than aiohttp's own line limit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp

from service.client.models import Event

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

"""A chat stream's server-sent events, read whole as their bytes arrive.

An upstream writes `data: {...}` events separated by blank lines, cut anywhere by the network;
`ChatEvents.feed` keeps a torn event until its end and yields each whole one: a chunk (a
JSON object), `DONE` for `data: [DONE]`, or an `UpstreamError` for an error event. Anything
else (a comment, an event that is not JSON) is skipped: a malformed upstream cannot break
the translation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

MAX_EVENT = 16 << 20
"""The longest event kept whole (a tool call's arguments may be long); a longer one is dropped."""


class _Done:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DONE"


DONE: Final = _Done()
"""`data: [DONE]`: the upstream's stream ended as it should."""


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """An error event in the upstream's stream (`data: {"error": {...}}`)."""

    message: str


Event = dict[str, Any] | _Done | UpstreamError


class ChatEvents:
    """Reads a chat stream's events whole, however its bytes are cut."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> Iterator[Event]:
        """The whole events that `data` completes, in order."""
        buffer = self._pending + data if self._pending else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            event = parse(buffer[start:end])
            start = end + 2
            if event is not None:
                yield event
        rest = buffer[start:]
        self._pending = rest if len(rest) <= MAX_EVENT else b""

    def flush(self) -> Iterator[Event]:
        """The last event, when the upstream ended without its blank line."""
        rest, self._pending = self._pending, b""
        event = parse(rest) if rest.strip() else None
        if event is not None:
            yield event


def parse(raw: bytes) -> Event | None:
    """One event's text as a chunk, `DONE` or an error; None for anything else."""
    lines = [line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    data = b"\n".join(lines)
    if data.strip() == b"[DONE]":
        return DONE
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    error = value.get("error")
    if error is not None and "choices" not in value:
        message = error.get("message") if isinstance(error, dict) else error
        return UpstreamError(str(message)[:1000] if message else "the upstream reported an error")
    return value

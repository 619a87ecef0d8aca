"""What the protocol tests share: recorded requests, chat streams to translate, events read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).parent / "recorded"


def recorded(name: str) -> list[dict[str, Any]]:
    """The requests a real client sent (tests/gateway/protocols/recorded/)."""
    data: list[dict[str, Any]] = json.loads((RECORDED / name).read_text())
    return data


def chat_stream(*chunks: dict[str, Any], done: bool = True) -> bytes:
    """A chat completion stream's bytes, as an upstream sends them."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "up-model"}
    events = [b"data: " + json.dumps({**base, **c}).encode() + b"\n\n" for c in chunks]
    return b"".join(events) + (b"data: [DONE]\n\n" if done else b"")


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    """A chunk with one choice's delta."""
    return {"choices": [{"index": index, "delta": fields, "finish_reason": finish}]}


def usage_chunk(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {"choices": [], "usage": {**usage, "prompt_tokens_details": {"cached_tokens": cached}}}


def tool_deltas(index: int, call_id: str, name: str, *pieces: str) -> list[dict[str, Any]]:
    """A tool call streamed as chat servers do: id and name first, then the arguments in pieces."""
    first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    rest = [{"index": index, "function": {"arguments": p}} for p in pieces]
    return [delta(tool_calls=[first]), *(delta(tool_calls=[r]) for r in rest)]


def events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Server-sent events read back: (event name, data) each."""
    out = []
    for raw in data.split(b"\n\n"):
        if not raw.strip():
            continue
        name, payload = "", None
        for line in raw.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                payload = json.loads(line[5:])
        assert payload is not None, raw
        out.append((name, payload))
    return out


def in_pieces(data: bytes, size: int) -> list[bytes]:
    """`data` cut every `size` bytes, as a network may cut it."""
    return [data[i : i + size] for i in range(0, len(data), size)]

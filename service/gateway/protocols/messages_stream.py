"""A chat stream as Anthropic's Messages events, event for event (docs/reference.md §14).

    message_start, ping                      at the upstream's first chunk
    content_block_start / _delta / _stop     text (`text_delta`) and tool calls
                                             (`input_json_delta`, the arguments as they came)
    message_delta, message_stop              at the end, with the stop reason and the usage

`MessagesStream.feed` takes the upstream's bytes as they arrive and returns the events they
complete, so a translated stream's first byte follows the upstream's at once. The closing
events wait for the upstream's end (`data: [DONE]`, or the end of its body), since the usage
comes last. A stream that breaks, or an upstream error event, ends with Anthropic's `error`
event, which its SDKs raise.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from service.gateway.protocols import usage as usages
from service.gateway.protocols.chunks import DONE, ChatEvents, UpstreamError
from service.gateway.protocols.messages import STOP_REASONS, error, message_id
from service.gateway.protocols.values import as_dict


def event(kind: str, data: dict[str, Any]) -> bytes:
    """One server-sent event, named by its type as Anthropic names them."""
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


class MessagesStream:
    """Translates one chat stream into Messages events."""

    __slots__ = ("_blocks", "_ended", "_events", "_model", "_next", "_open", "_started", "_stop", "_usage")

    def __init__(self, model: str | None = None) -> None:
        self._events = ChatEvents()
        self._model = model
        self._started = False
        self._ended = False
        self._open: int | None = None
        """The content block open now, by index."""
        self._next = 0
        self._blocks: dict[int, int] = {}
        """A chat tool call's index -> its content block's index."""
        self._stop: str | None = None
        self._usage: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
        """Whether the closing events (or an error) went out."""
        return self._ended

    def feed(self, data: bytes) -> bytes:
        """The events that the upstream's `data` completes."""
        out = bytearray()
        for item in self._events.feed(data):
            if self._ended:
                break
            if item is DONE:
                out += self._finish()
            elif isinstance(item, UpstreamError):
                out += self.fail(item.message)
            elif isinstance(item, dict):
                out += self._chunk(item)
        return bytes(out)

    def close(self) -> bytes:
        """The closing events, at the end of the upstream's body."""
        out = bytearray()
        for item in self._events.flush():
            if isinstance(item, dict) and not self._ended:
                out += self._chunk(item)
        if self._ended:
            return bytes(out)
        if self._stop is None and self._usage is None:
            return bytes(out + self.fail("the upstream's stream ended before its answer did"))
        return bytes(out + self._finish())

    def fail(self, reason: str) -> bytes:
        """Anthropic's `error` event, ending the stream; the blank lines end any torn event."""
        if self._ended:
            return b""
        self._ended = True
        return b"\n\n" + event("error", error(502, reason))

    # -- chunks -----------------------------------------------------------------------------

    def _chunk(self, chunk: dict[str, Any]) -> bytes:
        out = b"" if self._started else self._start(chunk)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                if isinstance(text, str) and text:
                    out += self._text(text)
                calls = delta.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    if isinstance(call, dict):
                        out += self._tool(call)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._stop = STOP_REASONS.get(reason, "end_turn")
                out += self._close_block()
        return out

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self._started = True
        model = chunk.get("model")
        message: dict[str, Any] = {
            "id": message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": model if isinstance(model, str) else self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return event("message_start", {"type": "message_start", "message": message}) + event(
            "ping", {"type": "ping"}
        )

    def _text(self, text: str) -> bytes:
        out = b""
        if self._open is None or self._open in self._blocks.values():
            out += self._close_block()
            out += self._open_block({"type": "text", "text": ""})
        delta = {"type": "text_delta", "text": text}
        return out + event(
            "content_block_delta", {"type": "content_block_delta", "index": self._open, "delta": delta}
        )

    def _tool(self, call: dict[str, Any]) -> bytes:
        index = call.get("index", 0)
        index = index if isinstance(index, int) else 0
        function = as_dict(call.get("function"))
        out = b""
        block = self._blocks.get(index)
        if block is None:
            out += self._close_block()
            call_id, name = call.get("id"), function.get("name")
            out += self._open_block(
                {
                    "type": "tool_use",
                    "id": call_id
                    if isinstance(call_id, str) and call_id
                    else f"toolu_{secrets.token_hex(12)}",
                    "name": name if isinstance(name, str) else "",
                    "input": {},
                }
            )
            block = self._blocks[index] = self._next - 1
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out += event(
                "content_block_delta", {"type": "content_block_delta", "index": block, "delta": delta}
            )
        return out

    def _open_block(self, block: dict[str, Any]) -> bytes:
        self._open = index = self._next
        self._next += 1
        return event(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
        )

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open = self._open, None
        return event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _finish(self) -> bytes:
        if self._ended:
            return b""
        out = b"" if self._started else self._start({})
        out += self._close_block()
        self._ended = True
        stop = self._stop or "end_turn"
        if stop == "end_turn" and self._blocks:  # tool calls ended by `stop`, as `from_chat` reads them
            stop = "tool_use"
        delta = {"stop_reason": stop, "stop_sequence": None}
        usage = usages.to_messages(self._usage)
        out += event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
        return out + event("message_stop", {"type": "message_stop"})

"""A chat stream as Responses events, event for event (docs/reference.md §14).

    response.created, response.in_progress                 at the upstream's first chunk
    response.output_item.added                             each message and function call
    response.content_part.added, response.output_text.delta    text
    response.function_call_arguments.delta                 a call's arguments, as they came
    ….output_text.done, ….content_part.done, ….function_call_arguments.done,
    response.output_item.done, response.completed          at the end, with the usage

Each event carries its `sequence_number`. `ResponsesStream.feed` returns the events the
upstream's bytes complete; the closing ones wait for its end (the usage comes last). A
stream that breaks ends with `response.failed`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from service.gateway.protocols import usage as usages
from service.gateway.protocols.chunks import DONE, ChatEvents, UpstreamError
from service.gateway.protocols.responses import INCOMPLETE, function_item, message_item, shell
from service.gateway.protocols.values import as_dict


@dataclass(slots=True)
class _Item:
    """An output item being streamed: a message's text or a call's arguments so far."""

    index: int
    id: str
    kind: str
    parts: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""


class ResponsesStream:
    """Translates one chat stream into Responses events."""

    __slots__ = (
        "_calls",
        "_ended",
        "_events",
        "_items",
        "_message",
        "_response",
        "_seq",
        "_started",
        "_stop",
        "_usage",
    )

    def __init__(self, request: dict[str, Any], response_id: str) -> None:
        self._events = ChatEvents()
        self._response = shell(request, response_id)
        self._seq = 0
        self._started = False
        self._ended = False
        self._items: list[_Item] = []
        self._message: _Item | None = None
        """The message item text goes to now."""
        self._calls: dict[int, _Item] = {}
        """A chat tool call's index -> its function call item."""
        self._stop: str | None = None
        self._usage: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
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
        """`response.failed`, ending the stream; the blank lines end any torn event."""
        if self._ended:
            return b""
        out = b"" if self._started else self._start({})
        self._ended = True
        response = {
            **self._response,
            "status": "failed",
            "error": {"code": "server_error", "message": reason},
        }
        return b"\n\n" + out + self._event("response.failed", response=response)

    # -- chunks -----------------------------------------------------------------------------

    def _event(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        try:
            text = json.dumps(payload)
        except RecursionError:  # the echoed request (its tools) is nested too deep to write back
            self._response["tools"] = []
            if isinstance(data.get("response"), dict):
                payload["response"] = {**data["response"], "tools": []}
            text = json.dumps(payload)
        return b"event: " + kind.encode() + b"\ndata: " + text.encode() + b"\n\n"

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
                        out += self._call(call)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._stop = reason
        return out

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self._started = True
        if isinstance(chunk.get("model"), str):
            self._response["model"] = chunk["model"]
        response = self._response
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    def _text(self, text: str) -> bytes:
        out = b""
        item = self._message
        if item is None:
            item = self._message = self._add(f"msg_{secrets.token_hex(12)}", "message")
            out += self._event(
                "response.output_item.added",
                output_index=item.index,
                item=message_item(item.id, "", "in_progress") | {"content": []},
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._event(
                "response.content_part.added",
                item_id=item.id,
                output_index=item.index,
                content_index=0,
                part=part,
            )
        item.parts.append(text)
        return out + self._event(
            "response.output_text.delta",
            item_id=item.id,
            output_index=item.index,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def _call(self, call: dict[str, Any]) -> bytes:
        index = call.get("index", 0)
        index = index if isinstance(index, int) else 0
        function = as_dict(call.get("function"))
        out = b""
        item = self._calls.get(index)
        if item is None:
            self._message = None  # text after a call is a new message
            item = self._calls[index] = self._add(f"fc_{secrets.token_hex(12)}", "function_call")
            call_id, name = call.get("id"), function.get("name")
            item.call_id = (
                call_id if isinstance(call_id, str) and call_id else f"call_{secrets.token_hex(12)}"
            )
            item.name = name if isinstance(name, str) else ""
            added = function_item(item.id, item.call_id, item.name, "", "in_progress")
            out += self._event("response.output_item.added", output_index=item.index, item=added)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.parts.append(arguments)
            out += self._event(
                "response.function_call_arguments.delta",
                item_id=item.id,
                output_index=item.index,
                delta=arguments,
            )
        return out

    def _add(self, item_id: str, kind: str) -> _Item:
        item = _Item(len(self._items), item_id, kind)
        self._items.append(item)
        return item

    def _finish(self) -> bytes:
        if self._ended:
            return b""
        out = b"" if self._started else self._start({})
        self._ended = True
        output = []
        for item in self._items:
            text = "".join(item.parts)
            if item.kind == "message":
                done = message_item(item.id, text, "completed")
                part = done["content"][0]
                common = {"item_id": item.id, "output_index": item.index, "content_index": 0}
                out += self._event("response.output_text.done", **common, text=text, logprobs=[])
                out += self._event("response.content_part.done", **common, part=part)
            else:
                done = function_item(item.id, item.call_id, item.name, text, "completed")
                out += self._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=item.index,
                    arguments=text,
                )
            out += self._event("response.output_item.done", output_index=item.index, item=done)
            output.append(done)
        response = {**self._response, "output": output, "usage": usages.to_responses(self._usage)}
        incomplete = INCOMPLETE.get(self._stop) if self._stop is not None else None
        if incomplete is not None:
            response.update(status="incomplete", incomplete_details={"reason": incomplete})
            return out + self._event("response.incomplete", response=response)
        response["status"] = "completed"
        return out + self._event("response.completed", response=response)

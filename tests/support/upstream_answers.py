"""What the stand-in upstreams (upstreams.py) answer in the protocols besides chat's plain
text: tool calls in each protocol, OpenAI's Responses and legacy completions, as JSON or as
the vendors' event streams. Pure builders: the server in upstreams.py sends them."""

from __future__ import annotations

import json
import time
from typing import Any

_JSON = dict[str, Any]


def sse(data: _JSON, event: str | None = None) -> bytes:
    """One server-sent event (named, as Anthropic and Responses name theirs)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def arguments_text(arguments: Any) -> str:
    """A tool call's arguments as sent: a dict as JSON, a string as it is (JSON or not)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


# -- chat: a tool call ----------------------------------------------------------------------


def chat_tool_chunks(base: _JSON, name: str, arguments: Any) -> list[_JSON]:
    """A tool call streamed as chat servers do: id and name, then the arguments in two pieces."""
    text = arguments_text(arguments)
    half = len(text) // 2
    first = {"index": 0, "id": "call_up1", "type": "function", "function": {"name": name, "arguments": ""}}
    pieces = [{"index": 0, "function": {"arguments": p}} for p in (text[:half], text[half:]) if p]
    deltas: list[_JSON] = [{"role": "assistant", "content": None, "tool_calls": [first]}]
    deltas += [{"tool_calls": [p]} for p in pieces]
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return chunks


def chat_tool_message(name: str, arguments: Any) -> _JSON:
    call = {
        "id": "call_up1",
        "type": "function",
        "function": {"name": name, "arguments": arguments_text(arguments)},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}


# -- Anthropic: a tool_use block ---------------------------------------------------------------


def messages_tool_events(name: str, arguments: Any) -> list[_JSON]:
    text = arguments_text(arguments)
    half = len(text) // 2
    block = {"type": "tool_use", "id": "toolu_up1", "name": name, "input": {}}
    return [
        {"type": "content_block_start", "index": 0, "content_block": block},
        *(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": p},
            }
            for p in (text[:half], text[half:])
            if p
        ),
        {"type": "content_block_stop", "index": 0},
    ]


# -- OpenAI Responses --------------------------------------------------------------------------


def response(
    name: str, model: str, response_id: str, output: list[_JSON], usage: _JSON, previous: str | None
) -> _JSON:
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": model,
        "output": output,
        "previous_response_id": previous,
        "usage": usage,
        "metadata": {"upstream": name},
    }


def text_item(text: str) -> _JSON:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"type": "message", "id": "msg_up1", "status": "completed", "role": "assistant", "content": [part]}


def call_item(name: str, arguments: Any) -> _JSON:
    return {
        "type": "function_call",
        "id": "fc_up1",
        "call_id": "call_up1",
        "name": name,
        "arguments": arguments_text(arguments),
        "status": "completed",
    }


def response_events(done: _JSON) -> list[bytes]:
    """A Response streamed as OpenAI streams it, event for event."""
    seq = iter(range(1000))
    start = {**done, "status": "in_progress", "output": [], "usage": None}

    def ev(kind: str, **data: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **data}, kind)

    out = [ev("response.created", response=start), ev("response.in_progress", response=start)]
    for index, item in enumerate(done["output"]):
        if item["type"] == "message":
            text = item["content"][0]["text"]
            out.append(
                ev(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "content": []},
                )
            )
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(
                ev(
                    "response.content_part.added",
                    **common,
                    part={"type": "output_text", "text": "", "annotations": []},
                )
            )
            for word in _words(text):
                out.append(ev("response.output_text.delta", **common, delta=word))
            out.append(ev("response.output_text.done", **common, text=text))
            out.append(ev("response.content_part.done", **common, part=item["content"][0]))
        else:
            out.append(
                ev(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
            )
            out.append(
                ev(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=item["arguments"],
                )
            )
            out.append(
                ev(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
        out.append(ev("response.output_item.done", output_index=index, item=item))
    out.append(ev("response.completed", response=done))
    return out


# -- legacy completions ------------------------------------------------------------------------


def completion(model: str, text: str, usage: _JSON) -> _JSON:
    choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
    return {
        "id": "cmpl-up1",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def completion_chunks(model: str, text: str, usage: _JSON, with_usage: bool) -> list[bytes]:
    base = {"id": "cmpl-up1", "object": "text_completion", "created": int(time.time()), "model": model}
    chunks = [
        {**base, "choices": [{"index": 0, "text": w, "finish_reason": None, "logprobs": None}]}
        for w in _words(text)
    ]
    chunks.append({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]})
    if with_usage:
        chunks.append({**base, "choices": [], "usage": usage})
    return [sse(c) for c in chunks] + [b"data: [DONE]\n\n"]


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(f" {w}" for w in words[1:])]

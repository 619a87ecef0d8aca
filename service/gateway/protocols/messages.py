"""Anthropic Messages as Chat Completions, and back (docs/reference.md §14).

`to_chat` turns a Messages request into a chat request: the system prompt (with any
`system` message inside `messages`, which joins it at its place) as the first message; text,
image and document blocks as content parts; `tool_use` blocks as an assistant's
`tool_calls` and `tool_result` blocks as `tool` messages; client tools as functions;
`stop_sequences` as `stop`. What chat has no counterpart for is dropped: hosted tools,
`thinking` and its blocks, `cache_control`, `top_k`, `context_management`, betas' fields.

`from_chat` turns a chat completion into a Message, `error` builds Anthropic's error shape,
and `estimate_tokens` answers `count_tokens` where no upstream can.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from service.errors import ModelNotFound, NoCandidate, UpstreamsFailed
from service.gateway.protocols import usage as usages
from service.gateway.protocols.values import as_dict, as_list

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
"""Chat's `finish_reason` -> Anthropic's `stop_reason`."""

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
"""Anthropic's error type of each status (any other 4xx: invalid_request_error, 5xx: api_error)."""


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as a chat request (only chat's fields; the rest is dropped)."""
    chat: dict[str, Any] = {"model": body.get("model")}
    system = _texts(body.get("system"))
    messages: list[dict[str, Any]] = []
    for message in as_list(body.get("messages")):
        if not isinstance(message, dict):
            continue
        role, content = message.get("role"), message.get("content")
        if role == "assistant":
            messages.append(_assistant(content))
        elif role == "system":  # the mid-conversation system beta: it joins the system prompt
            system.extend(_texts(content))
        else:
            messages.extend(_user(content))
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    chat["messages"] = messages
    if isinstance(body.get("max_tokens"), int):
        chat["max_tokens"] = body["max_tokens"]
    for name in ("temperature", "top_p"):
        if isinstance(body.get(name), int | float) and not isinstance(body.get(name), bool):
            chat[name] = body[name]
    stops = [s for s in as_list(body.get("stop_sequences")) if isinstance(s, str)]
    if stops:
        chat["stop"] = stops
    if body.get("stream") is True:
        chat["stream"] = True
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata:
        chat["metadata"] = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tools = [t for t in map(_tool, as_list(body.get("tools"))) if t is not None]
    if tools:
        chat["tools"] = tools
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            _tool_choice(choice, chat)
    return chat


def from_chat(chat: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """A chat completion as a Message."""
    choices = chat.get("choices")
    choice = as_dict(choices[0]) if isinstance(choices, list) and choices else {}
    message = as_dict(choice.get("message"))
    content: list[dict[str, Any]] = []
    text = text_of(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    for call in as_list(message.get("tool_calls")):
        if isinstance(call, dict):
            function = as_dict(call.get("function"))
            content.append(tool_use(call.get("id"), function.get("name"), function.get("arguments")))
    reason = choice.get("finish_reason")
    stop = STOP_REASONS.get(reason, "end_turn") if isinstance(reason, str) else "end_turn"
    if stop == "end_turn" and any(block["type"] == "tool_use" for block in content):
        stop = "tool_use"
    usage = chat.get("usage")
    return {
        "id": message_id(chat.get("id")),
        "type": "message",
        "role": "assistant",
        "model": chat.get("model") if isinstance(chat.get("model"), str) else model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usages.to_messages(usage if isinstance(usage, dict) else None),
    }


def error(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message, **extra}}


def estimate_tokens(size: int) -> int:
    """A local count of a request's input tokens from its body's size in bytes: a positive
    number that grows with the input (about four bytes a token), for `count_tokens` when no
    provider that speaks Messages can count them."""
    return max(1, (size + 3) // 4)


def estimated_for(exc: BaseException) -> bool:
    """Whether a token count the relay ended with `exc` is answered with the local estimate
    (docs/reference.md §14): no provider speaks Messages natively (each answered 404 at the path,
    or none does), or none that does can count now (each failed, or none can be tried: circuit
    open, disabled). A count only guides the client's next request (Claude Code sizes its context
    by it): an estimate serves it better than an error, and the next Messages request meets the
    providers as they are."""
    if isinstance(exc, ModelNotFound):
        return exc.over_protocol
    return isinstance(exc, (UpstreamsFailed, NoCandidate))


def message_id(upstream: object) -> str:
    """A Message id for a chat completion's (a new one when it has none)."""
    if isinstance(upstream, str) and upstream and len(upstream) <= 200:
        return upstream if upstream.startswith("msg_") else f"msg_{upstream}"
    return f"msg_{secrets.token_hex(12)}"


def tool_use(call_id: object, name: object, arguments: object) -> dict[str, Any]:
    """A `tool_use` block for a chat tool call. Arguments that are not JSON come as they came."""
    return {
        "type": "tool_use",
        "id": call_id if isinstance(call_id, str) and call_id else f"toolu_{secrets.token_hex(12)}",
        "name": name if isinstance(name, str) else "",
        "input": tool_input(arguments),
    }


def tool_input(arguments: object) -> Any:
    """A tool call's `arguments` (a JSON text) as a `tool_use` input; a text that is not JSON
    stays the text it was, so the client sees what the model sent instead of an error."""
    if not isinstance(arguments, str):
        return arguments if isinstance(arguments, dict) else {}
    if not arguments.strip():
        return {}
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments


def text_of(content: object) -> str:
    """A chat message's content as text (a string, or the text of its parts)."""
    if isinstance(content, str):
        return content
    return "".join(
        p["text"] for p in as_list(content) if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


# -- requests ---------------------------------------------------------------------------------


def _texts(value: object) -> list[str]:
    """A system prompt's texts: a string, or the text of its blocks."""
    if isinstance(value, str):
        return [value] if value else []
    return [b["text"] for b in as_list(value) if isinstance(b, dict) and isinstance(b.get("text"), str)]


def _user(content: object) -> list[dict[str, Any]]:
    """A user turn as chat messages: its tool results first (they answer the assistant's calls),
    then what the user said."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in as_list(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "tool_result":
            results.append(_tool_result(block))
        elif kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind in ("image", "document"):
            part = _media(block)
            if part is not None:
                parts.append(part)
    if parts:
        if all(p["type"] == "text" for p in parts):
            results.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            results.append({"role": "user", "content": parts})
    return results


def _tool_result(block: dict[str, Any]) -> dict[str, Any]:
    content = block.get("content")
    text = content if isinstance(content, str) else "\n".join(_texts(content))
    call_id = block.get("tool_use_id")
    return {"role": "tool", "tool_call_id": call_id if isinstance(call_id, str) else "", "content": text}


def _media(block: dict[str, Any]) -> dict[str, Any] | None:
    """An image or a document block as a content part; None when chat cannot carry it."""
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    kind, media = source.get("type"), source.get("media_type")
    if block.get("type") == "document":
        if kind == "text" and isinstance(source.get("data"), str):
            return {"type": "text", "text": source["data"]}
        if kind == "base64" and isinstance(source.get("data"), str):
            data = f"data:{media or 'application/pdf'};base64,{source['data']}"
            return {"type": "file", "file": {"file_data": data}}
        return None
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(media, str):
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{source['data']}"}}
    if kind == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    return None


def _assistant(content: object) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in as_list(content):
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            given = block.get("input")
            arguments = given if isinstance(given, str) else json.dumps(given if given is not None else {})
            call_id, name = block.get("id"), block.get("name")
            calls.append(
                {
                    "id": call_id if isinstance(call_id, str) else "",
                    "type": "function",
                    "function": {"name": name if isinstance(name, str) else "", "arguments": arguments},
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: object) -> dict[str, Any] | None:
    """A client tool as a chat function; None for a hosted tool (`web_search_…`, `bash_…`...)."""
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        return None
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        return None
    function: dict[str, Any] = {"name": name}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    schema = tool.get("input_schema")
    function["parameters"] = schema if isinstance(schema, dict) else {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _tool_choice(choice: dict[str, Any], chat: dict[str, Any]) -> None:
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False

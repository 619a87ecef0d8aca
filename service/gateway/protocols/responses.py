"""OpenAI Responses as Chat Completions, and back (docs/reference.md §14).

`to_chat` turns a Responses request into a chat request: `instructions` and the leading
`system`/`developer` messages as one system prompt; `input` as a user message (a string) or
its items as messages (`message`, `function_call` as an assistant's `tool_calls`,
`function_call_output` as `tool` messages); function tools; `text.format` as
`response_format`; `max_output_tokens` as `max_tokens`; `reasoning.effort` as
`reasoning_effort`; `metadata`, `store`, `user` as they are. Dropped, never refused: hosted
tools (`web_search`, `file_search`...), namespaces, custom tools and their items, reasoning
items, `include`, `truncation`, `prompt_cache_key` and the like.

`from_chat` turns a chat completion into a Response object, `error` builds the error shape.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from service.gateway.protocols import usage as usages
from service.gateway.protocols.messages import text_of
from service.gateway.protocols.values import as_dict, as_list

_SYSTEM_ROLES = ("system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
"""Chat's `finish_reason`s that leave a Response `incomplete` -> its `incomplete_details.reason`."""
_ECHOED = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls", "temperature", "top_p")
"""Request fields a Response echoes."""


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as a chat request (only chat's fields; the rest is dropped)."""
    system: list[str] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        system.append(instructions)
    messages: list[dict[str, Any]] = []
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    for item in given if isinstance(given, list) else ():
        if isinstance(item, dict):
            _item(item, messages, system)
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            chat[name] = value
    for name, kind in (("store", bool), ("user", str), ("parallel_tool_calls", bool)):
        if isinstance(body.get(name), kind):
            chat[name] = body[name]
    if isinstance(body.get("metadata"), dict) and body["metadata"]:
        chat["metadata"] = body["metadata"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]
    text = body.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict):
        response_format = _format(text["format"])
        if response_format is not None:
            chat["response_format"] = response_format
    if body.get("stream") is True:
        chat["stream"] = True
    tools = [t for t in map(_tool, as_list(body.get("tools"))) if t is not None]
    if tools:
        chat["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            chat["tool_choice"] = choice
    return chat


def from_chat(chat: dict[str, Any], request: dict[str, Any], response_id: str) -> dict[str, Any]:
    """A chat completion as a Response (`request`: the client's, whose settings it echoes)."""
    choices = chat.get("choices")
    choice = as_dict(choices[0]) if isinstance(choices, list) and choices else {}
    message = as_dict(choice.get("message"))
    output: list[dict[str, Any]] = []
    text = text_of(message.get("content"))
    if text:
        output.append(message_item(f"msg_{secrets.token_hex(12)}", text, "completed"))
    for call in as_list(message.get("tool_calls")):
        if isinstance(call, dict):
            function = as_dict(call.get("function"))
            output.append(
                function_item(f"fc_{secrets.token_hex(12)}", call.get("id"), function.get("name"),
                              function.get("arguments"), "completed")
            )  # fmt: skip
    usage = chat.get("usage")
    created = chat.get("created")
    response = shell(request, response_id, created if isinstance(created, int) else None)
    response["model"] = chat.get("model") if isinstance(chat.get("model"), str) else request.get("model")
    response["output"] = output
    response["usage"] = usages.to_responses(usage if isinstance(usage, dict) else None)
    reason = choice.get("finish_reason")
    if isinstance(reason, str) and reason in INCOMPLETE:
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": INCOMPLETE[reason]}
    else:
        response["status"] = "completed"
    return response


def shell(request: dict[str, Any], response_id: str, created: int | None = None) -> dict[str, Any]:
    """A Response without its output yet (`in_progress`), echoing the request's settings."""
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created if created is not None else int(time.time()),
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "model": request.get("model"),
        "output": [],
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": request.get("store") is True,
        "text": {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": as_list(request.get("tools")),
        "truncation": "disabled",
        "usage": None,
    }
    for name in _ECHOED:
        response[name] = request.get(name)
    if response["parallel_tool_calls"] is None:
        response["parallel_tool_calls"] = True
    if response["metadata"] is None:
        response["metadata"] = {}
    text = request.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict):
        response["text"] = {"format": text["format"]}
    return response


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """An assistant message output item holding `text`."""
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [part]}


def function_item(
    item_id: str, call_id: object, name: object, arguments: object, status: str
) -> dict[str, Any]:
    """A function call output item; its arguments stay the text they came as, JSON or not."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments) if isinstance(arguments, dict) else ""
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id if isinstance(call_id, str) and call_id else f"call_{secrets.token_hex(12)}",
        "name": name if isinstance(name, str) else "",
        "arguments": arguments,
    }


def error(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """OpenAI's error shape, as the Responses API answers."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"type": kind, "message": message, "param": None, "code": None}
    return {"error": {**body, **extra}}


# -- requests ---------------------------------------------------------------------------------


def _item(item: dict[str, Any], messages: list[dict[str, Any]], system: list[str]) -> None:
    kind = item.get("type")
    if kind in (None, "message") and isinstance(item.get("role"), str):
        role, content = item["role"], item.get("content")
        if role in _SYSTEM_ROLES:
            text = content if isinstance(content, str) else "\n".join(_texts(content))
            if not messages:  # leading instructions: one system prompt
                system.append(text)
            else:
                messages.append({"role": "system", "content": text})
        elif role == "assistant":
            messages.append(
                {
                    "role": "assistant",
                    "content": content if isinstance(content, str) else "".join(_texts(content)),
                }
            )
        else:
            messages.append({"role": "user", "content": _content(content)})
    elif kind == "function_call":
        call = {
            "id": item.get("call_id") if isinstance(item.get("call_id"), str) else "",
            "type": "function",
            "function": {
                "name": item.get("name") if isinstance(item.get("name"), str) else "",
                "arguments": item.get("arguments") if isinstance(item.get("arguments"), str) else "{}",
            },
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
            if not last.get("content"):
                last["content"] = None
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else "\n".join(_texts(output))
        call_id = item.get("call_id")
        messages.append(
            {"role": "tool", "tool_call_id": call_id if isinstance(call_id, str) else "", "content": text}
        )
    # Anything else (reasoning, hosted tools' calls, custom tools' calls and outputs, item
    # references) has no chat counterpart: dropped.


def _texts(content: object) -> list[str]:
    return [
        p["text"]
        for p in as_list(content)
        if isinstance(p, dict) and p.get("type") in _TEXT_PARTS and isinstance(p.get("text"), str)
    ]


def _content(content: object) -> str | list[dict[str, Any]]:
    """A user message's content: a string, or chat parts when it holds an image or a file."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in as_list(content):
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file" and isinstance(part.get("file_data"), str):
            file = {"file_data": part["file_data"]}
            if isinstance(part.get("filename"), str):
                file["filename"] = part["filename"]
            parts.append({"type": "file", "file": file})
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _tool(tool: object) -> dict[str, Any] | None:
    """A function tool as chat's; None for anything else (hosted tools, namespaces, custom tools)."""
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
        return None
    function: dict[str, Any] = {"name": tool["name"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    parameters = tool.get("parameters")
    function["parameters"] = (
        parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}}
    )
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(choice: object) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    return None


def _format(given: dict[str, Any]) -> dict[str, Any] | None:
    """`text.format` as `response_format` (None for plain text)."""
    kind = given.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: given[k] for k in ("name", "schema", "strict", "description") if k in given}
        return {"type": "json_schema", "json_schema": schema}
    return None

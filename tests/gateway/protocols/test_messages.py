"""Anthropic Messages to Chat Completions and back (protocols/messages.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.gateway.protocols import messages
from tests.gateway.protocols.support import recorded


def test_system_text_images_tools_and_their_results_become_chat() -> None:
    body = {
        "model": "claude-x",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_k": 5,
        "thinking": {"type": "enabled", "budget_tokens": 1000},
        "metadata": {"user_id": "u-1"},
        "messages": [
            {"role": "user", "content": "What is in this picture?"},
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                    },
                    {"type": "text", "text": "and this?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"at": "it"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "a cat"}],
                    },
                    {"type": "text", "text": "So?"},
                ],
            },
        ],
        "tools": [
            {"name": "look", "description": "Look at a thing", "input_schema": {"type": "object"}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    chat = messages.to_chat(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is in this picture?"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "text", "text": "and this?"},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "look", "arguments": '{"at": "it"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"},
        {"role": "user", "content": "So?"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "look", "description": "Look at a thing", "parameters": {"type": "object"}},
        }
    ]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert chat["stop"] == ["END"] and chat["max_tokens"] == 100 and chat["temperature"] == 0.2
    assert chat["metadata"] == {"user_id": "u-1"}
    assert "top_k" not in chat and "thinking" not in chat and "cache_control" not in json.dumps(chat)


def test_claude_codes_recorded_turns_translate_without_its_extras() -> None:
    first, second = (r["body"] for r in recorded("claude-code-2.1.197.json") if r["method"] == "POST")
    chat = messages.to_chat(second)
    text = json.dumps(chat)
    for dropped in ("cache_control", "thinking", "context_management", "output_config", "adaptive"):
        assert dropped not in text
    system = chat["messages"][0]
    assert (
        system["role"] == "system" and "Available agent types" in system["content"]
    )  # the mid-conversation one joined
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool"]
    call = chat["messages"][2]["tool_calls"][0]
    assert call["id"] == chat["messages"][3]["tool_call_id"] and json.loads(call["function"]["arguments"])
    assert len(chat["tools"]) == len(second["tools"]) and chat["stream"] is True
    assert chat["max_tokens"] == 64000 and "TOOL: run echo please" in chat["messages"][1]["content"]
    assert messages.to_chat(first)["messages"][-1]["role"] == "user"


def chat_answer(**message: Any) -> dict[str, Any]:
    usage = {"prompt_tokens": 30, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 10}}
    choice = {
        "index": 0,
        "message": {"role": "assistant", **message},
        "finish_reason": message.pop("finish", "stop"),
    }
    return {"id": "chatcmpl-9", "model": "up-model", "choices": [choice], "usage": usage}


def test_a_chat_answer_becomes_a_message_with_anthropics_usage() -> None:
    answer = messages.from_chat(chat_answer(content="Hi there"))
    assert answer == {
        "id": "msg_chatcmpl-9",
        "type": "message",
        "role": "assistant",
        "model": "up-model",
        "content": [{"type": "text", "text": "Hi there"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 20,
            "output_tokens": 7,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 10,
        },
    }


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [('{"a": 1}', {"a": 1}), ("", {}), ("{not json", "{not json"), ('{"a": ', '{"a": ')],
)
def test_tool_calls_become_tool_use_and_arguments_that_are_not_json_come_as_they_came(
    arguments: str, expected: object
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    answer = messages.from_chat(chat_answer(content=None, tool_calls=[call], finish="tool_calls"))
    assert answer["content"] == [{"type": "tool_use", "id": "call_1", "name": "f", "input": expected}]
    assert answer["stop_reason"] == "tool_use"


@pytest.mark.parametrize("finish", ["length", "content_filter", None, 7])
def test_stop_reasons(finish: object) -> None:
    chat = chat_answer(content="x")
    chat["choices"][0]["finish_reason"] = finish
    expected = {"length": "max_tokens", "content_filter": "refusal"}.get(finish, "end_turn")  # type: ignore[arg-type]
    assert messages.from_chat(chat)["stop_reason"] == expected


@pytest.mark.parametrize(
    "hostile", [{}, {"choices": "x"}, {"choices": [None]}, {"choices": [{"message": 3}], "usage": "u"}]
)
def test_an_answer_of_any_shape_translates_without_raising(hostile: dict[str, Any]) -> None:
    answer = messages.from_chat(hostile, "asked")
    assert answer["content"] == [] and answer["model"] == "asked"


@pytest.mark.parametrize(
    "hostile",
    [
        {},
        {"messages": "x"},
        {"messages": [None, {"role": "user", "content": 5}]},
        {"system": 3, "tools": [1]},
    ],
)
def test_a_request_of_any_shape_translates_without_raising(hostile: dict[str, Any]) -> None:
    assert isinstance(messages.to_chat(hostile)["messages"], list)


def test_errors_take_anthropics_shape_and_type() -> None:
    assert messages.error(404, "no such model") == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no such model"},
    }
    assert messages.error(502, "x")["error"]["type"] == "api_error"
    assert messages.error(422, "x")["error"]["type"] == "invalid_request_error"


def test_the_local_token_estimate_is_positive_and_grows_with_the_input() -> None:
    assert 0 < messages.estimate_tokens(0) < messages.estimate_tokens(40) < messages.estimate_tokens(400)

"""OpenAI Responses to Chat Completions and back (protocols/responses.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.gateway.protocols import responses
from tests.gateway.protocols.support import recorded


def test_a_string_input_with_instructions_and_settings() -> None:
    chat = responses.to_chat(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": "Hello",
            "max_output_tokens": 50,
            "reasoning": {"effort": "low", "summary": "auto"},
            "text": {
                "format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}
            },
            "metadata": {"k": "v"},
            "store": False,
            "include": ["reasoning.encrypted_content"],
            "truncation": "auto",
            "prompt_cache_key": "abc",
        }
    )
    assert chat == {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        "max_tokens": 50,
        "store": False,
        "metadata": {"k": "v"},
        "reasoning_effort": "low",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
        },
    }


def text(value: str) -> dict[str, str]:
    return {"type": "input_text", "text": value}


def test_items_calls_and_outputs_become_messages() -> None:
    chat = responses.to_chat(
        {
            "model": "m",
            "input": [
                {"type": "message", "role": "developer", "content": [text("Rules")]},
                {"role": "user", "content": [
                    {"type": "input_text", "text": "Look:"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
                ]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"x": 1}'},
                {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "one"},
                {"type": "function_call_output", "call_id": "call_2", "output": [text("2")]},
                {"type": "web_search_call", "id": "ws_1"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Done."}]},
            ],
            "tools": [
                {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True},
                {"type": "web_search"},
                {"type": "namespace", "name": "ns", "tools": []},
                {"type": "custom", "name": "apply_patch"},
            ],
            "tool_choice": {"type": "function", "name": "f"},
        }
    )  # fmt: skip
    assert chat["messages"] == [
        {"role": "system", "content": "Rules"},
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": "2"},
        {"role": "assistant", "content": "Done."},
    ]  # fmt: skip
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}


def test_codexs_recorded_turns_translate_without_its_extras() -> None:
    first, second = (r["body"] for r in recorded("codex-0.171.0.json"))
    chat = responses.to_chat(second)
    text = json.dumps(chat)
    for dropped in ("namespace", "web_search", "encrypted_content", "client_metadata", "prompt_cache_key"):
        assert dropped not in text
    roles = [m["role"] for m in chat["messages"]]
    assert roles == ["system", "user", "user", "assistant", "tool"]
    assert chat["messages"][3]["tool_calls"][0]["id"] == chat["messages"][4]["tool_call_id"] == "call_rec1"
    names = {t["function"]["name"] for t in chat["tools"]}
    assert "exec_command" in names and len(names) == sum(t["type"] == "function" for t in second["tools"])
    assert chat["store"] is False and chat["stream"] is True and chat["parallel_tool_calls"] is True
    assert responses.to_chat(first)["messages"][-1] == {"role": "user", "content": "TOOL: run echo please"}


def chat_answer(finish: str = "stop", **message: Any) -> dict[str, Any]:
    usage = {
        "prompt_tokens": 30,
        "completion_tokens": 7,
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
    return {"id": "chatcmpl-9", "created": 5, "model": "up-model", "choices": [choice], "usage": usage}


def test_a_chat_answer_becomes_a_response() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    request = {"model": "asked", "instructions": "Be brief.", "tools": [{"type": "function", "name": "f"}]}
    answer = responses.from_chat(chat_answer(content="Hi", tool_calls=[call]), request, "resp_1")
    assert answer["id"] == "resp_1" and answer["object"] == "response" and answer["status"] == "completed"
    assert (
        answer["model"] == "up-model" and answer["created_at"] == 5 and answer["instructions"] == "Be brief."
    )
    message, function = answer["output"]
    assert message["type"] == "message" and message["content"][0]["text"] == "Hi"
    assert (
        function["type"] == "function_call"
        and function["call_id"] == "call_1"
        and function["arguments"] == "{oops"
    )
    assert answer["usage"] == {
        "input_tokens": 30, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 37,
    }  # fmt: skip


def test_a_length_stop_is_incomplete() -> None:
    answer = responses.from_chat(chat_answer("length", content="abc"), {}, "resp_1")
    assert answer["status"] == "incomplete" and answer["incomplete_details"] == {
        "reason": "max_output_tokens"
    }


def test_a_content_filter_stop_is_incomplete_as_openai_says_it() -> None:
    answer = responses.from_chat(chat_answer("content_filter", content="abc"), {}, "resp_1")
    assert answer["status"] == "incomplete"
    assert answer["incomplete_details"] == {"reason": "content_filter"}


@pytest.mark.parametrize(
    "hostile", [{}, {"input": 5}, {"input": [None, 3, {"type": "function_call"}]}, {"tools": "x", "text": 1}]
)
def test_a_request_of_any_shape_translates_without_raising(hostile: dict[str, Any]) -> None:
    assert isinstance(responses.to_chat(hostile)["messages"], list)


def test_errors_take_openais_shape() -> None:
    body = responses.error(400, "not ours", param="previous_response_id")
    assert body == {
        "error": {
            "type": "invalid_request_error",
            "message": "not ours",
            "param": "previous_response_id",
            "code": None,
        }
    }

"""Reading `usage` and `model` out of an answer's bytes."""

from __future__ import annotations

import json

from service.gateway.transports.scan import find_model, find_usage


def test_the_last_non_null_usage_is_found() -> None:
    events = b'data: {"usage": null}\n\ndata: {"usage": {"prompt_tokens": 3}}\n\ndata: {"usage": null}\n\n'
    assert find_usage(events) == {"prompt_tokens": 3}
    assert find_usage(events, events.index(b'data: {"usage": {')) is None


def test_usage_inside_a_string_is_not_taken() -> None:
    answer = json.dumps({"choices": [{"message": {"content": 'say "usage": {"x": 1}'}}]}).encode()
    assert find_usage(answer) is None


def test_a_hostile_usage_is_no_usage() -> None:
    assert find_usage(b'{"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}") is None
    assert find_usage(b'{"usage": {"prompt_tokens": ') is None


def test_the_model_an_answer_names_is_found() -> None:
    answer = json.dumps({"id": "x", "model": "gpt-x", "choices": [{"message": {"content": '"model": "no"'}}]})
    assert find_model(answer.encode()) == "gpt-x"
    assert find_model(b'{"choices": []}') is None
    assert find_model(b'{"model": 12}') is None
    assert find_model(b'{"model": "' + b"x" * 10_000 + b'"}') is None  # past the window: not decoded

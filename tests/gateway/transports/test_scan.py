"""Reading `usage` and `model` out of an answer's bytes."""

from __future__ import annotations

import json

import pytest

from service.gateway.transports.scan import find_model, find_usage


def test_the_last_non_null_usage_is_found() -> None:
    events = b'data: {"usage": null}\n\ndata: {"usage": {"prompt_tokens": 3}}\n\ndata: {"usage": null}\n\n'
    assert find_usage(events) == {"prompt_tokens": 3}
    assert find_usage(events, events.index(b'data: {"usage": {')) is None


@pytest.mark.parametrize("null", [b"null", b" null", b"\tnull", b"  null", b"nullx", b"nul"])
def test_a_null_usage_in_every_chunk_is_skipped_for_the_last_one(null: bytes) -> None:
    chunk = b'data: {"choices": [{"delta": {"content": "a"}}], "usage":' + null + b"}\n\n"
    last = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
    events = chunk * 3 + last + chunk + b"data: [DONE]\n\n"
    assert find_usage(events) == {"prompt_tokens": 3, "completion_tokens": 1}
    assert find_usage(chunk * 3) is None
    assert find_usage(chunk, chunk.rfind(b"\n\n")) is None


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


def _as_json_reads_it(data: bytes) -> object:
    """What `find_model` found before it read plain names itself: the JSON value after the
    colon, decoded from the window's text."""
    at = data.find(b'"model"')
    if at < 0:
        return None
    start = at + len(b'"model"')
    window = data[start : start + 512]
    colon = window.find(b":")
    if colon < 0 or window[:colon].strip():
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(window[colon + 1 :].decode("utf-8", "replace").lstrip())
    except ValueError:
        return None
    return value if isinstance(value, str) else None


@pytest.mark.parametrize(
    "value",
    [
        b'"m"',
        b' \t\r\n: \n "gpt-4o-2024"',
        b':"caf\xc3\xa9 \xff\xfe x\x7f"',
        b': "a\\"b"',
        b': "tab\tinside"',
        b': "new\nline"',
        b': "\\u00e9t\\u00e9"',
        b': \xc2\xa0"after a no-break space"',
        b'\x0b: "vertical tab before the colon"',
        b': "unterminated',
        b': "' + b"x" * 508 + b'"',
        b': "' + b"x" * 509 + b'"',
        b": null",
        b': ["m"]',
        b'x: "m"',
        b': "\xe2\x82"',
    ],
)
def test_a_model_name_is_read_as_json_reads_it(value: bytes) -> None:
    data = b'{"id": "x", "model"' + value + b', "choices": []}'
    assert find_model(data) == _as_json_reads_it(data)

"""A chat stream as Anthropic's events, event for event (protocols/messages_stream.py)."""

from __future__ import annotations

import json

import pytest

from service.gateway.protocols.messages_stream import MessagesStream
from tests.gateway.protocols.support import chat_stream, delta, events, in_pieces, tool_deltas, usage_chunk


def translate(data: bytes, size: int | None = None) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    stream = MessagesStream("asked")
    out = b"".join(stream.feed(piece) for piece in in_pieces(data, size or len(data))) + stream.close()
    return events(out)


@pytest.mark.parametrize("size", [None, 1, 13])
def test_text_then_a_tool_call_streams_as_anthropics_events(size: int | None) -> None:
    data = chat_stream(
        delta(role="assistant", content=""),
        delta(content="Let me"),
        delta(content=" check."),
        *tool_deltas(0, "call_1", "look", '{"at":', ' "it"}'),
        delta(finish="tool_calls"),
        usage_chunk(30, 9, cached=10),
    )
    seen = translate(data, size)
    assert [name for name, _ in seen] == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert all(name == data["type"] for name, data in seen)
    start = seen[0][1]["message"]
    assert start["role"] == "assistant" and start["model"] == "up-model" and start["content"] == []
    assert seen[2][1]["content_block"] == {"type": "text", "text": ""}
    assert [seen[i][1]["delta"]["text"] for i in (3, 4)] == ["Let me", " check."]
    tool = seen[6][1]
    assert tool["index"] == 1 and tool["content_block"]["type"] == "tool_use"
    assert tool["content_block"]["id"] == "call_1" and tool["content_block"]["name"] == "look"
    partial = "".join(seen[i][1]["delta"]["partial_json"] for i in (7, 8))
    assert json.loads(partial) == {"at": "it"}
    final = seen[10][1]
    assert final["delta"]["stop_reason"] == "tool_use"
    assert final["usage"]["input_tokens"] == 20 and final["usage"]["output_tokens"] == 9
    assert final["usage"]["cache_read_input_tokens"] == 10


def test_the_first_chunk_gives_the_first_events_at_once() -> None:
    stream = MessagesStream()
    first = stream.feed(chat_stream(delta(role="assistant", content=""), done=False))
    assert [name for name, _ in events(first)] == ["message_start", "ping"]


def test_arguments_that_are_not_json_stream_as_they_came() -> None:
    seen = translate(chat_stream(*tool_deltas(0, "c", "f", "{not json"), delta(finish="tool_calls")))
    assert [d["delta"]["partial_json"] for n, d in seen if n == "content_block_delta"] == ["{not json"]


def test_tool_calls_that_end_with_stop_are_tool_use_as_in_a_whole_answer() -> None:
    """Some servers end a turn of tool calls with `finish_reason: "stop"`: the stream says
    `tool_use`, as `messages.from_chat` does for the same answer whole, so that a client runs
    the tools whether it streamed or not."""
    seen = translate(chat_stream(*tool_deltas(0, "c", "f", "{}"), delta(finish="stop")))
    assert seen[-2][0] == "message_delta" and seen[-2][1]["delta"]["stop_reason"] == "tool_use"
    text = translate(chat_stream(delta(content="abc"), delta(finish="stop")))
    assert text[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_max_tokens_and_an_end_without_done() -> None:
    seen = translate(chat_stream(delta(content="abc"), delta(finish="length"), done=False))
    assert seen[-2][1]["delta"]["stop_reason"] == "max_tokens" and seen[-1][0] == "message_stop"


def test_an_upstream_error_or_a_stream_cut_short_ends_with_an_error_event() -> None:
    seen = translate(
        chat_stream(delta(content="abc"), done=False) + b'data: {"error": {"message": "boom"}}\n\n'
    )
    assert seen[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})
    cut = translate(chat_stream(delta(content="abc"), done=False))
    assert cut[-1][0] == "error"
    stream = MessagesStream()
    stream.feed(chat_stream(delta(content="abc"), done=False))
    assert events(stream.fail("stream cut short"))[-1][1]["error"]["message"] == "stream cut short"
    assert stream.close() == b"" and stream.fail("again") == b""


def test_garbage_from_the_upstream_is_skipped() -> None:
    data = b"data: {nope\n\n" + chat_stream(
        delta(choices="x") | {"choices": "x"}, delta(content="ok", finish="stop")
    )
    seen = translate(data)
    assert [d["delta"]["text"] for n, d in seen if n == "content_block_delta"] == ["ok"]

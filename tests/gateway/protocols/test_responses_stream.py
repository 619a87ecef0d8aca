"""A chat stream as Responses events, event for event (protocols/responses_stream.py)."""

from __future__ import annotations

import pytest

from service.gateway.protocols.responses_stream import ResponsesStream
from tests.gateway.protocols.support import chat_stream, delta, events, in_pieces, tool_deltas, usage_chunk


def translate(data: bytes, size: int | None = None) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    stream = ResponsesStream({"model": "asked"}, "resp_1")
    out = b"".join(stream.feed(piece) for piece in in_pieces(data, size or len(data))) + stream.close()
    return events(out)


@pytest.mark.parametrize("size", [None, 1, 17])
def test_text_and_a_call_stream_as_responses_events(size: int | None) -> None:
    data = chat_stream(
        delta(role="assistant", content=""),
        delta(content="Hel"),
        delta(content="lo"),
        *tool_deltas(0, "call_1", "f", '{"a":', " 1}"),
        delta(finish="tool_calls"),
        usage_chunk(12, 5),
    )
    seen = translate(data, size)
    assert [name for name, _ in seen] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert [data["sequence_number"] for _, data in seen] == list(range(len(seen)))
    assert all(name == data["type"] for name, data in seen)
    assert seen[0][1]["response"]["id"] == "resp_1" and seen[0][1]["response"]["status"] == "in_progress"
    assert [seen[i][1]["delta"] for i in (4, 5)] == ["Hel", "lo"]
    added = seen[6][1]
    assert (
        added["output_index"] == 1 and added["item"]["call_id"] == "call_1" and added["item"]["name"] == "f"
    )
    assert seen[12][1]["arguments"] == '{"a": 1}'
    done = seen[-1][1]["response"]
    assert (
        done["status"] == "completed"
        and done["usage"]["input_tokens"] == 12
        and done["usage"]["output_tokens"] == 5
    )
    assert [item["type"] for item in done["output"]] == ["message", "function_call"]
    assert done["output"][0]["content"][0]["text"] == "Hello"


def test_length_ends_incomplete_and_a_break_ends_failed() -> None:
    assert (
        translate(chat_stream(delta(content="abc"), delta(finish="length")))[-1][0] == "response.incomplete"
    )
    filtered = translate(chat_stream(delta(content="abc"), delta(finish="content_filter")))
    assert filtered[-1][0] == "response.incomplete"
    assert filtered[-1][1]["response"]["incomplete_details"] == {"reason": "content_filter"}
    failed = translate(chat_stream(delta(content="abc"), done=False))
    assert failed[-1][0] == "response.failed"
    assert failed[-1][1]["response"]["status"] == "failed" and failed[-1][1]["response"]["error"]["message"]


def test_arguments_that_are_not_json_come_as_they_came() -> None:
    seen = translate(chat_stream(*tool_deltas(0, "c", "f", "{nope"), delta(finish="tool_calls")))
    assert seen[-1][1]["response"]["output"][0]["arguments"] == "{nope"

"""Reading a chat stream's events whole, however the network cuts them (protocols/chunks.py)."""

from __future__ import annotations

from service.gateway.protocols.chunks import DONE, ChatEvents, UpstreamError
from tests.gateway.protocols.support import chat_stream, delta, in_pieces


def test_events_come_whole_whatever_the_cuts() -> None:
    data = chat_stream(delta(content="héllo"), delta(content=" world", finish="stop"))
    for size in (1, 2, 7, 50, len(data)):
        reader = ChatEvents()
        seen = [e for piece in in_pieces(data, size) for e in reader.feed(piece)]
        assert [e["choices"][0]["delta"]["content"] for e in seen[:2]] == ["héllo", " world"]  # type: ignore[index]
        assert seen[2] is DONE


def test_crlf_comments_garbage_and_error_events() -> None:
    data = (
        b": keep-alive\r\n\r\n"
        b"data: not json\r\n\r\n"
        b"data: [1, 2]\n\n"
        b'data: {"choices": []}\n\n'
        b'data: {"error": {"message": "overloaded"}}\n\n'
    )
    seen = list(ChatEvents().feed(data))
    assert seen == [{"choices": []}, UpstreamError("overloaded")]


def test_the_last_event_without_its_blank_line_is_flushed() -> None:
    reader = ChatEvents()
    assert list(reader.feed(b'data: {"a": 1}')) == []
    assert list(reader.flush()) == [{"a": 1}]
    assert list(reader.flush()) == []

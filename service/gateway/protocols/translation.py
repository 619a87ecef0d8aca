"""What the gateway does with an answer in another protocol than the client's: one object per
attempt, for a whole answer (`answer`) or a stream (`stream`).

- `ToMessages`, `ToResponses`: a chat answer translated into the client's protocol; a whole
  answer to a request that asked for a stream (a server that ignores `stream`) as the events
  it would have streamed, since the client's SDK reads nothing else.
- `NativeResponses`: a Responses answer from a provider that speaks it, with its response id
  wrapped (`ids.py`) wherever it appears, so that the client can continue it.

An upstream's error (4xx) keeps its status and takes the client protocol's error shape. An
answer that cannot be read as what it claims raises `Untranslatable`: nothing reached the
client yet, so the next candidate may serve.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from service.gateway.protocols import messages, responses
from service.gateway.protocols.messages_stream import MessagesStream
from service.gateway.protocols.responses_stream import ResponsesStream
from service.gateway.protocols.values import as_dict, as_list

MAX_PENDING = 16 << 20
"""The longest event `NativeResponses` keeps whole to rewrite; a longer one passes as it is."""


class Untranslatable(Exception):
    """An upstream's answer is not what its protocol says (a 200 that is not a chat completion)."""


class StreamTranslator(Protocol):
    """A stream being translated: bytes in as the upstream sends them, bytes out for the client."""

    def feed(self, data: bytes) -> bytes: ...

    def close(self) -> bytes: ...

    def fail(self, reason: str) -> bytes: ...


class Translation(Protocol):
    """An attempt's answer, whole or streamed, in the client's protocol."""

    def answer(self, status: int, body: bytes) -> bytes: ...

    def stream(self) -> StreamTranslator: ...

    def events(self, body: bytes) -> bytes | None:
        """A whole 2xx answer to a request that asked for a stream, as the client protocol's
        events; None when it goes as it is."""
        ...


def error_message(body: bytes) -> str:
    """The message of an upstream's error answer, whatever its shape (OpenAI's, Anthropic's, text)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body[:1000].decode("utf-8", "replace").strip() or "the upstream refused the request"
    error = as_dict(data).get("error", data)
    message = as_dict(error).get("message") if isinstance(error, dict) else error
    return str(message)[:1000] if message else "the upstream refused the request"


def replayed(translator: StreamTranslator, chat: dict[str, Any]) -> bytes:
    """A whole chat completion as the events `translator` makes of the one-chunk stream that
    says the same: its text, its tool calls, its finish reason and its usage."""
    choices = chat["choices"]
    choice = as_dict(choices[0]) if choices else {}
    message = as_dict(choice.get("message"))
    delta: dict[str, Any] = {"role": "assistant", "content": messages.text_of(message.get("content"))}
    calls = [c for c in as_list(message.get("tool_calls")) if isinstance(c, dict)]
    if calls:
        delta["tool_calls"] = [_streamed(call, index) for index, call in enumerate(calls)]
    chunk: dict[str, Any] = {key: chat[key] for key in ("id", "model") if key in chat}
    chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": choice.get("finish_reason")}]
    if isinstance(chat.get("usage"), dict):
        chunk["usage"] = chat["usage"]
    data = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    return translator.feed(data) + translator.close()


def _streamed(call: dict[str, Any], index: int) -> dict[str, Any]:
    """A whole answer's tool call as a stream's delta says it: its arguments as text (an object,
    as some servers answer them whole, is read as `from_chat` reads it: a stream's deltas are
    text alone)."""
    function = call.get("function")
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if isinstance(function, dict) and isinstance(arguments, dict):
        function = {**function, "arguments": json.dumps(arguments)}
    return {**call, "index": index, "function": function}


def _chat(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise Untranslatable("the upstream's answer is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise Untranslatable("the upstream's answer is not a chat completion")
    return data


class ToMessages:
    """A chat answer as Anthropic Messages."""

    __slots__ = ("model",)

    def __init__(self, model: str | None) -> None:
        self.model = model

    def answer(self, status: int, body: bytes) -> bytes:
        if status >= 400:
            return json.dumps(messages.error(status, error_message(body))).encode()
        return json.dumps(messages.from_chat(_chat(body), self.model)).encode()

    def stream(self) -> StreamTranslator:
        return MessagesStream(self.model)

    def events(self, body: bytes) -> bytes:
        return replayed(self.stream(), _chat(body))


class ToResponses:
    """A chat answer as a Response, under the id the client gets."""

    __slots__ = ("request", "response_id")

    def __init__(self, request: dict[str, Any], response_id: str) -> None:
        self.request = request
        self.response_id = response_id

    def answer(self, status: int, body: bytes) -> bytes:
        if status >= 400:
            return json.dumps(responses.error(status, error_message(body))).encode()
        answer = responses.from_chat(_chat(body), self.request, self.response_id)
        try:
            return json.dumps(answer).encode()
        except RecursionError:  # the echoed request (its tools) is nested too deep to write back
            return json.dumps({**answer, "tools": []}).encode()

    def stream(self) -> StreamTranslator:
        return ResponsesStream(self.request, self.response_id)

    def events(self, body: bytes) -> bytes:
        return replayed(self.stream(), _chat(body))


class NativeResponses:
    """A native Responses answer whose response id is replaced by the wrapped one (`wrap`), and
    whose `previous_response_id` is the one the client sent (`previous`: the upstream's id and
    the client's), never the upstream's, which the client could not continue."""

    __slots__ = ("_previous", "_wrap")

    def __init__(self, wrap: Callable[[str], str | None], previous: tuple[str, str] | None = None) -> None:
        self._wrap = wrap
        self._previous = previous

    def answer(self, status: int, body: bytes) -> bytes:
        if status >= 300:
            return body
        return _IdRewriter(self._wrap, self._previous).rewrite(body, whole=True)

    def stream(self) -> StreamTranslator:
        return _IdRewriter(self._wrap, self._previous)

    def events(self, body: bytes) -> None:
        return None  # a native answer goes as it is, as a chat one does


class _IdRewriter:
    """Rewrites a Responses answer's ids in whole events, as they come."""

    __slots__ = ("_new", "_old", "_pending", "_previous", "_wrap")

    def __init__(self, wrap: Callable[[str], str | None], previous: tuple[str, str] | None = None) -> None:
        self._wrap = wrap
        self._old: bytes | None = None
        self._new = b""
        self._pending = b""
        self._previous = (
            (f'"{previous[0]}"'.encode(), f'"{previous[1]}"'.encode()) if previous is not None else None
        )

    def rewrite(self, data: bytes, *, whole: bool = False) -> bytes:
        if self._old is None:
            found = _response_id(data, whole=whole)
            if found is not None:
                wrapped = self._wrap(found)
                if wrapped is not None:
                    self._old, self._new = f'"{found}"'.encode(), f'"{wrapped}"'.encode()
        if self._old is not None:
            data = data.replace(self._old, self._new)
        return data.replace(*self._previous) if self._previous is not None else data

    def feed(self, data: bytes) -> bytes:
        window = self._pending + data if self._pending else data
        end = window.rfind(b"\n\n")
        if end < 0:
            if len(window) > MAX_PENDING:
                self._pending = b""
                return window
            self._pending = window
            return b""
        self._pending = window[end + 2 :]
        return self.rewrite(window[: end + 2])

    def close(self) -> bytes:
        rest, self._pending = self._pending, b""
        return self.rewrite(rest) if rest else b""

    def fail(self, reason: str) -> bytes:
        error = {"error": {"type": "upstream_failed", "message": reason}}  # the SDKs raise it
        return b"\n\ndata: " + json.dumps(error).encode() + b"\n\n"


def _response_id(data: bytes, *, whole: bool) -> str | None:
    """The id of the Response in `data`: a whole answer's top-level `id`, or the one of the
    `response` an event carries (`response.created` comes first)."""
    if whole:
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            return None
        found = as_dict(value).get("id")
        return found if isinstance(found, str) else None
    for raw in data.split(b"\n\n"):
        at = raw.find(b"data:")
        if at < 0 or b'"response"' not in raw:
            continue
        try:
            event = json.loads(raw[at + 5 :])
        except (ValueError, RecursionError):
            continue
        found = as_dict(as_dict(event).get("response")).get("id")
        if isinstance(found, str):
            return found
    return None

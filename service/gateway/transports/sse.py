"""Relaying an upstream's server-sent events to the client as they arrive.

Chunks are written as they are read, not buffered, and the stream's `usage` is picked up on
the way. When the gateway asked the upstream for a usage chunk that the client did not ask
for (`stream_options.include_usage`, so that every stream is counted), the relay writes
whole events only and drops that usage-only chunk; a torn event waits for its end.

After the first byte reached the client nothing can fall back: an upstream that breaks off
or falls silent for `idle_s` ends the stream with an error event.

A stream in another protocol than the client's goes through a `translator` (docs/reference.md §14): the
upstream's bytes in, the client's events out, as they arrive; the usage is still read from
the upstream's own bytes, and kept in chat's shape whatever protocol it came in.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from aiohttp import web

from service.gateway.call import Call
from service.gateway.protocols import usage as usages
from service.gateway.protocols.messages import error as messages_error
from service.gateway.protocols.translation import StreamTranslator
from service.gateway.transports.base import describe_error, masked
from service.gateway.transports.errors import WireError
from service.gateway.transports.response import Response
from service.gateway.transports.scan import find_model, find_usage

_USAGE = b'"usage"'
_NO_CHOICES = (b'"choices":[]', b'"choices": []')
_MAX_PENDING = 1 << 16
"""A torn event longer than this is given up on: written as it is, not looked into."""


class Answer(web.StreamResponse):
    """The client's stream, whose status line and headers go out with its first bytes, in one
    write: aiohttp's `StreamResponse` writes them alone at `prepare` (its `Response` holds them
    for its body, as here). The relay writes its first pass's bytes at once, or the head alone
    when that pass has none to give (a torn event), so the head is never held back."""

    _send_headers_immediately = False


async def relay_events(
    call: Call,
    upstream: Response,
    first: bytes,
    headers: dict[str, str],
    idle_s: float,
    *,
    drop_usage: bool = False,
    name_model: bool = False,
    translator: StreamTranslator | None = None,
    key: bytes = b"",
) -> web.StreamResponse:
    """Relay `upstream`'s event stream (its `first` bytes read already) to the client.

    `drop_usage`: the usage-only chunk is the gateway's, not the client's; `name_model`: find
    the model the stream names (`call.answer_model`), for the metrics; `translator`: what the
    client gets instead of the upstream's bytes; `key`: the provider's key, masked in every
    chunk as it is read (`_masked`), before anything looks into it.

    Bytes are written as they come, and looked into (usage, model) once written. The last ones
    go with the stream's end in one write: those of an upstream whose answer has ended (often
    the whole stream, read at once; looked into for usage before that write, so that a client
    that leaves during it is charged the usage, which the vendor billed), or the error event of
    a stream cut short.
    """
    if translator is not None:
        drop_usage = False  # the translator reads the usage chunk; the client never sees it
    merge = call.upstream_protocol == "messages"  # usage comes in two parts: message_start, message_delta
    headers["Cache-Control"] = "no-cache"
    answer = Answer(status=upstream.status, headers=headers)
    usage = None
    pending = b""
    held = b""  # the end of the last chunk that may begin the key: it goes with the next
    if key and (key in first or first[-1:] != b"\n"):  # else as it came: a whole event, no key
        first, held = _masked(first, key, upstream.ended)
    chunk = window = first
    head = True  # the first pass: the head goes with its bytes, or alone
    ended = False  # the answer's end is written
    whole = False  # the upstream's whole answer is read, and its usage looked into
    try:
        writer = await answer.prepare(call.request)
        if writer is None:  # only an answer whose end was written has none: not a new one
            raise RuntimeError("the stream's answer has no writer")
        call.prepared = answer
        while chunk or held:
            window = pending + chunk  # `pending`: a torn event carried over, usually empty
            end = window.rfind(b"\n\n")
            if not drop_usage:
                pending = window[end + 2 :] if end >= 0 else window
                if len(pending) > _MAX_PENDING:  # no event boundary in sight: stop looking
                    pending = b""
                out = chunk if translator is None else translator.feed(chunk)
            elif end >= 0:
                out, pending = _without_usage_chunks(window[: end + 2]), window[end + 2 :]
            elif len(window) > _MAX_PENDING:
                out, pending = window, b""
            else:
                out, pending = b"", window
            if upstream.ended:  # nothing more comes: these bytes go with the end, in one write
                chunk = b""
                ended = whole = True
                if end >= 0 and _USAGE in window:  # looked into first: a client that leaves
                    usage = _scanned(window, end, usage, merge)  # as they go is charged it
                    end = -1
                await answer.write_eof(out + _last(pending if drop_usage else b"", translator))
            elif out or head:  # b"": the head alone; by its writer, a coroutine fewer a chunk
                await writer.write(out)
            if end >= 0 and _USAGE in window:  # the client has the bytes: now looked into
                usage = _scanned(window, end, usage, merge)
            if head and name_model:
                call.answer_model = find_model(first)
            head = False
            if not chunk and not held:
                break
            try:
                chunk = await upstream.readany(idle_s)
                if key and (held or key in chunk or chunk[-1:] != b"\n"):  # else as it came
                    chunk, held = _masked(held + chunk, key, upstream.ended)
            except TimeoutError:
                call.broken = f"stream cut short: no chunk within {idle_s:g} s"
            except WireError as exc:
                call.broken = f"stream cut short: {describe_error(exc)}"
            if call.broken is not None:
                ended = True
                await answer.write_eof(_broken(call, call.broken, translator))
                break
        if not ended:
            whole = True  # the upstream ended (b""): every window was looked into
            await answer.write_eof(_last(pending if drop_usage else b"", translator))
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        if whole:  # the client left during the last write: the vendor billed this usage
            call.usage = usages.as_chat(call.upstream_protocol, usage)
        upstream.close()  # the client left: drop the upstream connection too
        return answer
    except BaseException:  # cancelled (the client left), or the connection lost while waiting
        if whole:
            call.usage = usages.as_chat(call.upstream_protocol, usage)
        upstream.close()
        raise
    upstream.release()
    if call.broken is None:  # a stream cut short said only part of its usage: its reservation then
        call.usage = usages.as_chat(call.upstream_protocol, usage)
    if name_model and call.answer_model is None and usage is not None:
        call.answer_model = find_model(window)
    return answer


def _masked(data: bytes, key: bytes, ended: bool) -> tuple[bytes, bytes]:
    """`data` read from the upstream with the provider's `key` replaced by `****`
    (docs/reference.md §2.4), split in what may go now and what is held for the next chunk: its
    end when it may be the start of the key, torn between two chunks (not once the upstream
    `ended`). A key holds no line break, so a chunk ending one (a whole event: nearly all of
    them) holds nothing back; else the longest end of it that begins the key (at most
    `len(key) - 1` bytes) waits for the next chunk, where the key is whole and masked, or not
    the key after all and sent. Bytes are delayed only then, never a whole event's."""
    data = masked(data, key)
    if ended or data[-1:] == b"\n":
        return data, b""
    first = key[:1]
    at = data.find(first, max(0, len(data) - len(key) + 1))
    while at >= 0:
        if key.startswith(data[at:]):
            return data[:at], data[at:]
        at = data.find(first, at + 1)
    return data, b""


def _last(held: bytes, translator: StreamTranslator | None) -> bytes:
    """What ends a stream the upstream ended: the last event `held` back (without its blank
    line, when the usage chunk is dropped) and the translator's close."""
    return held if translator is None else held + translator.close()


def error_event(reason: str) -> bytes:
    """An SSE event the OpenAI SDKs raise as an APIError; the blank lines end any torn event."""
    error = {"error": {"type": "upstream_failed", "message": reason}}
    return b"\n\ndata: " + json.dumps(error).encode() + b"\n\n"


def _broken(call: Call, reason: str, translator: StreamTranslator | None) -> bytes:
    """The event that ends a stream cut short, in the client's protocol."""
    if translator is not None:
        return translator.fail(reason)
    if call.upstream_protocol == "messages":
        data = json.dumps(messages_error(502, reason)).encode()
        return b"\n\nevent: error\ndata: " + data + b"\n\n"
    return error_event(reason)


def _scanned(window: bytes, end: int, usage: dict[str, Any] | None, merge: bool) -> dict[str, Any] | None:
    """The stream's usage so far, with what the whole events of `window` (up to `end`) say."""
    return _usage_in(window, end, usage) if merge else find_usage(window, end) or usage


def _usage_in(window: bytes, end: int, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Anthropic's usage so far: `message_start`'s, updated by `message_delta`'s."""
    start = window.find(b"message_start", 0, end)
    if start >= 0:  # its usage (input and cache tokens) is not the last one of the window
        first = find_usage(window, window.find(b"\n\n", start))
        usage = {**(usage or {}), **first} if first else usage
    last = find_usage(window, end)
    return {**(usage or {}), **last} if last else usage


def _without_usage_chunks(events: bytes) -> bytes:
    """`events` (whole ones) without the chunks that carry only a usage and no choices."""
    if not any(marker in events for marker in _NO_CHOICES):
        return events
    kept = [event for event in events.split(b"\n\n") if not _usage_only(event)]
    return b"\n\n".join(kept)


def _usage_only(event: bytes) -> bool:
    if _USAGE not in event:
        return False
    at = event.find(b"data:")
    if at < 0:
        return False
    try:
        chunk = json.loads(event[at + 5 :])
    except (ValueError, RecursionError):
        return False
    return isinstance(chunk, dict) and not chunk.get("choices") and chunk.get("usage") is not None

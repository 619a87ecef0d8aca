"""litellm's answers relayed by the litellm transport (`transports.litellm`): in OpenAI's
shape (JSON, or server-sent events chunk by chunk), the provider's key masked, with the
vendor's request id and rate limits passed back and the usage that prices them. Its names are
the transport's internals, `_`-prefixed as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web

from service.gateway.call import Call
from service.gateway.transports.base import masked, pass_back, retry_after

_DONE = b"data: [DONE]\n\n"


_USAGE: Mapping[str, Any] = {
    "prompt_tokens": True,
    "completion_tokens": True,
    "total_tokens": True,
    "prompt_tokens_details": {
        "cached_tokens", "cache_write_tokens", "audio_tokens", "image_tokens", "text_tokens",
    },
    "completion_tokens_details": {
        "reasoning_tokens", "audio_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens",
        "text_tokens",
    },
}  # fmt: skip
_CHAT_ANSWER: Mapping[str, Any] = dict.fromkeys(
    ("id", "object", "created", "model", "choices", "system_fingerprint", "service_tier"), True
) | {"usage": _USAGE}
"""What a chat answer (or chunk) translated by litellm carries to the client: the fields of OpenAI's
schema, and not litellm's own. Its usage chunk has `cost`, litellm's bill from its own price map
as a binary float (docs/reference.md §13: Switchboard prices by the provider's `pricing`, exactly,
and says so in `x-switchboard-cost-usd` and the ledger), and its usage Anthropic's
`cache_creation_input_tokens`/`cache_read_input_tokens`, which OpenAI's `prompt_tokens_details`
already say. `choices` are the answer's content and pass as litellm gives them (its
`reasoning_content`, which clients of reasoning models read, included)."""


async def _relay_stream(
    call: Call, stream: Any, first: asyncio.Future[Any], headers: dict[str, str], idle_s: float, key: bytes
) -> web.StreamResponse:
    """Relay `stream`, litellm's chunks of a vendor's answer that began, to the client; `first`
    reads its first chunk (`litellm._began`).

    The answer's head goes at once, as a native stream's first chunk does: litellm gives no
    chunk until the vendor's first content (an Anthropic stream's `message_start` and `ping`
    make none), and a client waiting for it would wait the model's whole time to its first
    token (docs/reference.md §14: the first byte of a translated stream follows the vendor's).
    From then on, as for a native stream, a failure ends the stream with an error event; a
    failure before it (a refusal, a status that falls back) is the attempt's (`_forward`)."""
    headers["Content-Type"] = "text/event-stream"
    headers["Cache-Control"] = "no-cache"
    answer = web.StreamResponse(headers=headers)
    chunks: AsyncIterator[Any] = stream
    # A request translated from another protocol (docs/reference.md §14): its events, from every chunk.
    translator = call.translation.stream() if call.translation is not None else None
    named = False
    try:
        await answer.prepare(call.request)
        call.prepared = answer
        # each chunk is its own JSON, masked alone: a key the vendor split across two is not seen
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    chunk = await (anext(chunks) if named else first)
            except StopAsyncIteration:
                end = _DONE if translator is None else translator.feed(_DONE) + translator.close()
                await answer.write(end)
                break
            except Exception as exc:
                late = isinstance(exc, TimeoutError)
                call.broken = (
                    f"stream cut short: {f'no chunk within {idle_s:g} s' if late else type(exc).__name__}"
                )
                if translator is not None:
                    await answer.write(translator.fail(call.broken))
                else:
                    error = {"error": {"type": "upstream_failed", "message": call.broken}}
                    await answer.write(b"\n\ndata: " + json.dumps(error).encode() + b"\n\n")
                await _close(stream)
                break
            if not named:
                call.answer_model, named = _model(chunk, key.decode()), True
            usage = _usage(chunk)
            if translator is not None:
                data = masked(chunk.model_dump_json(exclude_none=True).encode(), key)
                out = translator.feed(b"data: " + data + b"\n\n")
                if out:
                    await answer.write(out)
            elif usage is None or call.wants_usage or getattr(chunk, "choices", None):
                data = masked(chunk.model_dump_json(exclude_none=True, include=_CHAT_ANSWER).encode(), key)
                await answer.write(b"data: " + data + b"\n\n")
            call.usage = usage or call.usage
        await answer.write_eof()
    except ConnectionResetError:
        first.cancel()
        await _close(stream)  # the client left: drop the upstream request too
    except BaseException:
        first.cancel()
        await _close(stream)
        raise
    return answer


def _pass_back(result: Any, headers: dict[str, str], key: str, said: Callable[[str], bool]) -> None:
    """The vendor's request id and rate limits, as litellm kept them, onto the answer
    (docs/reference.md §7); `said`: whether the client's request holds a text (`_passed`)."""
    hidden = getattr(result, "_hidden_params", None)
    kept = hidden.get("additional_headers") if isinstance(hidden, dict) else None
    if isinstance(kept, dict):
        _passed(kept, headers, key, said)


_VENDOR_LIMIT = re.compile(r"anthropic-ratelimit-(requests|tokens)-(limit|remaining)")
"""Anthropic's rate limits that litellm names as OpenAI's (`x-ratelimit-remaining-requests`) on an answer."""


def _pass_back_refusal(
    exc: Exception, headers: dict[str, str], key: str, said: Callable[[str], bool]
) -> None:
    """The vendor's request id and rate limits onto its refusal of the client's request, as
    `_pass_back` puts them on an answer (docs/reference.md §7): litellm keeps the upstream's headers on
    its exception as they came, so Anthropic's rate limits are named here as litellm names them
    on an answer."""
    raw = getattr(exc, "litellm_response_headers", None)
    if not isinstance(raw, Mapping):
        return
    kept: dict[str, str] = {}
    for field, value in raw.items():  # not `key`: that is the provider's, looked for below
        name = str(field).lower()
        limit = _VENDOR_LIMIT.fullmatch(name)
        kept[f"x-ratelimit-{limit[2]}-{limit[1]}" if limit else name] = str(value)
    _passed(kept, headers, key, said)


def _passed(kept: Mapping[Any, Any], headers: dict[str, str], key: str, said: Callable[[str], bool]) -> None:
    """From the vendor's headers `kept`: its request id, `retry-after` and `x-ratelimit-*`, none
    holding the provider's `key` (docs/reference.md §2.4), and a request id the client's request
    does not hold (`said`, `base.pass_back`)."""
    for field, value in kept.items():
        name = str(field).removeprefix("llm_provider-").lower()
        if name == "request-id":  # Anthropic's name for it
            name = "x-request-id"
        if key and key in str(value):
            continue
        if name == "x-request-id":
            pass_back({name: str(value)}, headers, said=said)  # the vendor's id names the answer, when sane
        elif name in ("retry-after", "retry-after-ms") or name.startswith("x-ratelimit-"):
            headers.setdefault(name, str(value))
    if "retry-after" in headers or "retry-after-ms" in headers:
        retry_after(headers)


def _model(result: Any, key: str | None) -> str | None:
    """The model the vendor's answer names; none when it holds the provider's `key` (a metric's
    label, a span's attribute: docs/reference.md §2.4)."""
    model = getattr(result, "model", None)
    return model if isinstance(model, str) and not (key and key in model) else None


def _usage(result: Any) -> dict[str, Any] | None:
    """litellm's usage in Chat Completions' shape, with what prices it apart (docs/reference.md
    §13.1): cache reads (`prompt_tokens_details.cached_tokens`), cache writes
    (`cache_creation_input_tokens`, which litellm counts inside `prompt_tokens`, as it does
    Anthropic's cache reads) and reasoning tokens."""
    usage = getattr(result, "usage", None)
    if usage is None:
        return _billed(getattr(result, "meta", None))
    prompt = getattr(usage, "prompt_tokens", None)
    completion = getattr(usage, "completion_tokens", None)
    if prompt is None and completion is None:
        return None
    found: dict[str, Any] = {"prompt_tokens": prompt or 0, "completion_tokens": completion or 0}
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
    if isinstance(cached, int) and cached:
        found["prompt_tokens_details"] = {"cached_tokens": cached}
    written = getattr(usage, "cache_creation_input_tokens", None)
    if isinstance(written, int) and written:
        found["cache_creation_input_tokens"] = written
    reasoning = getattr(getattr(usage, "completion_tokens_details", None), "reasoning_tokens", None)
    if isinstance(reasoning, int) and reasoning:
        found["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return found


def _billed(meta: Any) -> dict[str, Any] | None:
    """A rerank's usage: what its vendor says it billed (`meta.billed_units`), search units (the
    queries a per-query price multiplies) or tokens (all input)."""
    billed = meta.get("billed_units") if isinstance(meta, Mapping) else None
    if not isinstance(billed, Mapping):
        return None
    found = {name: billed[name] for name in ("search_units", "total_tokens") if type(billed.get(name)) is int}
    return found or None


async def _close(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):  # a half-dead stream may fail to close: nothing to do
            await close()

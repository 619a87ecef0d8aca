"""The litellm path: vendors that do not speak OpenAI's HTTP API (Anthropic, Gemini, Cohere).

This module is imported only when a request goes to such a vendor: importing litellm takes
seconds, and nothing on the direct path may pay for it. litellm reads its own environment,
so `LITELLM_LOCAL_MODEL_COST_MAP` and `LITELLM_OFFLINE_MODE` are set here, before the
import, to keep it from fetching its cost map or anything else over the network. litellm's
own retries are off: falling back is ours.

The contract is the one of `service.gateway.transports.openai.forward`: the answer is relayed in OpenAI's
shape (JSON, or server-sent events chunk by chunk), and a failure the next candidate may
fix raises `Failure` as long as nothing reached the client.

litellm's requests go out through the gateway's own session (`transports.bridge`), not an
HTTP client of litellm's: no redirect is followed, only allowed upstreams are reached, and a
non-streamed answer is read within `SWITCHBOARD_MAX_UPSTREAM_BYTES` (docs/reference.md §7), as on the
direct path.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping
from types import ModuleType
from typing import Any

import aiohttp
from aiohttp import web

from service.config.models import Provider
from service.gateway.call import Call, Failure, NotTranslated, falls_back
from service.gateway.transports.base import (
    TooLarge,
    Transport,
    masked,
    pass_back,
    reflected,
    retry_after,
    sendable_key,
    wait_ms,
)
from service.gateway.transports.guard import RedirectRefused, refusal_of
from service.vendors import VENDORS

_DONE = b"data: [DONE]\n\n"

OPENAI_FIELDS = frozenset(
    (
        "messages", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
        "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
        "top_logprobs", "seed", "user", "tools", "tool_choice", "parallel_tool_calls",
        "response_format", "input", "encoding_format", "dimensions", "query", "documents", "top_n",
    )
)  # fmt: skip
"""The request fields passed on to litellm (docs/reference.md §7), besides `model` and `stream`,
which are ours.

litellm takes its routing and credentials from the same keyword arguments as the request
(`base_url`, `api_base`, `api_key`, `extra_headers`, `custom_llm_provider`, `api_version`,
`litellm_params`, `model_list`, `mock_response`...): anything a client sends beyond these
fields could choose where the provider's key goes, so it is dropped, not forwarded."""


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


def litellm_model(provider: Provider, model: str) -> str:
    """`vendor/model` as litellm names it, for the model the provider is asked for."""
    vendor = getattr(provider, "provider", None)
    prefix = VENDORS[vendor].litellm_prefix if vendor in VENDORS else "openai"
    return f"{prefix}/{provider.upstream_model(model)}"


def _import_litellm() -> ModuleType:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before the import that reads it
    # Nor anything else it would fetch on its own (Anthropic's beta headers from GitHub, on the
    # first request to Anthropic: docs/reference.md §1, nothing is downloaded at run time).
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    module = importlib.import_module("litellm")
    module.suppress_debug_info = True  # type: ignore[attr-defined]  # litellm's module-level settings
    module.telemetry = False  # type: ignore[attr-defined]
    logging.getLogger("LiteLLM").setLevel(logging.WARNING)
    return module


def _clients(session: aiohttp.ClientSession, max_bytes: int) -> dict[bool, tuple[Any, Any]]:
    """By whether the calls they carry stream: (the bridge's transport over `session`, litellm's
    client on it). Also routes the clients litellm builds itself through the bridge
    (`bridge.install`). Called after the import."""
    from service.gateway.transports.bridge import SessionTransport, install

    handler = importlib.import_module("litellm.llms.custom_httpx.http_handler").AsyncHTTPHandler

    install(handler)
    clients = {}
    for streams in (False, True):
        transport = SessionTransport(session, max_bytes, streams=streams)
        clients[streams] = (transport, handler(transport=transport, follow_redirects=False))
    return clients


class LiteLLMTransport(Transport):
    """Translates through litellm for vendors with their own protocols (Anthropic, Gemini, Cohere).

    `session` carries litellm's requests (`transports.bridge`); `max_bytes` bounds the answers read.
    """

    def __init__(self, session: aiohttp.ClientSession, max_bytes: int = 64 << 20) -> None:
        self.session = session
        self.max_bytes = max_bytes
        self._module: ModuleType | None = None
        self._loading: asyncio.Future[ModuleType] | None = None
        self._clients: dict[bool, tuple[Any, Any]] = {}
        self._current: Any = None
        """`bridge.CURRENT`, once litellm is loaded."""
        self._call: Any = None
        """`bridge.CALL`, once litellm is loaded."""

    async def warm(self) -> ModuleType:
        """Import litellm once, in a worker thread, so the event loop goes on serving meanwhile."""
        if self._module is not None:
            return self._module
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(_import_litellm))
        module = await asyncio.shield(self._loading)
        if not self._clients:
            from service.gateway.transports.bridge import CALL, CURRENT

            self._clients = _clients(self.session, self.max_bytes)
            self._current, self._call = CURRENT, CALL
        self._module = module
        return module

    async def send(self, call: Call, provider: Provider, headers: dict[str, str]) -> web.StreamResponse:
        """Send `call` through litellm to `provider` and relay the answer; raises `Failure` to move on."""
        litellm = self._module or await self.warm()
        transport, client = self._clients[call.stream and call.purpose == "chat"]
        token = self._current.set(transport)  # the clients litellm builds itself send through it too
        marks = self._call.set(call)  # what its requests mark: delivered, answered
        try:
            return await _forward(litellm, client, call, provider, headers)
        finally:
            self._call.reset(marks)
            self._current.reset(token)


async def _forward(
    litellm: Any, client: Any, call: Call, provider: Provider, headers: dict[str, str]
) -> web.StreamResponse:
    try:
        key = sendable_key(provider)
    except ValueError as exc:
        raise Failure(None, str(exc)) from None
    model = call.model or ""
    if model not in provider.model_map and not _MODEL_NAME.match(model):
        # litellm puts the model in the URL for some vendors (Gemini: `models/{model}:generateContent`):
        # `../cachedContents`, `x?key=` would choose the endpoint the provider's key goes to.
        named = f"a model named {model[:100]!r}" if model else "a request that names no model"
        reason = f"{named} cannot be sent to {provider.label} (a model is letters, digits and `._@+-`)"
        raise Failure(None, reason, blames_provider=False)
    params = {k: v for k, v in call.data.items() if k in OPENAI_FIELDS}
    streaming = call.stream and call.purpose == "chat"
    if streaming:  # every stream is counted; the client gets the usage chunk if it asked
        params["stream_options"] = {"include_usage": True}
    else:
        params.pop("stream_options", None)
    # litellm's own timeout (one number for httpx: connecting and each read) only backs
    # ours up; the limits of docs/reference.md §2.1 are the asyncio timeouts around what it does.
    if streaming:
        limit, late = provider.first_byte_timeout_s, "no first byte within {:g} s"
        params["timeout"] = max(provider.first_byte_timeout_s, provider.idle_timeout_s)
    else:
        limit, late = provider.timeout_s, "no whole answer within {:g} s"
        params["timeout"] = provider.timeout_s
    params.update(
        model=litellm_model(provider, model),
        api_key=key,
        api_base=provider.endpoint.rstrip("/"),
        num_retries=0,
        client=client,
    )
    if call.purpose == "chat":
        params["max_retries"] = 0
        if call.trace_headers is not None:  # tracing on (docs/reference.md §14): the attempt's `traceparent`
            params["extra_headers"] = dict(call.trace_headers)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(limit):
            if call.purpose == "embeddings":
                result: Any = await litellm.aembedding(**params)
            elif call.purpose == "reranking":
                result = await litellm.arerank(**params)
            elif streaming:
                result = await litellm.acompletion(stream=True, drop_params=True, **params)
                first = await anext(result)
            else:
                result = await litellm.acompletion(drop_params=True, **params)
    except TimeoutError:
        raise Failure(None, late.format(limit)) from None
    except Exception as exc:
        guarded = _guarded(exc)
        if guarded is not None:  # refused by the session's rules, or over the size limit
            raise Failure(None, guarded) from None
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500:
            status = _upstream_client_error(exc) or status
        if isinstance(status, int) and 400 <= status < 500 and not falls_back(status):
            _pass_back_refusal(exc, headers, reflected(key))
            return _client_error(exc, status, key, headers)
        if not _reached_upstream(exc):
            # litellm failed on the request itself (a malformed `tools`, `messages` of another
            # shape: it reports them as a 500 "connection error"), before sending anything.
            raise NotTranslated(_first_cause(exc)) from None
        if not isinstance(status, int):
            raise Failure(None, type(exc).__name__) from None
        raise Failure.of_status(status, _asked_to_wait(exc)) from None
    call.first_byte_s = loop.time() - started
    shown = reflected(key)  # looked for in what the vendor sends back
    secret = shown.encode()
    _pass_back(result, headers, shown)
    if streaming:
        return await _relay_stream(call, result, first, headers, provider.idle_timeout_s, secret)
    call.usage = _usage(result)
    call.answer_model = _model(result, shown)
    headers["Content-Type"] = "application/json"
    # A client of another protocol gets its own shape from all of it (Anthropic's cache writes).
    shape = _CHAT_ANSWER if call.purpose == "chat" and call.translation is None else None
    body = masked(result.model_dump_json(exclude_none=True, include=shape).encode(), secret)
    return web.Response(body=body, headers=headers)


async def _relay_stream(
    call: Call, stream: Any, first: Any, headers: dict[str, str], idle_s: float, key: bytes
) -> web.StreamResponse:
    headers["Content-Type"] = "text/event-stream"
    headers["Cache-Control"] = "no-cache"
    answer = web.StreamResponse(headers=headers)
    chunks: AsyncIterator[Any] = stream
    chunk = first
    # A request translated from another protocol (docs/reference.md §14): its events, from every chunk.
    translator = call.translation.stream() if call.translation is not None else None
    try:
        await answer.prepare(call.request)
        call.prepared = answer
        call.answer_model = _model(chunk, key.decode())
        # each chunk is its own JSON, masked alone: a key the vendor split across two is not seen
        while True:
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
            try:
                async with asyncio.timeout(idle_s):
                    chunk = await anext(chunks)
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
        await answer.write_eof()
    except ConnectionResetError:
        await _close(stream)  # the client left: drop the upstream request too
    except BaseException:
        await _close(stream)
        raise
    return answer


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,255}\Z")
"""The model names a client may ask a vendor behind litellm for (every vendor's fit): nothing
that reads as a path, a query or a fragment in a URL."""
_NETWORK_MODULES = ("httpx", "httpcore", "aiohttp")


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from, outermost first (a few levels)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 16:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _reached_upstream(exc: BaseException) -> bool:
    """Whether litellm's error comes from the upstream: an answer (an HTTP status error), a
    connection or a timeout, which all pass through its HTTP client's exceptions. An error of
    its own (translating the request) has only litellm's and Python's in its chain."""
    return any(
        isinstance(e, OSError | TimeoutError) or type(e).__module__.startswith(_NETWORK_MODULES)
        for e in _causes(exc)
    )


def _upstream_client_error(exc: BaseException) -> int | None:
    """The upstream's own 4xx under litellm's client error: litellm makes some another (an
    Anthropic 413 its 400), and the client must get the upstream's (docs/reference.md §14)."""
    for cause in reversed(_causes(exc)):
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if type(cause).__module__.startswith("httpx") and isinstance(status, int):
            return status if 400 <= status < 500 else None
    return None


def _guarded(exc: BaseException) -> str | None:
    """Why the bridge stopped litellm's request (`transports.bridge`): an upstream the allowed
    upstreams refuse, a redirect, an answer over the size limit; None for anything else."""
    refusal = refusal_of(exc)
    if refusal is not None:
        return refusal
    for cause in _causes(exc):
        if isinstance(cause, TooLarge | RedirectRefused):
            return str(cause)
    return None


def _first_cause(exc: BaseException) -> str:
    return type(_causes(exc)[-1]).__name__


def _client_error(exc: Exception, status: int, key: str | None, headers: dict[str, str]) -> web.Response:
    """The vendor's refusal of the client's request, in OpenAI's error shape, the provider's key
    masked in it (not a placeholder's word: `reflected`)."""
    message = str(exc)
    shown = reflected(key)
    if shown:
        message = message.replace(shown, "****")
    error = {"error": {"type": "invalid_request_error", "message": message, "code": status}}
    headers["Content-Type"] = "application/json"
    return web.Response(body=json.dumps(error).encode(), status=status, headers=headers)


def _pass_back(result: Any, headers: dict[str, str], key: str) -> None:
    """The vendor's request id and rate limits, as litellm kept them, onto the answer
    (docs/reference.md §7)."""
    hidden = getattr(result, "_hidden_params", None)
    kept = hidden.get("additional_headers") if isinstance(hidden, dict) else None
    if isinstance(kept, dict):
        _passed(kept, headers, key)


_VENDOR_LIMIT = re.compile(r"anthropic-ratelimit-(requests|tokens)-(limit|remaining)")
"""Anthropic's rate limits that litellm names as OpenAI's (`x-ratelimit-remaining-requests`) on an answer."""


def _asked_to_wait(exc: Exception) -> int | None:
    """What the vendor's `retry-after` on a failure litellm raised asks (ms), if it said."""
    raw = getattr(exc, "litellm_response_headers", None)
    if not isinstance(raw, Mapping):
        return None
    return wait_ms({str(key).lower(): str(value) for key, value in raw.items()})


def _pass_back_refusal(exc: Exception, headers: dict[str, str], key: str) -> None:
    """The vendor's request id and rate limits onto its refusal of the client's request, as
    `_pass_back` puts them on an answer (docs/reference.md §7): litellm keeps the upstream's headers on
    its exception as they came, so Anthropic's rate limits are named here as litellm names them
    on an answer."""
    raw = getattr(exc, "litellm_response_headers", None)
    if not isinstance(raw, Mapping):
        return
    kept: dict[str, str] = {}
    for key, value in raw.items():
        name = str(key).lower()
        limit = _VENDOR_LIMIT.fullmatch(name)
        kept[f"x-ratelimit-{limit[2]}-{limit[1]}" if limit else name] = str(value)
    _passed(kept, headers, key)


def _passed(kept: Mapping[Any, Any], headers: dict[str, str], key: str) -> None:
    """From the vendor's headers `kept`: its request id, `retry-after` and `x-ratelimit-*`, none
    holding the provider's `key` (docs/reference.md §2.4)."""
    for field, value in kept.items():
        name = str(field).removeprefix("llm_provider-").lower()
        if name == "request-id":  # Anthropic's name for it
            name = "x-request-id"
        if key and key in str(value):
            continue
        if name == "x-request-id":
            pass_back({name: str(value)}, headers)  # the vendor's id names the answer, when it is sane
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
        return None
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


async def _close(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):  # a half-dead stream may fail to close: nothing to do
            await close()

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

This module sends the request; `litellm_answers` relays what comes back, and `litellm_errors`
says what litellm's exceptions mean.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
from contextvars import ContextVar
from types import ModuleType
from typing import Any

import aiohttp
from aiohttp import web

from service.config.models import Provider
from service.gateway.call import Call, Failure, NotTranslated, falls_back
from service.gateway.transports.base import Transport, masked, reflected, sendable_key
from service.gateway.transports.litellm_answers import (
    _CHAT_ANSWER,
    _model,
    _pass_back,
    _pass_back_refusal,
    _relay_stream,
    _usage,
)
from service.gateway.transports.litellm_errors import (
    _asked_to_wait,
    _client_error,
    _first_cause,
    _guarded,
    _reached_upstream,
    _upstream_client_error,
)
from service.vendors import VENDORS

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
        self._began: Any = None
        """`bridge.BEGAN`, once litellm is loaded."""

    async def warm(self) -> ModuleType:
        """Import litellm once, in a worker thread, so the event loop goes on serving meanwhile."""
        if self._module is not None:
            return self._module
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(_import_litellm))
        module = await asyncio.shield(self._loading)
        if not self._clients:
            from service.gateway.transports.bridge import BEGAN, CALL, CURRENT

            self._clients = _clients(self.session, self.max_bytes)
            self._current, self._call, self._began = CURRENT, CALL, BEGAN
        self._module = module
        return module

    async def send(self, call: Call, provider: Provider, headers: dict[str, str]) -> web.StreamResponse:
        """Send `call` through litellm to `provider` and relay the answer; raises `Failure` to move on."""
        litellm = self._module or await self.warm()
        transport, client = self._clients[call.stream and call.purpose == "chat"]
        token = self._current.set(transport)  # the clients litellm builds itself send through it too
        marks = self._call.set(call)  # what its requests mark: delivered, answered
        try:
            return await _forward(litellm, client, call, provider, headers, self._began)
        finally:
            self._call.reset(marks)
            self._current.reset(token)


async def _forward(
    litellm: Any,
    client: Any,
    call: Call,
    provider: Provider,
    headers: dict[str, str],
    began: ContextVar[asyncio.Future[int] | None],
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
    call.upstream_status = None  # this attempt's: the bridge sets it once the vendor answers
    try:
        async with asyncio.timeout(limit):
            if call.purpose == "embeddings":
                result: Any = await litellm.aembedding(**params)
            elif call.purpose == "reranking":
                result = await litellm.arerank(**params)
            elif streaming:
                result = await litellm.acompletion(stream=True, drop_params=True, **params)
                first = await _began(result, began)
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
            _pass_back_refusal(exc, headers, reflected(key), call.said)
            return _client_error(exc, status, key, headers)
        if not _reached_upstream(exc):
            if call.upstream_status is None:
                # litellm failed on the request itself (a malformed `tools`, `messages` of another
                # shape: it reports them as a 500 "connection error"), before sending anything.
                raise NotTranslated(_first_cause(exc)) from None
            # the vendor answered: litellm could not read it (a field of another type)
            raise Failure(None, f"the upstream's answer could not be read ({_first_cause(exc)})") from None
        if not isinstance(status, int):
            raise Failure(None, type(exc).__name__) from None
        raise Failure.of_status(status, _asked_to_wait(exc)) from None
    call.first_byte_s = loop.time() - started
    shown = reflected(key)  # looked for in what the vendor sends back
    secret = shown.encode()
    _pass_back(result, headers, shown, call.said)
    if streaming:
        return await _relay_stream(call, result, first, headers, provider.idle_timeout_s, secret)
    call.usage = _usage(result)
    call.answer_model = _model(result, shown)
    headers["Content-Type"] = "application/json"
    # A client of another protocol gets its own shape from all of it (Anthropic's cache writes).
    shape = _CHAT_ANSWER if call.purpose == "chat" and call.translation is None else None
    body = masked(result.model_dump_json(exclude_none=True, include=shape).encode(), secret)
    return web.Response(body=body, headers=headers)


async def _began(stream: Any, began: ContextVar[asyncio.Future[int] | None]) -> asyncio.Future[Any]:
    """The read of `stream`'s first chunk, under way, once the vendor's answer began: the first
    bytes of its body came with a status under 300 (the bridge tells `began`, `bridge.BEGAN`).
    litellm gives no chunk until the vendor's first content (an Anthropic stream's
    `message_start` makes none), which a client need not wait for (docs/reference.md §14: the
    first byte of a translated stream follows the vendor's). What the read raises before
    (a refusal, a stream that ends with no byte) is the attempt's, to move on."""
    told: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    token = began.set(told)  # in the read's context (a copy of this one), for the bridge to tell
    try:
        first: asyncio.Future[Any] = asyncio.ensure_future(anext(stream))
    finally:
        began.reset(token)
    try:
        await asyncio.wait((first, told), return_when=asyncio.FIRST_COMPLETED)
        if not told.done() or told.result() >= 300:
            await asyncio.wait((first,))
            first.result()  # raises what the read raised
    except BaseException:
        first.cancel()
        raise
    return first


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,255}\Z")
"""The model names a client may ask a vendor behind litellm for (every vendor's fit): nothing
that reads as a path, a query or a fragment in a URL."""

"""The direct path: requests relayed to upstreams that speak OpenAI's HTTP API.

One pooled `aiohttp.ClientSession` per app (`open_session`) carries every upstream call.
The client's body goes out as the same bytes unless the provider renames the model
(`model_map`); the answer comes back as it arrives: a JSON answer is read whole (it is
needed whole for its `usage`, and one write is the fastest answer), an event stream is
relayed chunk by chunk as it is read. Nothing here imports litellm.

An attempt that fails in a way the next candidate may fix (no connection, a timeout, no
first byte within `first_byte_timeout_s`, 408, 429, 5xx) raises `Failure`, as long as
nothing has reached the client. Other answers are the client's, sent as they are.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from service.models import Provider
from service.secret import Secret

PROVIDER_HEADER = "x-switchboard-provider"
ATTEMPTS_HEADER = "x-switchboard-attempts"
ANTHROPIC_VERSION = "2023-06-01"

_USAGE = b'"usage"'
_DECODER = json.JSONDecoder()
_SSE = "text/event-stream"
_MAX_PENDING = 1 << 16


class Failure(Exception):
    """An attempt failed before anything reached the client; the next candidate may serve."""

    def __init__(self, status: int | None, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


def retryable(status: int) -> bool:
    """Statuses that move on to the next candidate (SPEC 7): 408, 429 and 5xx."""
    return status >= 500 or status in (408, 429)


@dataclass(frozen=True, slots=True)
class Target:
    """A provider made ready to receive requests: URL, headers and timeouts computed once."""

    id: str
    provider: Provider
    base: str
    headers: Mapping[str, str]
    timeout: aiohttp.ClientTimeout
    first_byte_s: float
    direct: bool

    @classmethod
    def of(cls, provider: Provider) -> Target:
        headers = {"Content-Type": "application/json"}
        key = provider.api_key
        if isinstance(key, Secret):
            headers["Authorization"] = f"Bearer {key.reveal()}"
        return cls(
            id=provider.id,
            provider=provider,
            base=provider.endpoint.rstrip("/"),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=provider.timeout_s),
            first_byte_s=provider.first_byte_timeout_s,
            direct=provider.speaks_openai,
        )

    def __repr__(self) -> str:  # the headers hold the key
        return f"Target({self.id!r})"

    def model_label(self, model: str | None) -> str:
        """The model as a metric label: as named only when the provider's config names it."""
        provider = self.provider
        if model is not None and (model in provider.models or model in provider.model_map):
            return model
        return "other"


class Call:
    """One client request being relayed: what every attempt needs, and what it learned."""

    __slots__ = (
        "body",
        "broken",
        "data",
        "first_byte_s",
        "model",
        "path",
        "purpose",
        "request",
        "stream",
        "usage",
    )

    def __init__(
        self, request: web.Request, purpose: str, path: str, body: bytes, data: dict[str, Any]
    ) -> None:
        self.request = request
        self.purpose = purpose
        self.path = path
        self.body = body
        self.data = data
        model = data.get("model")
        self.model: str | None = model if isinstance(model, str) else None
        self.stream = data.get("stream") is True
        self.usage: dict[str, Any] | None = None
        self.broken: str | None = None
        """Why a stream ended early, after its first byte reached the client."""
        self.first_byte_s = 0.0

    def body_for(self, target: Target) -> bytes:
        """The bytes to send `target`: the client's own, unless the provider renames the model."""
        model = self.model
        if model is None or model not in target.provider.model_map:
            return self.body
        data = {**self.data, "model": target.provider.model_map[model]}
        return json.dumps(data, ensure_ascii=False).encode()


def open_session() -> aiohttp.ClientSession:
    """The pooled client session for upstream calls (call inside a running loop)."""
    connector = aiohttp.TCPConnector(
        limit=1024, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60, enable_cleanup_closed=False
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
        trust_env=False,
    )


async def forward(
    session: aiohttp.ClientSession, call: Call, target: Target, headers: dict[str, str]
) -> web.StreamResponse:
    """Send `call` to `target` and relay its answer; raises `Failure` to move on."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    response: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout(target.first_byte_s):
            response = await session.post(
                target.base + call.path,
                data=call.body_for(target),
                headers=target.headers,
                timeout=target.timeout,
            )
            status = response.status
            if retryable(status):
                raise Failure(status, f"HTTP {status}")
            first = await response.content.readany()
    except TimeoutError as exc:
        _close(response)
        late = f"no first byte within {target.first_byte_s:g} s"
        raise Failure(None, _describe(exc) if isinstance(exc, aiohttp.ClientError) else late) from None
    except aiohttp.ClientError as exc:
        _close(response)
        raise Failure(None, _describe(exc)) from None
    except BaseException:
        _close(response)
        raise
    call.first_byte_s = loop.time() - started
    content_type = response.headers.get("Content-Type", "application/json")
    headers["Content-Type"] = content_type
    if call.stream and status < 300 and content_type.startswith(_SSE):
        return await _relay_stream(call, response, first, headers)
    try:
        body = first if response.content.at_eof() else first + await response.content.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        response.close()
        raise Failure(None, f"answer cut short: {_describe(exc)}") from None
    except BaseException:
        response.close()
        raise
    response.release()
    if status < 300:
        call.usage = find_usage(body)
    return web.Response(body=body, status=status, headers=headers)


async def _relay_stream(
    call: Call, upstream: aiohttp.ClientResponse, first: bytes, headers: dict[str, str]
) -> web.StreamResponse:
    headers["Cache-Control"] = "no-cache"
    answer = web.StreamResponse(status=upstream.status, headers=headers)
    usage: dict[str, Any] | None = None
    pending = b""
    chunk = first
    try:
        await answer.prepare(call.request)
        while chunk:
            window = pending + chunk  # `pending`: a torn event carried over, usually empty
            end = window.rfind(b"\n\n")
            if end >= 0 and _USAGE in window:
                usage = find_usage(window, end) or usage
            pending = window[end + 2 :] if end >= 0 else window
            if len(pending) > _MAX_PENDING:  # no event boundary in sight: stop looking
                pending = b""
            await answer.write(chunk)
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                call.broken = f"stream cut short: {_describe(exc)}"
                await answer.write(_error_event(call.broken))
                break
        await answer.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        upstream.close()  # the client left: drop the upstream connection too
        return answer
    except BaseException:
        upstream.close()
        raise
    upstream.release()
    call.usage = usage
    return answer


def _error_event(reason: str) -> bytes:
    """An SSE event the OpenAI SDKs raise as an APIError; the blank lines end any torn event."""
    error = {"error": {"type": "upstream_failed", "message": reason}}
    return b"\n\ndata: " + json.dumps(error).encode() + b"\n\n"


def find_usage(data: bytes, end: int | None = None) -> dict[str, Any] | None:
    """The last non-null `"usage": {...}` object in `data[:end]`, without decoding the rest."""
    stop = len(data) if end is None or end < 0 else end
    at = data.rfind(_USAGE, 0, stop)
    while at >= 0:
        colon = data.find(b":", at + len(_USAGE), stop)
        if colon > 0:
            text = data[colon + 1 : stop].decode("utf-8", "replace").lstrip()
            try:
                value, _ = _DECODER.raw_decode(text)
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
        stop = at
        at = data.rfind(_USAGE, 0, at)
    return None


def _close(response: aiohttp.ClientResponse | None) -> None:
    if response is not None:
        response.close()


def _describe(exc: BaseException) -> str:
    """A short reason for an attempt list: the kind of failure, never a URL's credentials or a key."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the upstream closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the upstream broke off its answer"
    return type(exc).__name__


# -- models endpoints (active checks, GET …/servers/{id}/models) ---------------------------


@dataclass(frozen=True, slots=True)
class ModelList:
    """What a provider's models endpoint said: the ids, or why there are none."""

    models: list[str] | None
    reason: str = ""
    retryable: bool = False
    status: int | None = None


def models_request(provider: Provider) -> tuple[str, dict[str, str]]:
    """The URL and headers that list a provider's models, in its vendor's protocol."""
    base = provider.endpoint.rstrip("/")
    key = provider.api_key.reveal() if isinstance(provider.api_key, Secret) else None
    vendor = getattr(provider, "provider", None)
    if provider.speaks_openai or vendor is None:
        return f"{base}/models", ({"Authorization": f"Bearer {key}"} if key else {})
    if vendor == "anthropic":
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        return f"{base}/v1/models", ({**headers, "x-api-key": key} if key else headers)
    if vendor == "gemini":
        return f"{base}/v1beta/models", ({"x-goog-api-key": key} if key else {})
    return f"{base}/v1/models", ({"Authorization": f"Bearer {key}"} if key else {})


async def list_models(provider: Provider, session: aiohttp.ClientSession) -> ModelList:
    """Ask the provider for its models; a failure is described, never raised."""
    url, headers = models_request(provider)
    timeout = aiohttp.ClientTimeout(total=min(provider.timeout_s, provider.first_byte_timeout_s))
    try:
        async with session.get(url, headers=headers, timeout=timeout) as response:
            if response.status >= 400:
                status = response.status
                return ModelList(None, f"HTTP {status}", retryable(status), status)
            payload = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return ModelList(None, _describe(exc), True)
    except ValueError:
        return ModelList(None, "the models endpoint did not answer JSON")
    return ModelList(_model_ids(payload))


def _model_ids(payload: Any) -> list[str]:
    items = payload.get("data", payload.get("models", [])) if isinstance(payload, dict) else payload
    ids = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            name = item.get("id", item.get("name"))
            if isinstance(name, str):
                ids.append(name.removeprefix("models/"))
        elif isinstance(item, str):
            ids.append(item)
    return ids

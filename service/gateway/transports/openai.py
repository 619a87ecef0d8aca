"""The direct path: requests relayed to upstreams that speak OpenAI's HTTP API.

One pooled `aiohttp.ClientSession` per app carries every upstream call. The client's body
goes out as the same bytes unless the provider renames the model (`model_map`); the URL and
headers come from the provider's file alone. The answer comes back as it arrives: a JSON
answer is read whole (it is needed whole for its `usage`, and one write is the fastest
answer), an event stream is relayed chunk by chunk as it is read. Nothing here imports
litellm.

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

from service.config.models import Provider
from service.config.secret import Secret
from service.gateway.call import Call, Failure, retryable
from service.gateway.transports.base import Transport, describe_error

_USAGE = b'"usage"'
_DECODER = json.JSONDecoder()
_SSE = "text/event-stream"
_MAX_PENDING = 1 << 16


@dataclass(frozen=True, slots=True)
class _Upstream:
    """A provider made ready to receive requests: URL, headers and timeouts computed once."""

    provider: Provider
    base: str
    headers: Mapping[str, str]
    timeout: aiohttp.ClientTimeout
    first_byte_s: float

    @classmethod
    def of(cls, provider: Provider) -> _Upstream:
        headers = {"Content-Type": "application/json"}
        key = provider.api_key
        if isinstance(key, Secret):
            headers["Authorization"] = f"Bearer {key.reveal()}"
        return cls(
            provider=provider,
            base=provider.endpoint.rstrip("/"),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=provider.timeout_s),
            first_byte_s=provider.first_byte_timeout_s,
        )

    def __repr__(self) -> str:  # the headers hold the key
        return f"_Upstream({self.provider.id!r})"


class OpenAITransport(Transport):
    """Forwards to providers that speak OpenAI's HTTP API, through one pooled session."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self._upstreams: dict[str, _Upstream] = {}
        """Provider id -> its prepared upstream, rebuilt when the provider object changes."""

    def upstream(self, provider: Provider) -> _Upstream:
        """The prepared URL, headers and timeouts of `provider` (built once per version of its file)."""
        found = self._upstreams.get(provider.id)
        if found is None or found.provider is not provider:
            found = self._upstreams[provider.id] = _Upstream.of(provider)
        return found

    async def send(self, call: Call, provider: Provider, headers: dict[str, str]) -> web.StreamResponse:
        """Send `call` to `provider` and relay its answer; raises `Failure` to move on."""
        target = self.upstream(provider)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(target.first_byte_s):
                response = await self.session.post(
                    target.base + call.path,
                    data=call.body_for(provider),
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
            raise Failure(
                None, describe_error(exc) if isinstance(exc, aiohttp.ClientError) else late
            ) from None
        except aiohttp.ClientError as exc:
            _close(response)
            raise Failure(None, describe_error(exc)) from None
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
            raise Failure(None, f"answer cut short: {describe_error(exc)}") from None
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
                call.broken = f"stream cut short: {describe_error(exc)}"
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

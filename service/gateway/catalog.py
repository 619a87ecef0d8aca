"""What models a provider says it serves: its models endpoint, in its vendor's protocol.

Used by the active health checks (a provider that lists its models answers, with its key),
by `GET …/servers/{id}/models`, and by `/v1/models` for providers that declare none. A
failure is described, never raised. A redirect is a failure, never followed: it would carry
the key (`x-api-key`, `x-goog-api-key`, which aiohttp keeps across hosts) to another host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from service.config.models import Provider
from service.config.secret import Secret
from service.gateway.call import redirect, retryable
from service.gateway.transports.base import TooLarge, describe_error, read_within, reflected, sendable_key

ANTHROPIC_VERSION = "2023-06-01"
MAX_MODELS_BYTES = 8 << 20
"""The largest models list read (OpenRouter's, the longest known, is about 1 MiB)."""


@dataclass(frozen=True, slots=True)
class ModelList:
    """What a provider's models endpoint said: the ids, or why there are none."""

    models: list[str] | None
    reason: str = ""
    retryable: bool = False
    status: int | None = None


def models_request(provider: Provider) -> tuple[str, dict[str, str]]:
    """The URL and headers that list a provider's models, in its vendor's protocol.

    Raises `ValueError` when the provider's key cannot be sent (`sendable_key`).
    """
    base = provider.endpoint.rstrip("/")
    key = sendable_key(provider)
    vendor = getattr(provider, "provider", None)
    if getattr(provider, "server_type", None) == "tei":  # TEI has no models list: its `/info` names the one
        return f"{base.removesuffix('/v1')}/info", ({"Authorization": f"Bearer {key}"} if key else {})
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
    try:
        url, headers = models_request(provider)
    except ValueError as exc:
        return ModelList(None, str(exc))
    # A models list is small and ready at once, like a stream's first byte: it gets as long.
    timeout = aiohttp.ClientTimeout(
        total=provider.first_byte_timeout_s, sock_connect=provider.connect_timeout_s
    )
    try:
        async with session.get(url, headers=headers, timeout=timeout, allow_redirects=False) as response:
            status = response.status
            if redirect(
                status
            ):  # never followed: the key would go to the host it names (docs/reference.md §7)
                return ModelList(None, f"HTTP {status}: a redirect, not followed", True, status)
            if status >= 400:
                return ModelList(None, f"HTTP {status}", retryable(status), status)
            body = await read_within(response, MAX_MODELS_BYTES)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return ModelList(None, describe_error(exc), True)
    except TooLarge as exc:
        return ModelList(None, f"models list {exc}")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past the stack
        return ModelList(None, "the models endpoint did not answer JSON")
    ids = _model_ids(payload)
    key = reflected(provider.api_key.reveal()) if isinstance(provider.api_key, Secret) else ""
    if key and any(key in name for name in ids):  # reflected: never a name `/v1/models` shows
        ids = [name for name in ids if key not in name]
    return ModelList(ids)


def _model_ids(payload: Any) -> list[str]:
    if isinstance(payload, dict) and isinstance(payload.get("model_id"), str):  # TEI's `/info`
        return [payload["model_id"]]
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

"""What litellm's exceptions mean for the litellm transport (`transports.litellm`): a request
the bridge refused, a failure of the upstream to fall back on, the vendor's refusal of the
client's request to pass back in OpenAI's error shape, or an error of litellm's own before
anything was sent. Its names are the transport's internals, `_`-prefixed as they were.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from service.gateway.transports.base import TooLarge, reflected, wait_ms
from service.gateway.transports.guard import RedirectRefused, refusal_of

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


def _asked_to_wait(exc: Exception) -> int | None:
    """What the vendor's `retry-after` on a failure litellm raised asks (ms), if it said."""
    raw = getattr(exc, "litellm_response_headers", None)
    if not isinstance(raw, Mapping):
        return None
    return wait_ms({str(key).lower(): str(value) for key, value in raw.items()})

"""What the Python client raises: one base, one class per status a caller handles apart."""

from __future__ import annotations

import aiohttp


class SwitchboardClientError(Exception):
    """Base of what the client raises; `status` is the HTTP status when there was one."""

    status: int | None = None

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(SwitchboardClientError):
    """400: the service cannot answer the call as asked."""

    status = 400


class ModelRequired(BadRequest, ValueError):
    """`litellm_params(purpose)` without a model, when the provider it would name declares no
    models: it serves any model, so only the caller can say which (`model=...`)."""


class Unauthorized(SwitchboardClientError):
    """401: no token, or a token the service does not know."""

    status = 401


class Forbidden(SwitchboardClientError):
    """403: the token lacks the scope this call needs."""

    status = 403


class NotFound(SwitchboardClientError):
    """404: no such purpose or provider, or no provider serves the model asked for."""

    status = 404


class Unavailable(SwitchboardClientError):
    """The service cannot be reached, is not ready, or has no copy to answer from yet."""


_BY_STATUS: dict[int, type[SwitchboardClientError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
}


async def raise_for(response: aiohttp.ClientResponse) -> None:
    """Raise what an error answer means (its JSON `error.message`, or the reason), if it is one."""
    if response.status < 400:
        return
    try:
        message = (await response.json())["error"]["message"]
    except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
        message = response.reason or f"HTTP {response.status}"
    kind = _BY_STATUS.get(response.status, Unavailable if response.status >= 500 else SwitchboardClientError)
    raise kind(str(message), response.status)

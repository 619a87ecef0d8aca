"""Request bodies: JSON read within limits, so no body can make the service answer 500."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from service.errors import BadRequest, PayloadTooLarge
from service.http.context import SETTINGS

JSON_TYPES = ("application/json", "application/merge-patch+json")
"""The media types a write may carry (SPEC 6: a page cannot forge one of these)."""


async def json_body(
    request: web.Request, *, types: tuple[str, ...] = JSON_TYPES, limit: int | None = None
) -> Any:
    """The body as JSON: 400 for another media type, invalid JSON or nesting too deep; 413 over
    `limit` bytes (at most the `max_body_bytes` setting)."""
    if request.content_type not in types:
        raise BadRequest(f"the body must be JSON (Content-Type: {' or '.join(types)})")
    limit = min(limit or request.app[SETTINGS].max_body_bytes, request.app[SETTINGS].max_body_bytes)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge.over(limit)
    data = await request.read()
    if len(data) > limit:
        raise PayloadTooLarge.over(limit)
    try:
        return json.loads(data, parse_constant=_not_json)
    except RecursionError:
        raise BadRequest("the body is JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None


def _not_json(name: str) -> Any:
    """`NaN`, `Infinity`: Python's json reads them, but they are not JSON (RFC 8259)."""
    raise ValueError(f"{name} is not JSON")

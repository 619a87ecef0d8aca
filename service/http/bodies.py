"""Request bodies: JSON read within limits, so no body can make the service answer 500; and
the shapes of the write routes' bodies, as `GET /openapi.json` describes them."""

from __future__ import annotations

import json
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from service.config.models import ProviderId, Purpose
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.http.context import SETTINGS

JSON_TYPES = ("application/json", "application/merge-patch+json")
"""The media types a write may carry (docs/reference.md §6: a page cannot forge one of these)."""


async def json_body(
    request: web.Request, *, types: tuple[str, ...] = JSON_TYPES, limit: int | None = None
) -> Any:
    """The body as JSON: 415 for another media type; 400 for invalid JSON or nesting too deep; 413
    over `limit` bytes (at most the `max_body_bytes` setting)."""
    if request.content_type not in types:
        raise UnsupportedMediaType(f"the body must be JSON (Content-Type: {' or '.join(types)})")
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


# -- what the write routes take (docs/reference.md §8), for `GET /openapi.json` ------------------------------
# The handlers read bodies as JSON and the writer validates them as `validate` would; these
# models only describe the bodies. Provider bodies are described from the file models instead
# (service/http/openapi.py), so a field added to a file is a field of its body at once.


class RouteBody(BaseModel):
    """`PUT …/active/{purpose}`: the purpose's primaries (one id or a list), weights, fallbacks."""

    model_config = ConfigDict(extra="forbid")

    primary: ProviderId | Annotated[list[ProviderId], Field(min_length=1)]
    weights: dict[ProviderId, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="a primary's share of requests (default 1)"
    )
    fallbacks: ProviderId | list[ProviderId] = Field(
        default_factory=list, description="tried in order once every primary failed"
    )


class ActiveForm(BaseModel):
    """`POST …/active`, the old design's form: one active provider (file ids) and its fallback."""

    model_config = ConfigDict(extra="forbid")

    purpose: Purpose
    provider_id: ProviderId
    fallback_provider_id: ProviderId | None = Field(
        None,
        description="the first fallback, before every fallback the route has (but this one and "
        "`provider_id`); left out, the route keeps the fallbacks it has",
    )


# -- what the gateway takes (docs/reference.md §7): only what it reads is described; the rest passes on ------


class _Passed(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Passed):
    role: str
    content: JsonValue = None


class ChatCompletionRequest(_Passed):
    """OpenAI's chat completion request; `stream: true` is answered with Server-Sent Events."""

    model: str = Field(description="the model; a provider's `model_map` may rename it")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False


class EmbeddingsRequest(_Passed):
    """OpenAI's embeddings request."""

    model: str = Field(description="the model; a provider's `model_map` may rename it")
    input: str | Annotated[list[str], Field(min_length=1)]


class RerankRequest(_Passed):
    """A rerank request, in the shape TEI, Infinity and vLLM serve."""

    model: str | None = Field(None, description="the model; a provider's `model_map` may rename it")
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=1)


class MessagesRequest(_Passed):
    """Anthropic's Messages request (docs/reference.md §14); `stream: true` is answered with
    Anthropic's events. The token may come as `x-api-key`."""

    model: str = Field(description="the model; a provider's `model_map` may rename it")
    messages: list[JsonValue]
    max_tokens: int | None = None
    stream: bool = False


class CountTokensRequest(_Passed):
    """Anthropic's token count request: a Messages request without `max_tokens`."""

    model: str = Field(description="the model; a provider's `model_map` may rename it")
    messages: list[JsonValue]


class ResponsesRequest(_Passed):
    """OpenAI's Responses request (docs/reference.md §14); `stream: true` is answered with
    Responses events."""

    model: str = Field(description="the model; a provider's `model_map` may rename it")
    input: JsonValue = Field(None, description="a string, or a list of items")
    previous_response_id: str | None = Field(
        None, description="continued on the provider that gave it, when it speaks Responses natively"
    )
    stream: bool = False


class CompletionRequest(_Passed):
    """A legacy completion request, to providers that speak legacy completions natively."""

    model: str = Field(description="the model; a provider's `model_map` may rename it")
    prompt: JsonValue
    stream: bool = False

"""The OpenAI-compatible gateway (`/v1/*`, docs/reference.md §7) as `GET /openapi.json` describes it.

The upstream's answer is passed on as it is, so its schema is open; what the gateway adds
(its headers, its own errors) is described with the parts of `service.http.operations`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from service.http import bodies, error_answers, gateway_answers
from service.http.operations import (
    GATEWAY_HEADERS,
    JSON,
    Operation,
    Schemas,
    body_errors,
    header,
    request,
    with_headers,
)

RETRY = {
    "Retry-After": header("seconds until the limit frees (none for a `total` budget)", required=False),
    "retry-after-ms": header("the same in milliseconds, sent exactly when `Retry-After` is", required=False),
}

_GATEWAY = (
    (
        "/v1/chat/completions",
        "chat",
        bodies.ChatCompletionRequest,
        {"model": "fake-model", "messages": [{"role": "user", "content": "Hello"}]},
    ),
    ("/v1/embeddings", "embeddings", bodies.EmbeddingsRequest, {"model": "fake-model", "input": ["Hello"]}),
    (
        "/v1/rerank",
        "reranking",
        bodies.RerankRequest,
        {"model": "fake-model", "query": "hello", "documents": ["hello there", "goodbye"], "top_n": 1},
    ),
    (
        "/v1/messages",
        "chat",
        bodies.MessagesRequest,
        {"model": "fake-model", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]},
    ),
    (
        "/v1/messages/count_tokens",
        "chat",
        bodies.CountTokensRequest,
        {"model": "fake-model", "messages": [{"role": "user", "content": "Hello"}]},
    ),
    ("/v1/responses", "chat", bodies.ResponsesRequest, {"model": "fake-model", "input": "Hello"}),
    ("/v1/completions", "chat", bodies.CompletionRequest, {"model": "fake-model", "prompt": "Hello"}),
)


_PROTOCOLS = ("/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/v1/completions")
"""The paths of the other protocols (docs/reference.md §14): errors in the protocol's own shape."""


def _messages_errors(s: Schemas) -> str:
    """The schema of an error on the Messages paths: Anthropic's shape."""
    s.answer("MessagesErrorAnswer", error_answers.MessagesErrorAnswer)
    return "MessagesErrorAnswer"


def gateway(s: Schemas) -> Iterable[Operation]:
    """`/v1/chat/completions`, `/v1/embeddings`, `/v1/rerank` and `/v1/models`."""
    passed_on = {
        "description": "the upstream's own client error, as it is",
        "content": {JSON: {"schema": {}}},
    }
    for path, purpose_, body, example in _GATEWAY:
        ok: dict[str, Any] = {"description": "the provider's answer", "content": {JSON: {"schema": {}}}}
        if purpose_ == "chat" and not path.endswith("count_tokens"):
            ok["content"]["text/event-stream"] = {
                "schema": s.answer("ServerSentEvent", gateway_answers.ServerSentEvent)
            }
        yield Operation(
            "POST",
            path,
            "completions",
            f"Sent to the `{purpose_}` route's candidates: primaries by weight, then fallbacks",
            {
                "200": ok,
                "4XX": passed_on,
                **body_errors(s),
                "502": s.returns(
                    error_answers.UpstreamsFailedAnswer, "every candidate failed; each attempt listed"
                ),
                "429": with_headers(
                    s.error(
                        "a limit of the client's refuses: `rate_limited` with `limit` (`rpm`, "
                        "`tpm`, `max_parallel`), or `budget_exceeded` with `period_end`; nothing was sent"
                    ),
                    RETRY,
                ),
                "404": s.error(
                    "`model_not_found` (also its `code`, as OpenAI answers): no enabled provider of the "
                    "route serves the model"
                    + (" over this protocol" if path in _PROTOCOLS else "")
                    + ", or the purpose has no route"
                ),
                "503": s.error(
                    "providers serve the model but every one is skipped now (circuits open, unhealthy, "
                    "out of budget, unpriced: `skipped` lists them), the configuration is not loaded, or "
                    "Redis is away with `SWITCHBOARD_LIMITS_WITHOUT_REDIS=refuse` (`limits_unavailable`)"
                ),
                "508": s.error("the request came back through this gateway: a `base_url` points at it"),
            },
            body=request(s.body(body.__name__, body), example),
            headers=GATEWAY_HEADERS,
            errors_as=_messages_errors(s) if path.startswith("/v1/messages") else None,
        )
    yield Operation(
        "GET",
        "/",
        None,
        "A probe of the base URL, as Claude Code sends one (docs/reference.md §14)",
        {"200": {"description": "the service is there", "content": {JSON: {"schema": {"type": "object"}}}}},
    )
    yield Operation(
        "GET",
        "/v1/models",
        "completions",
        "The models of the enabled providers",
        {"200": s.returns(gateway_answers.ModelsAnswer, "OpenAI's model list")},
        headers=GATEWAY_HEADERS,
    )

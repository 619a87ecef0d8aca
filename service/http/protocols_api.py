"""The gateway in the client protocols besides Chat Completions (docs/reference.md §14).

    POST /v1/messages                 Anthropic Messages                        completions
    POST /v1/messages/count_tokens    its token count (a local estimate where
                                      no provider speaks Messages natively)     completions
    POST /v1/responses                OpenAI Responses                          completions
    POST /v1/completions              legacy completions                        completions
    GET|HEAD /                        a probe, as clients send one              no token

Each is a `Call` in its protocol, through the same relay as chat: routing (purpose `chat`),
fallback, health, metering. The token may come as `x-api-key` (service/http/auth.py); query
parameters (`?beta=true`) are ignored; errors come in the protocol's shape, with the statuses
of docs/reference.md §6.4.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from service.errors import HTTPError, InvalidRequest
from service.gateway.account import COST
from service.gateway.call import ATTEMPTS_HEADER, PROVIDER_HEADER, Call
from service.gateway.forms import PATHS
from service.gateway.protocols import messages
from service.gateway.relay import NO_PROVIDER
from service.http.auth import Handler, scoped
from service.http.context import REGISTRY, RELAY
from service.http.openai_api import (
    CallOf,
    Endpoint,
    add_endpoint,
    answering,
    call_of,
    read_call,
    say_what_remains,
)


def setup(app: web.Application) -> None:
    """Add the protocols' routes."""
    add_endpoint(app, "/v1/messages", Endpoint(_called("messages"), _messages_shape))
    counting = answering(scoped("completions")(_count_tokens), _messages_shape)
    app.router.add_post("/v1/messages/count_tokens", _saying_what_remains(counting))
    add_endpoint(app, "/v1/responses", Endpoint(_called("responses")))
    add_endpoint(app, "/v1/completions", Endpoint(_called("completions")))
    app.router.add_get("/", _root)  # HEAD too: clients probe the base URL, with no token


def _messages_shape(exc: HTTPError) -> dict[str, Any]:
    """Anthropic's error shape, keeping what ours adds (attempts, limits...) beside the message."""
    extra = {k: v for k, v in exc.body()["error"].items() if k not in ("type", "message")}
    return messages.error(exc.status, exc.message, **extra)


def _called(protocol: str) -> CallOf:
    path = PATHS[protocol]

    def called(request: web.Request, body: bytes) -> Call:
        call = call_of(request, body, "chat", path, protocol)
        data = call.client_data
        if protocol == "messages" and not isinstance(data.get("messages"), list):
            raise InvalidRequest("messages: an array of messages is required", param="messages")
        if protocol == "completions" and "prompt" not in data:
            raise InvalidRequest("prompt: a prompt is required", param="prompt")
        if protocol == "responses" and data.get("conversation") is not None:
            # A vendor's stored conversation, by id: Switchboard keeps none, and would not send
            # one client's to another's account.
            raise InvalidRequest("conversation: Switchboard keeps no conversation", param="conversation")
        if protocol == "responses" and data.get("previous_response_id") is not None:
            previous = data["previous_response_id"]
            if not isinstance(previous, str):
                raise InvalidRequest("previous_response_id must be a string", param="previous_response_id")
            call.pinned = previous
        return call

    return called


def _saying_what_remains(handler: Handler) -> Handler:
    """A token count is not metered (no completion: nothing counted or charged); its answer,
    served or refused, says what remains of a limited client's limits all the same, and that it
    cost nothing (`x-switchboard-cost-usd: 0`, as every answer not streamed says its cost)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        say_what_remains(request, response)
        if not response.prepared:
            response.headers.setdefault(COST, "0")
        return response

    return answer


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    """To a provider that speaks Messages natively; otherwise a local estimate
    (docs/reference.md §14, `messages.estimated_for`)."""
    call = await read_call(request, "chat", PATHS["count_tokens"], "count_tokens")
    try:
        return await request.app[RELAY].relay(call, request.app[REGISTRY].snapshot)
    except HTTPError as exc:
        if not messages.estimated_for(exc):
            raise
        tried = len(exc.extra.get("attempts", ()))
    headers = {PROVIDER_HEADER: NO_PROVIDER, ATTEMPTS_HEADER: str(tried)}
    return web.json_response(
        {"input_tokens": messages.estimate_tokens(len(call.client_body))}, headers=headers
    )


async def _root(request: web.Request) -> web.Response:
    return web.json_response({"service": "switchboard"})

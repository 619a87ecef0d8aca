"""The OpenAI-compatible face of the gateway (docs/reference.md §6, §7).

    POST /v1/chat/completions, /v1/embeddings, /v1/rerank; GET /v1/models     completions

A request is parsed once (for `model` and `stream`) and handed to the `Relay`, which reads
`registry.snapshot` once and tries the candidates in turn. Errors carry the gateway's
headers like every other answer. Events (health transitions) are written by a background
task, never by a request.

The cleanup context (`relay_lifecycle`) opens the pooled client session and the relay, runs
the active health checks and the event writer, and closes them on shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from service.config.models import Scope
from service.errors import BadRequest, HTTPError, InvalidRequest, LoopDetected, PayloadTooLarge
from service.gateway.account import COST, REQUEST_ID
from service.gateway.call import ATTEMPTS_HEADER, PROVIDER_HEADER, VIA_HEADER, Call, came_back
from service.gateway.relay import NO_PROVIDER, NOSNIFF_HEADER
from service.http import relay_lifecycle
from service.http.auth import CLIENT, Handler, client_name, scoped
from service.http.context import (
    HEALTH_EVENTS,
    REGISTRY,
    RELAY,
    SETTINGS,
)

log = logging.getLogger(__name__)


def setup(app: web.Application) -> None:
    """Add the gateway's routes and its cleanup context to the app."""
    app[HEALTH_EVENTS] = asyncio.Queue()
    add_endpoint(app, "/v1/chat/completions", Endpoint(_called("chat", "/chat/completions")))
    add_endpoint(app, "/v1/embeddings", Endpoint(_called("embeddings", "/embeddings")))
    add_endpoint(app, "/v1/rerank", Endpoint(_called("reranking", "/rerank")))
    app.router.add_get("/v1/models", answering(scoped("completions")(_models)))
    app.cleanup_ctx.append(relay_lifecycle.lifecycle)


# -- /v1/* ---------------------------------------------------------------------------------


ErrorShape = Callable[[HTTPError], dict[str, Any]]
"""An error's body in a client protocol's shape."""


def _openai_shape(exc: HTTPError) -> dict[str, Any]:
    return exc.body()


CallOf = Callable[[web.Request, bytes], Call]
"""A request and its body as a `Call`, checked; raises HTTPError (400...) for one refused."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A gateway route as its parts: who may call it (`scope`), how its body becomes a `Call` to
    relay (`call`), and the shape of its errors. `add_endpoint` gives the router a handler made
    of them (`answering`, `scoped`, the relay); `gateway.Gateway` runs the same parts in one
    coroutine, for the same answers."""

    call: CallOf
    shape: ErrorShape = _openai_shape
    scope: Scope = "completions"


ENDPOINTS = web.AppKey("endpoints", dict[Handler, Endpoint])
"""The `Endpoint`s of the app's routes, by the handler `add_endpoint` gave the router."""


def add_endpoint(app: web.Application, path: str, endpoint: Endpoint) -> None:
    """`POST path`, answered by relaying what `endpoint` makes of the request."""
    handler = answering(scoped(endpoint.scope)(_relaying(endpoint.call)), endpoint.shape)
    app.router.add_post(path, handler)
    if ENDPOINTS not in app:
        app[ENDPOINTS] = {}
    app[ENDPOINTS][handler] = endpoint


def _relaying(call_of: CallOf) -> Handler:
    async def relay(request: web.Request) -> web.StreamResponse:
        call = call_of(request, await read_body(request))
        return await request.app[RELAY].relay(call, request.app[REGISTRY].snapshot)

    return relay


def answering(handler: Handler, shape: ErrorShape = _openai_shape) -> Handler:
    """Errors as JSON in the protocol's `shape` (by default the one of docs/reference.md §6.4),
    carrying the gateway's headers like every other answer."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except HTTPError as exc:
            return error_answer(exc, shape)
        except web.HTTPRequestEntityTooLarge:
            return error_answer(PayloadTooLarge.over(request.app[SETTINGS].max_body_bytes), shape)
        except web.RequestPayloadError as exc:
            return error_answer(unreadable(exc), shape)
        except web.HTTPException:
            raise  # the server's own (a redirect, a 405): the middleware answers it
        except Exception:
            return error_answer(internal(request, _route(request)), shape)
        if not response.prepared and REQUEST_ID not in response.headers:  # every gateway answer
            response.headers[REQUEST_ID] = uuid.uuid4().hex
        return response

    return answer


def unreadable(exc: web.RequestPayloadError) -> BadRequest:
    """The 400 for a body the server could not decode (gzip that is not), naming only the fault."""
    reason = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    return BadRequest(f"the body could not be read: {type(reason).__name__}")


def say_what_remains(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer to a client with limits says what remains (docs/reference.md §13): to one not
    counted (refused before its limits were asked, a token count), what is known, nothing counted."""
    client = request.get(CLIENT)
    meter = request.app[RELAY].meter
    if client is not None and client.limits is not None and meter is not None and not response.prepared:
        for header, value in meter.remaining(client.name, client.limits).items():
            response.headers.setdefault(header, value)


INTERNAL = "internal error; see the service log"
"""All a 500 says (docs/reference.md §6.4): a bug's detail is in the log, never in an answer."""


def internal(request: web.Request, route: str) -> HTTPError:
    """A bug on `route` (an exception no handler meant): logged with its traceback, so called
    where it is caught; the 500 `internal_error` that says nothing more."""
    log.exception("unhandled error on %s %s", request.method, route)
    return HTTPError(INTERNAL)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def error_answer(exc: HTTPError, shape: ErrorShape = _openai_shape) -> web.Response:
    """`exc` as a gateway's answer: in `shape`, with the provider (`none`), attempts, request id
    and cost (`0`: an error costs nothing, docs/reference.md §13.3) headers."""
    attempts = exc.extra.get("attempts")
    count = len(attempts) if isinstance(attempts, list) else 0
    headers = {
        PROVIDER_HEADER: NO_PROVIDER,
        ATTEMPTS_HEADER: str(count),
        NOSNIFF_HEADER: "nosniff",
        **exc.headers(),
    }
    headers.setdefault(REQUEST_ID, uuid.uuid4().hex)  # every gateway answer has one (docs/reference.md §13)
    headers.setdefault(COST, "0")
    return web.json_response(shape(exc), status=exc.status, headers=headers)


_AMBIGUOUS = (
    "the body has names that differ only in case (`model` and `MODEL`): an upstream that reads "
    "names without case (Go's) could take another field than the one the gateway routed and priced"
)


def _ambiguous(names: dict[str, Any]) -> bool:
    """Some of `names` differ only in case (`casefold`: Go's simple folding and a little more)."""
    return len({name.casefold() for name in names}) < len(names)


async def read_call(request: web.Request, purpose: str, path: str, protocol: str = "chat") -> Call:
    """The request as a `Call`: its body read within limits and parsed once, as a JSON object
    whose `model`, if any, is a string; 508 for a request that came back to this gateway."""
    return call_of(request, await read_body(request), purpose, path, protocol)


async def read_body(request: web.Request) -> bytes:
    """The request's body within limits: taken at once when it came whole (`arrived`), else read."""
    body = arrived(request)
    return body if body is not None else await request.read()


def arrived(request: web.Request) -> bytes | None:
    """The request's body when the whole of it came with the head (as a request's usually does),
    None when it is still to be read (`request.read()`, within the app's `client_max_size`);
    508 for a request that came back to this gateway, 413 for one past the limit."""
    app = request.app
    if came_back(request.headers.get(VIA_HEADER), app[RELAY].via):
        raise LoopDetected(
            "the request came back to the gateway that forwarded it: a provider's base_url "
            "points at this service (or at one that forwards to it)"
        )
    limit = app[SETTINGS].max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge.over(limit)
    content = request.content
    if not content.is_eof():
        return None
    body = content.read_nowait()
    if len(body) > limit:  # decoded (`Content-Encoding`) past the limit
        raise PayloadTooLarge.over(limit)
    return body


def call_of(request: web.Request, body: bytes, purpose: str, path: str, protocol: str = "chat") -> Call:
    """The request and its `body` as a `Call`: the body parsed once, as a JSON object whose
    `model` is a string (there may be none for embeddings and rerank, as TEI's clients send
    them) and `stream`, if any, a boolean (400 otherwise)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise BadRequest("the body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("the body is JSON nested too deep") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    if not isinstance(data.get("model", ""), str):
        raise BadRequest("`model` must be a string")
    if purpose == "chat" and "model" not in data:  # embeddings and rerank may leave it to the server
        raise BadRequest("`model` is required: a string")
    if not isinstance(data.get("stream", False), bool | None):  # "yes" would stream upstream, unseen
        raise InvalidRequest("`stream` must be a boolean (true or false)", param="stream")
    if _ambiguous(data):
        raise BadRequest(_AMBIGUOUS)
    options = data.get("stream_options")  # its `include_usage`, set to count a stream, must be the one read
    if isinstance(options, dict) and _ambiguous(options):
        raise BadRequest(_AMBIGUOUS)
    return Call(request, purpose, path, body, data, client_name(request), protocol)


def _called(purpose: str, path: str) -> CallOf:
    return functools.partial(call_of, purpose=purpose, path=path)


async def _models(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    table = relay.router.table(request.app[REGISTRY].snapshot)
    headers = {
        PROVIDER_HEADER: NO_PROVIDER,
        ATTEMPTS_HEADER: "0",
        REQUEST_ID: uuid.uuid4().hex,
        COST: "0",
        "Content-Type": "application/json",
    }
    response = web.Response(body=table.models_answer(relay.health), headers=headers)
    say_what_remains(request, response)  # a listing is no completion: nothing counted
    return response

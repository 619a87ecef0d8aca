"""The gateway's routes taken before aiohttp's router: `Gateway`, the request handler that
`create_app` installs in front of the router's, and `GATEWAY`, where the app keeps it.
"""

from __future__ import annotations

import time
import uuid

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import PlainResource, UrlMappingMatchInfo

from service.errors import HTTPError, PayloadTooLarge
from service.gateway.account import REQUEST_ID
from service.gateway.call import Call
from service.gateway.relay import NOSNIFF_HEADER
from service.http import connections
from service.http.auth import Handler, admit
from service.http.context import METRICS, REGISTRY, RELAY, SETTINGS
from service.http.middleware import answered, failure_answer, nosniff
from service.http.openai_api import (
    ENDPOINTS,
    Endpoint,
    arrived,
    error_answer,
    internal,
    say_what_remains,
    unreadable,
)

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
"""The app's `Gateway`, for the fast path's server (`service.http.fast`)."""


class Gateway:
    """The gateway's routes (`POST /v1/...`) taken before the router: the request handler
    aiohttp calls first (`Application._handle`), in front of the router's.

    Every request pays the router's walk and a frame per middleware; the gateway's requests are
    the service's hot path and go to a handful of fixed paths. Those are looked up here in a
    dict, by the same key the router matches (`rel_url.path_safe`) and the method, with the
    match the router would have made: the same answer, metrics and `on_response_prepare`.
    Anything else, and a request with `Expect` (the router's expect handler), goes the usual way.

    A route added as an `Endpoint` (`openai_api.add_endpoint`) runs here as one coroutine down
    to the relay's: what the `answer_errors` middleware, `answering`, `scoped` and the relaying
    handler do, in their order. Every wait of a request (the upstream's answer, at least) is
    passed through each coroutine above the one that waits: four fewer here. Any other route
    goes through `answered`, as the middleware sends it.

    An endpoint's answers carry `nosniff` from where they are made (the relay's headers, the
    error answers): while `nosniff` is all `on_response_prepare` holds, they are not sent
    through it. Their match then has the app as its current app (`request.app`) but in no list
    of apps, which is where aiohttp finds the signals to send; an app given another receiver
    sends it every answer, these too.

    The gateway's own server (`service.http.fast`) runs an endpoint's request through the same
    parts, `called` then `relayed` (or `refused`), when no signal needs its answers (`fast`).
    """

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.metrics = app[METRICS]
        self.max_body_bytes = app[SETTINGS].max_body_bytes
        self.send_timeout_s = app[SETTINGS].send_timeout_s
        self.receive_timeout_s = app[SETTINGS].receive_timeout_s
        endpoints = app.get(ENDPOINTS, {})
        self.routes: dict[tuple[str, str], tuple[Handler, UrlMappingMatchInfo, str, Endpoint | None]] = {}
        for resource in app.router.resources():
            if isinstance(resource, PlainResource) and resource.canonical.startswith("/v1/"):
                for route in resource:
                    key = (route.method, resource.canonical)
                    # The first registered wins, as routing does. One frozen match a route, shared
                    # by its requests: nothing changes a frozen match (its apps are fixed, and
                    # sub-applications are not on this path).
                    if route.method == hdrs.METH_POST and key not in self.routes:
                        match = UrlMappingMatchInfo({}, route)
                        match.add_app(app)
                        match.freeze()
                        endpoint = endpoints.get(route.handler)
                        self.routes[key] = (route.handler, match, resource.canonical, endpoint)
        self.usual = app._handle
        self.unsettled = True
        """Until the first request: the app's signals are final only once it is frozen."""
        self.bare = False
        """The endpoints' matches are in no app's list: their answers are sent through no signal."""

    def install(self) -> None:
        # aiohttp's server calls `app._handle` for every request (`Application._make_handler`)
        object.__setattr__(self.app, "_handle", self.handle)
        # aiohttp's connections: the send and receive timeouts
        connections.install(self.app, self.send_timeout_s, self.receive_timeout_s, self.metrics.cuts)
        self.app[GATEWAY] = self

    def _settle(self) -> None:
        """Give the endpoints matches in no app's list (see above) if `on_response_prepare`
        holds nothing but `nosniff`, which their answers do without."""
        self.unsettled = False
        if any(receiver is not nosniff for receiver in self.app.on_response_prepare):
            return
        for key, (handler, match, name, endpoint) in self.routes.items():
            if endpoint is not None:
                bare = UrlMappingMatchInfo({}, match.route)
                try:
                    bare.current_app = self.app
                except RuntimeError:  # aiohttp's debug mode checks it is one of the match's apps
                    return
                bare.freeze()
                self.routes[key] = (handler, bare, name, endpoint)
        self.bare = True

    def fast(self) -> bool:
        """Whether the endpoints' answers may be written without aiohttp (`service.http.fast`):
        the app is frozen, and its `on_response_prepare` holds nothing they need."""
        if self.unsettled:
            self._settle()
        return self.bare

    def endpoints(self) -> dict[str, tuple[str, UrlMappingMatchInfo, Endpoint]]:
        """The endpoints' paths (`POST`), each with its route's name, its match and its `Endpoint`."""
        return {
            path: (name, match, endpoint)
            for (method, path), (_, match, name, endpoint) in self.routes.items()
            if method == hdrs.METH_POST and endpoint is not None
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.unsettled:
            self._settle()
        found = self.routes.get((request.method, request.rel_url.path_safe))
        if found is None or request.headers.get(hdrs.EXPECT):
            try:
                return await self.usual(request)
            except web.HTTPException as exc:  # the router's expect handler (417), before any middleware
                return failure_answer(request, exc, "unmatched")
        handler, match, name, endpoint = found
        request._match_info = match
        if endpoint is None:
            return await answered(request, handler, name, self.metrics)
        started = time.perf_counter()
        try:  # `answering`, `scoped`, then the relaying handler
            admit(request, endpoint.scope)
            body = arrived(request)
            if body is None:
                body = await request.read()
            call = endpoint.call(request, body)
        except Exception as exc:
            return self.refused(request, name, endpoint, exc, started)
        return await self.relayed(request, name, endpoint, call, started)

    def called(self, request: web.Request, endpoint: Endpoint) -> Call:
        """A request whose body came whole as the `Call` to relay; raises what `handle` answers.
        Nothing happens here that a request handed to aiohttp after it would feel."""
        admit(request, endpoint.scope)
        body = arrived(request)
        if body is None:
            raise RuntimeError("the body is not whole")
        return endpoint.call(request, body)

    def refused(
        self, request: web.Request, name: str, endpoint: Endpoint, exc: Exception, started: float
    ) -> web.StreamResponse:
        """The answer to `exc`, raised before the relay (`called`), counted."""
        try:
            response = self._answer(request, name, endpoint, exc)
        except Exception as failed:
            response = failure_answer(request, failed, name)
            response.headers[NOSNIFF_HEADER] = "nosniff"
        self.metrics.answered(name, request.method, response.status, time.perf_counter() - started)
        return response

    async def relayed(
        self, request: web.Request, name: str, endpoint: Endpoint, call: Call, started: float
    ) -> web.StreamResponse:
        """`call` relayed: the answer (`answering`'s), counted as `answered` counts it."""
        try:
            try:
                app = self.app
                response = await app[RELAY].relay(call, app[REGISTRY].snapshot)
            except Exception as exc:
                response = self._answer(request, name, endpoint, exc)
            else:
                if not response.prepared and REQUEST_ID not in response.headers:  # every gateway answer
                    response.headers[REQUEST_ID] = uuid.uuid4().hex
        except Exception as exc:
            response = failure_answer(request, exc, name)
            response.headers[NOSNIFF_HEADER] = "nosniff"
        self.metrics.answered(name, request.method, response.status, time.perf_counter() - started)
        return response

    def _answer(self, request: web.Request, name: str, endpoint: Endpoint, exc: Exception) -> web.Response:
        """What `answering` makes of `exc`; a `web.HTTPException` is raised again, for `failure_answer`."""
        error: HTTPError
        if isinstance(exc, HTTPError):
            error = exc
        elif isinstance(exc, web.HTTPRequestEntityTooLarge):
            error = PayloadTooLarge.over(self.max_body_bytes)
        elif isinstance(exc, web.RequestPayloadError):
            error = unreadable(exc)
        elif isinstance(exc, web.HTTPException):
            raise exc
        else:
            error = internal(request, name)
        response = error_answer(error, endpoint.shape)
        say_what_remains(request, response)  # one refused before the limits were asked too
        return response

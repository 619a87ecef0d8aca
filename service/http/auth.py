"""Bearer tokens and scopes, from the clients file (docs/reference.md §2.3, §6).

A clients file is any file of `kind: clients`, whatever its name. With none the service
runs without authentication, and then it only ever listens on loopback: `serve` refuses
another address. Once a clients file has been seen, good or refused, authentication stays
on until the process ends: a broken one keeps the last good clients, a removed one too
(the registry keeps them), and before any good one every protected endpoint answers 503.
A service bound elsewhere than loopback without clients answers 503 as well: it fails
closed.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from service.config.models import Client, Clients, Scope
from service.crypto.tokens import token_sha256
from service.errors import (
    Forbidden,
    MisdirectedRequest,
    NotReady,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from service.http.bodies import JSON_TYPES
from service.http.context import REGISTRY, SETTINGS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT = web.RequestKey("client", Client)
SCOPE = web.RequestKey("scope", str)
"""The scope the handler was guarded with, checked again after a held query's wait."""


@functools.lru_cache(maxsize=16)  # asked on every request without a clients file
def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authenticate(request: web.Request, scope: Scope | None) -> Client | None:
    """The client calling, checked for `scope` (None: any valid token); None without auth."""
    state = request.app[REGISTRY].state
    if not state.ready:  # before the first load, "no clients" would mean "no auth"
        raise NotReady("the configuration, and with it the clients file, is not loaded yet")
    clients = state.snapshot.clients
    if clients is None:
        if not state.auth_required and is_loopback(request.app[SETTINGS].host):
            _same_machine_only(request)
            return None
        raise NotReady("authentication is required but no valid clients file is loaded (see /readyz)")
    token = _token(request)
    if token is None:
        raise Unauthorized("missing bearer token (Authorization: Bearer TOKEN)")
    found = request.app[KNOWN_TOKENS].client(clients, token)
    if found is None:
        raise Unauthorized("unknown token", invalid_token=True)
    if scope is not None and scope not in found.scopes:
        raise Forbidden(f"client {found.name!r} lacks the scope {scope!r}")
    return found


class KnownTokens:
    """The clients already found by their token, for one clients file (its `Clients`, by
    identity): a token seen before is not hashed again (its sha256 was ~1 % of the event loop's
    work per request). The app's own (`KNOWN_TOKENS`), a cache that no request can grow: only a token that
    is a client's is kept, so it holds at most one per client of the file, and a change of the
    file (a new `Clients`) starts it afresh: a revoked token stops working at once."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[Clients | None, dict[str, Client]] = (None, {})

    def client(self, clients: Clients, token: str) -> Client | None:
        """The client whose token `token` is; None: no client's."""
        last = self._last
        if last[0] is not clients:
            last = self._last = (clients, {})
        found = last[1].get(token)  # a dict compares a token only with one of the same keyed hash
        if found is None:
            found = _client_of(clients, token)
            if found is not None:
                last[1][token] = found
        return found


def _client_of(clients: Clients, token: str) -> Client | None:
    """The client whose token's hash is `token`'s, every hash compared in constant time each."""
    try:
        digest = token_sha256(token)
    except UnicodeEncodeError:  # header bytes that are no UTF-8 (lone surrogates): no client's token
        return None
    found = None
    for client in clients.clients:
        if hmac.compare_digest(client.token_sha256, digest):
            found = client
    return found


KNOWN_TOKENS = web.AppKey("known_tokens", KnownTokens)
"""The app's `KnownTokens` (set by `create_app`)."""


def _token(request: web.Request) -> str | None:
    """The caller's token: `Authorization: Bearer`, or `x-api-key` as Anthropic's SDKs and Claude
    Code send it (docs/reference.md §14)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None


STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _same_machine_only(request: web.Request) -> None:
    """Without authentication, only what a program on this machine sends (docs/reference.md §6).

    A web page can make a browser send requests to 127.0.0.1, by DNS rebinding (a name of its
    own that resolves to 127.0.0.1: the `Host` is then not a loopback name, 421) or by a form
    or a no-cors `fetch`. Those can only POST, with no media type or a form's: a state-changing
    request must carry a JSON media type (415 otherwise, body or not), which a page cannot set
    without a CORS preflight that this service never answers. PUT, PATCH and DELETE need that
    preflight anyway; they are held to the same rule so that the rule reads as one.
    """
    if not _loopback_name(request.host):
        raise _misdirected(request)
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge.over(limit)  # what it is first: too large, whatever its type
    if request.method in STATE_CHANGING and not _json_typed(request):
        raise UnsupportedMediaType(
            "without authentication a state-changing request must carry a JSON media type "
            "(Content-Type: application/json), body or not"
        )


def same_machine(request: web.Request) -> None:
    """421 for a `Host` that is no loopback name while the service runs without authentication,
    whatever the endpoint (docs/reference.md §6): a page reaching it by DNS rebinding reads no
    answer, the public ones (`/readyz`, `/metrics`, the console) included. Before the first
    load, which mode it runs in is not known yet: such a `Host` is refused then too."""
    if _loopback_name(request.host):
        return
    state = request.app[REGISTRY].state
    if state.ready and (state.auth_required or state.snapshot.clients is not None):
        return
    if is_loopback(request.app[SETTINGS].host):  # elsewhere it runs with clients or answers 503
        raise _misdirected(request)


def _misdirected(request: web.Request) -> MisdirectedRequest:
    return MisdirectedRequest(
        f"without authentication only loopback names are served (Host: {request.host[:100]!r}); "
        "use http://127.0.0.1 or http://localhost, or set up a clients file"
    )


def _typed(request: web.Request) -> None:
    """A body is JSON (docs/reference.md §6), whatever the method (a `GET` may carry one, which
    no handler reads): 415 for any other media type, or none."""
    if request.body_exists and not _json_typed(request):
        raise UnsupportedMediaType(
            f"the body must be JSON (Content-Type: {' or '.join(JSON_TYPES)}), "
            f"not {request.content_type[:100]!r}"
        )


def _json_typed(request: web.Request) -> bool:
    """Whether the request's media type is a JSON one. The header as every client sends it
    (`application/json`) is taken as it is; anything else is parsed (`; charset=utf-8`, case)."""
    return request.headers.get(hdrs.CONTENT_TYPE) in JSON_TYPES or request.content_type in JSON_TYPES


def _loopback_name(host: str) -> bool:
    """Whether a `Host` header names this machine: `localhost` (`*.localhost`) or a loopback address."""
    if host.startswith("["):  # [::1]:8080
        name = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:  # 127.0.0.1:8080, localhost:8080
        name = host.split(":", 1)[0]
    else:  # no port, or a bare IPv6 address
        name = host
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


def scoped(scope: Scope) -> Callable[[Handler], Handler]:
    """A handler that runs only for a client with `scope`; the client is at `request[CLIENT]`."""
    return _guarded(scope)


def authenticated(handler: Handler) -> Handler:
    """A handler that runs for any valid token (no scope needed); the client is at `request[CLIENT]`."""
    return _guarded(None)(handler)


def _guarded(scope: Scope | None) -> Callable[[Handler], Handler]:
    """The handler behind `authenticate(request, scope)`, with the client kept on the request."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            admit(request, scope)
            return await handler(request)

        return guarded

    return decorate


def admit(request: web.Request, scope: Scope | None) -> None:
    """`authenticate(request, scope)`, then a body's media type (415 for one not JSON); the client
    is kept at `request[CLIENT]`, and the scope at `request[SCOPE]`."""
    client = authenticate(request, scope)
    if client is not None:  # known before the media type is judged: a 415 is the client's too
        request[CLIENT] = client
        if scope is not None:
            request[SCOPE] = scope
    _typed(request)


def authenticate_again(request: web.Request) -> None:
    """Check the caller once more: a request that waited (a blocking query) may have outlived
    its token, or the scope it was let in with (401 or 403 then, as a new request gets)."""
    if request.get(CLIENT) is not None:
        authenticate(request, request.get(SCOPE))


def client_name(request: web.Request) -> str:
    """The calling client's name, or `anonymous` without auth."""
    client = request.get(CLIENT)
    return client.name if client is not None else "anonymous"

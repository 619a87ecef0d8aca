"""Bearer tokens and scopes, from the clients file (SPEC 2.3 and 6).

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

from aiohttp import web

from service.config.models import Client, Scope
from service.crypto.tokens import token_sha256
from service.errors import Forbidden, NotReady, Unauthorized
from service.http.context import REGISTRY, SETTINGS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT = web.RequestKey("client", Client)


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
            return None
        raise NotReady("authentication is required but no valid clients file is loaded (see /readyz)")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer TOKEN)")
    digest = token_sha256(token.strip())
    found = None
    for client in clients.clients:  # every hash compared, in constant time each
        if hmac.compare_digest(client.token_sha256, digest):
            found = client
    if found is None:
        raise Unauthorized("unknown token")
    if scope is not None and scope not in found.scopes:
        raise Forbidden(f"client {found.name!r} lacks the scope {scope!r}")
    return found


def scoped(scope: Scope) -> Callable[[Handler], Handler]:
    """A handler that runs only for a client with `scope`; the client is at `request[CLIENT]`."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            client = authenticate(request, scope)
            if client is not None:
                request[CLIENT] = client
            return await handler(request)

        return guarded

    return decorate


def authenticated(handler: Handler) -> Handler:
    """A handler that runs for any valid token (no scope needed); the client is at `request[CLIENT]`."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        client = authenticate(request, None)
        if client is not None:
            request[CLIENT] = client
        return await handler(request)

    return guarded


def client_name(request: web.Request) -> str:
    """The calling client's name, or `anonymous` without auth."""
    client = request.get(CLIENT)
    return client.name if client is not None else "anonymous"

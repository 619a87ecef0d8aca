"""The configuration API of docs/reference.md §6: what is active, the providers, the audit log, past states.

    GET /api/v1/llm-config/active                 config:read  every routed purpose, resolved
    GET /api/v1/llm-config/active/{purpose}       config:read  one purpose; 404 when not routed
    GET /api/v1/llm-config/providers[/{id}]       config:read  providers, masked, with health
    GET /api/v1/llm-config/api-keys[/{id}]        config:read  the same, `kind: api_key` only
    GET /api/v1/llm-config/servers[/{id}]         config:read  the same, `kind: ai_server` only
    GET /api/v1/llm-config/audit?subject=&type=&since=&until=&limit=   admin   events
    GET /api/v1/llm-config/state?at=              admin        the configuration at a time
    GET /api/v1/llm-config/active/{purpose}/litellm?model=M   secrets:read   first healthy, key decrypted
    POST /api/v1/llm-config/providers/{id}/test   admin        a health check now
    GET /api/v1/llm-config/servers/{id}/models    config:read  the models a server reports

A purpose with no route in `routing.yaml` (or no routing file at all) answers 404, like an
unknown purpose, and `active` lists exactly the purposes that `active/{purpose}` answers.

A route may name a provider whose file is refused and has no good version (docs/reference.md §4: it
stays known to routing, and is skipped until a good version arrives). `primary` and
`fallbacks` list only providers a request can go to, each a whole provider as docs/reference.md §6 shows
it, so a client that takes "the first healthy one" never meets a stub; such a route adds
`"unavailable": [id, ...]`, the ids it names that are left out (their files are in
`/readyz`'s `refused`). The key is there only when the list is not empty.

Every handler takes `registry.snapshot` once and answers from that snapshot alone. The JSON
of each provider and route is rendered once per snapshot (`rendering`); `active/{purpose}`, the hot path,
keeps its encoded answer and re-encodes only when the snapshot or its providers' health
changed, so a lookup costs a few dictionary reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from service.config.models import PURPOSES, SCOPES, AiServer, Provider
from service.config.snapshot import PerSnapshot
from service.errors import BadRequest, ModelNotFound, NoCandidate, NotFound, NotReady, UpstreamsFailed
from service.gateway.catalog import list_models
from service.gateway.health import check
from service.gateway.relay import shown
from service.gateway.routing import first_healthy
from service.http.auth import CLIENT, Handler, authenticated, client_name, scoped
from service.http.context import EVENTS, HEALTH, PREFIX, REGISTRY, RELAY
from service.http.limits_api import own_limits
from service.http.push import body_tag, event_stream, watched
from service.http.rendering import RENDERED, Rendered, encode, render
from service.journal.events import SecretRead
from service.journal.replay import parse_time

DEFAULT_AUDIT_LIMIT = 1000
MAX_AUDIT_LIMIT = 10_000

_KINDS = {"providers": None, "api-keys": "api_key", "servers": "ai_server"}
"""Path segment -> the `kind` it lists (None: every provider)."""


def setup(app: web.Application) -> None:
    """Add the configuration endpoints to the app."""
    app[RENDERED] = PerSnapshot(render)
    add = app.router.add_get
    add(f"{PREFIX}/active", _active_all)
    add(f"{PREFIX}/active/{{purpose}}", _active)
    for segment, kind in _KINDS.items():
        add(f"{PREFIX}/{segment}", _lister(kind))
        add(f"{PREFIX}/{segment}/{{id}}", _getter(kind))
    add(f"{PREFIX}/audit", _audit)
    add(f"{PREFIX}/state", _state)
    add(f"{PREFIX}/active/{{purpose}}/litellm", _litellm)
    app.router.add_post(f"{PREFIX}/providers/{{id}}/test", _test)
    add(f"{PREFIX}/servers/{{id}}/models", _server_models)
    add(f"{PREFIX}/events", scoped("config:read")(event_stream))
    add(f"{PREFIX}/whoami", _whoami)


def _json(body: Any) -> web.Response:
    return web.Response(body=encode(body), content_type="application/json")


def _current(request: web.Request) -> Rendered:
    """The rendering of the current snapshot: the one read of the registry per request."""
    registry = request.app[REGISTRY]
    if not registry.ready:
        raise NotReady("the first load of the configuration is not complete")
    return request.app[RENDERED].of(registry.snapshot)


# -- active --------------------------------------------------------------------------------


@scoped("config:read")
@watched
async def _active(request: web.Request) -> web.StreamResponse:
    rendered = _current(request)
    purpose = request.match_info["purpose"]
    route = rendered.routes.get(purpose)
    if route is None:
        raise NotFound(_no_route(purpose))
    body, etag = rendered.encoded_route(route, request.app[HEALTH])
    return web.Response(body=body, content_type="application/json", headers={"ETag": etag})


@scoped("config:read")
@watched
async def _active_all(request: web.Request) -> web.StreamResponse:
    rendered = _current(request)
    health = request.app[HEALTH]
    response = _json(
        {
            "purposes": {p: rendered.route(r, health) for p, r in rendered.routes.items()},
            "commit": rendered.snapshot.commit,
            "generation": rendered.snapshot.generation,
        }
    )
    ids = sorted({i for r in rendered.routes.values() for i in r.ids})
    shapes = [[p, r.primary, r.fallbacks, r.weights, r.unavailable] for p, r in rendered.routes.items()]
    response.headers["ETag"] = rendered.routes_tag(ids, health, shapes)
    return response


def _no_route(purpose: str) -> str:
    if purpose in PURPOSES:
        return f"no provider is routed for `{purpose}` (providers.d/routing.yaml)"
    return f"unknown purpose `{purpose}`; one of {', '.join(PURPOSES)}"


# -- providers, api-keys, servers ------------------------------------------------------------


def _lister(kind: str | None) -> Handler:
    @scoped("config:read")
    @watched
    async def providers(request: web.Request) -> web.StreamResponse:
        rendered = _current(request)
        health = request.app[HEALTH]
        ids = [i for i, p in rendered.providers.items() if kind is None or p["kind"] == kind]
        listed = [rendered.provider(i, health) for i in ids]
        response = _json({"providers": listed, "generation": rendered.snapshot.generation})
        response.headers["ETag"] = rendered.list_tag(ids, health)
        return response

    return providers


def _getter(kind: str | None) -> Handler:
    @scoped("config:read")
    @watched
    async def provider(request: web.Request) -> web.StreamResponse:
        rendered = _current(request)
        provider_id = request.match_info["id"]
        found = rendered.providers.get(provider_id)
        if found is None:
            raise NotFound(f"no provider `{provider_id}`")
        if kind is not None and found["kind"] != kind:
            raise NotFound(f"`{provider_id}` is an {found['kind']}, not an {kind}")
        health = request.app[HEALTH]
        response = _json(rendered.provider(provider_id, health))
        # The blob tells an edit (If-Match compares it alone); the hash a health change.
        response.headers["ETag"] = rendered.provider_tag(provider_id, health)
        return response

    return provider


# -- audit and state -------------------------------------------------------------------------


@scoped("admin")
@watched
async def _audit(request: web.Request) -> web.StreamResponse:
    query = request.query
    since, until = _time(query, "since"), _time(query, "until")
    limit = _limit(query.get("limit"))
    events = await asyncio.to_thread(  # reads the file: off the event loop
        request.app[EVENTS].select,
        subject=query.get("subject") or None,
        type=query.get("type") or None,
        since=since,
        until=until,
        limit=limit,
    )
    return _json({"events": [e.model_dump(mode="json") for e in events], "count": len(events)})


@scoped("admin")
@watched
async def _state(request: web.Request) -> web.StreamResponse:
    at = _time(request.query, "at") or datetime.now(UTC)
    seq, config = await asyncio.to_thread(request.app[EVENTS].replay, at)  # reads the file
    # isoformat pads the year to four digits, where strftime's %Y writes year 256 as `256`
    shown = at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    response = _json({"at": shown, "seq": seq, "config": config})
    # `at` (now by default) is when it was asked, not what it means: not in the tag
    response.headers["ETag"] = body_tag(encode({"seq": seq, "config": config}))
    return response


def _time(query: Mapping[str, str], name: str) -> datetime | None:
    text = query.get(name)
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise BadRequest(f"`{name}`: {exc}") from None


def _limit(text: str | None) -> int:
    if not text:
        return DEFAULT_AUDIT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        raise BadRequest(f"`limit` is not a whole number: {text!r}") from None
    if not 1 <= limit <= MAX_AUDIT_LIMIT:
        raise BadRequest(f"`limit` must be between 1 and {MAX_AUDIT_LIMIT}")
    return limit


# -- resolved parameters, tests, models ----------------------------------------------------------


@scoped("secrets:read")
async def _litellm(request: web.Request) -> web.StreamResponse:
    """The first healthy candidate of a purpose that serves `?model=` as LiteLLM parameters, the
    model mapped through its `model_map` and the key included; audited.

    Without `model`, the candidate's first declared model; a candidate that declares none is
    400, since the only name left would be `*`, which no upstream serves.
    """
    purpose = request.match_info["purpose"]
    model = request.query.get("model") or None
    app = request.app
    snapshot = app[REGISTRY].snapshot
    table = app[RELAY].router.table(snapshot)
    if purpose not in PURPOSES or purpose not in table.routes:
        raise NotFound(f"no routing for purpose {purpose!r}")
    if model is not None and not table.serves(purpose, model):
        raise ModelNotFound(f"no provider of `{purpose}` serves model {shown(model)}")
    provider = first_healthy(table, purpose, app[HEALTH], model)
    if provider is None:
        what = f" for model {shown(model)}" if model is not None else ""
        raise NoCandidate(f"no provider of `{purpose}`{what} is healthy now")
    if model is None:
        if not provider.models:
            raise BadRequest(
                f"`{provider.id}`, the first healthy provider of `{purpose}`, declares no models, so "
                "the model must be named: `?model=` (the client's `litellm_params(purpose, model=...)`)"
            )
        model = provider.models[0]
    params = provider.to_litellm_config(model, with_secrets=True)
    read = SecretRead(subject=provider.id, provider=provider.id, client=client_name(request), purpose=purpose)
    await asyncio.to_thread(app[EVENTS].append, read)  # recorded before the key leaves
    answer = {
        "purpose": purpose,
        "provider": provider.id,
        "model": model,
        "generation": snapshot.generation,
        "litellm_params": params,
        "models": list(provider.models),
    }
    return web.json_response(answer)


@scoped("admin")
async def _test(request: web.Request) -> web.StreamResponse:
    provider_id = request.match_info["id"]
    provider = request.app[REGISTRY].snapshot.providers.get(provider_id)
    if provider is None:
        raise NotFound(f"no provider {provider_id!r}")
    return await test_provider(request, provider)


async def test_provider(request: web.Request, provider: Provider) -> web.StreamResponse:
    """Check `provider` now and answer `{"ok", "latency_ms", "message"}`; the result counts as health."""
    relay = request.app[RELAY]
    result = await check(provider, relay.session)
    relay.health.checked(provider.id, result)
    return web.json_response(result.as_json())


@scoped("config:read")
@watched
async def _server_models(request: web.Request) -> web.StreamResponse:
    server_id = request.match_info["id"]
    server = request.app[REGISTRY].snapshot.providers.get(server_id)
    if not isinstance(server, AiServer):
        raise NotFound(f"no server {server_id!r}")
    listed = await list_models(server, request.app[RELAY].session)
    if listed.models is None:
        attempt = {"provider": server_id, "status": listed.status, "reason": listed.reason}
        raise UpstreamsFailed(f"server {server_id!r} did not list its models", attempts=[attempt])
    return web.json_response({"id": server_id, "models": listed.models})


@authenticated
@watched
async def _whoami(request: web.Request) -> web.StreamResponse:
    """Who the token is and what it may do; with no clients file, nobody, and every scope."""
    client = request.get(CLIENT)
    if client is None:
        return _json({"client": None, "scopes": list(SCOPES), "limits": None, "used": None})
    own = await own_limits(request.app, client)
    return _json({"client": client.name, "scopes": list(client.scopes), **own})

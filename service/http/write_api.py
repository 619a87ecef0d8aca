"""Writes over HTTP that become git commits (docs/reference.md §8), all with the scope `config:write`.

    POST   /api/v1/llm-config/api-keys | servers            a new provider          201, Location
    PUT    /api/v1/llm-config/api-keys/{id} | servers/{id}   the whole document      200
    PATCH  /api/v1/llm-config/api-keys/{id} | servers/{id}   a JSON merge patch      200
    DELETE /api/v1/llm-config/api-keys/{id} | servers/{id}   409 while routed        200
    PUT    /api/v1/llm-config/active/{purpose}              {"primary", "weights"?, "fallbacks"?}
    POST   /api/v1/llm-config/active      {"purpose", "provider_id", "fallback_provider_id"?}
    POST   /api/v1/llm-config/api-keys/{id}/test | servers/{id}/test   admin: a health check now

Each write is answered once the service has applied its commit, with the provider or route
(masked), `commit` and `generation`, and the file's `ETag`; in `branch` mode with 202 and
`{"branch", "commit"}`. `If-Match` (the ETag's blob part) makes a write fail with 412 when
the file changed since. The request's `X-Switchboard-Reason` becomes the commit's body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from service.config.loader import MAX_FILE_BYTES
from service.errors import BadRequest, NotFound, Unprocessable
from service.http.auth import CLIENT, Handler, client_name, scoped
from service.http.bodies import json_body
from service.http.config_api import test_provider
from service.http.context import PREFIX, SETTINGS, WRITER
from service.http.rendering import answer_tag, provider_answer, route_answer
from service.runtime.delivery import refuse_unfed
from service.runtime.drafts import ProviderKind
from service.runtime.written import Written

REASON_HEADER = "X-Switchboard-Reason"
_SEGMENTS: dict[str, ProviderKind] = {"api-keys": "api_key", "servers": "ai_server"}


def setup(app: web.Application) -> None:
    """Add the write routes to the app (the writer itself is made with the registry)."""
    router = app.router
    for segment, kind in _SEGMENTS.items():
        router.add_post(f"{PREFIX}/{segment}", _create(kind, segment))
        router.add_put(f"{PREFIX}/{segment}/{{id}}", _change(kind, merge=False))
        router.add_patch(f"{PREFIX}/{segment}/{{id}}", _change(kind, merge=True))
        router.add_delete(f"{PREFIX}/{segment}/{{id}}", _delete(kind))
        router.add_post(f"{PREFIX}/{segment}/{{id}}/test", _test(kind))
    router.add_put(f"{PREFIX}/active/{{purpose}}", _route)
    router.add_post(f"{PREFIX}/active", _route_old_form)


async def _body(request: web.Request) -> Mapping[str, Any]:
    """The write's JSON object: no larger than the file it becomes may be (MAX_FILE_BYTES), so a
    body of 16 MiB is refused at once instead of being rendered and encrypted for seconds, lock
    held. Every write route takes an object, and refuses anything else alike (400) before the
    writer sees it: `[]` passed on as a route was taken for a function of the current one (a 500).
    Writes off, or a replica without a push: 405 first, whatever the body (docs/reference.md §8, §12)."""
    writer = request.app[WRITER]
    writer.writable()
    if writer.committer is not None:
        await refuse_unfed(request.app[SETTINGS], writer.committer.repo)
    body = await json_body(request, limit=MAX_FILE_BYTES)
    if not isinstance(body, Mapping):
        raise BadRequest(f"the body must be a JSON object, not {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    """What JSON calls the type of `value` (for a body that is not an object)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "an array"
    return "a string" if isinstance(value, str) else "a number"


def _reason(request: web.Request) -> str | None:
    return request.headers.get(REASON_HEADER)


def _key_readable(request: web.Request) -> bool:
    """Whether the client may read decrypted keys (so may send a kept key elsewhere): without
    auth, or with `secrets:read`."""
    client = request.get(CLIENT)
    return client is None or "secrets:read" in client.scopes


def _create(kind: ProviderKind, segment: str) -> Handler:
    @scoped("config:write")
    async def create(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        written = await request.app[WRITER].create(kind, body, client_name(request), _reason(request))
        return _provider(request, written, status=201, location=f"{PREFIX}/{segment}/{written.subject}")

    return create


def _change(kind: ProviderKind, *, merge: bool) -> Handler:
    """PUT, the whole document, or with `merge` PATCH, a JSON merge patch: the same write else."""

    @scoped("config:write")
    async def change(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        writer = request.app[WRITER]
        write = writer.patch if merge else writer.replace
        written = await write(
            kind,
            request.match_info["id"],
            body,
            client_name(request),
            _reason(request),
            _if_match(request),
            key_readable=_key_readable(request),
        )
        return _provider(request, written)

    return change


def _delete(kind: ProviderKind) -> Handler:
    @scoped("config:write")
    async def delete(request: web.Request) -> web.StreamResponse:
        provider_id = request.match_info["id"]
        written = await request.app[WRITER].delete(
            kind, provider_id, client_name(request), _reason(request), _if_match(request)
        )
        if written.branch is not None or written.pending:
            return _branched(written)
        body = {"id": provider_id, "kind": kind, "deleted": True, "file": written.file}
        return web.json_response(body | {"commit": written.commit, "generation": written.generation})

    return delete


def _test(kind: ProviderKind) -> Handler:
    @scoped("admin")
    async def test(request: web.Request) -> web.StreamResponse:
        provider = request.app[WRITER].registry.snapshot.providers.get(request.match_info["id"])
        if provider is None or provider.kind != kind:
            raise NotFound(f"no {kind} `{request.match_info['id']}`")
        return await test_provider(request, provider)

    return test


@scoped("config:write")
async def _route(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    purpose = request.match_info["purpose"]
    written = await request.app[WRITER].route(
        purpose, body, client_name(request), _reason(request), _if_match(request)
    )
    return _routed(request, written, purpose)


@scoped("config:write")
async def _route_old_form(request: web.Request) -> web.StreamResponse:
    """The old design's `{"purpose", "provider_id", "fallback_provider_id"?}`: one active provider.

    The route keeps every fallback its file lists (but the new primary): a route write changes
    only what it names. `fallback_provider_id` comes first, before those.
    """
    body = await _body(request)
    unknown = sorted(set(body) - {"purpose", "provider_id", "fallback_provider_id"})
    missing = [name for name in ("purpose", "provider_id") if not isinstance(body.get(name), str)]
    fallback = body.get("fallback_provider_id")
    if unknown or missing or not isinstance(fallback, str | None):
        problems = [{"file": "", "path": n, "message": "unknown field"} for n in unknown]
        problems += [{"file": "", "path": n, "message": "required: a string"} for n in missing]
        if not isinstance(fallback, str | None):
            problems += [{"file": "", "path": "fallback_provider_id", "message": "a string or null"}]
        with request.app[WRITER].naming("routing", body.get("purpose")):  # the routing file
            raise Unprocessable("expected {purpose, provider_id, fallback_provider_id?}", problems=problems)
    purpose, primary = body["purpose"], body["provider_id"]

    def route(current: Any) -> dict[str, Any]:
        """From the route in the routing file (at the commit the write is made on, not what is
        served now): every fallback it lists is kept, those refused right now included."""
        made: dict[str, Any] = {"primary": [primary]}
        listed = current.get("fallbacks", []) if isinstance(current, Mapping) else []
        listed = [listed] if isinstance(listed, str) else list(listed) if isinstance(listed, list) else []
        named = [fallback] if fallback is not None else []
        kept = [f for f in named + [f for f in listed if f not in named] if f != primary]
        if kept:
            made["fallbacks"] = kept
        return made

    written = await request.app[WRITER].route(purpose, route, client_name(request), _reason(request), None)
    return _routed(request, written, purpose)


# -- answers ------------------------------------------------------------------------------------


def _if_match(request: web.Request) -> str | None:
    return request.headers.get("If-Match")


def _etag(written: Written) -> dict[str, str]:
    return {"ETag": f'"{written.blob}"'} if written.blob else {}


def _branched(written: Written) -> web.Response:
    """202: committed to a branch for review (`branch` mode), or pushed and not applied here yet
    (from git-sync's checkout, when git-sync did not bring it back in time)."""
    if written.pending:
        body: dict[str, Any] = {"pending": True, "commit": written.commit, "file": written.file}
    else:
        body = {"branch": written.branch, "commit": written.commit, "file": written.file}
    return web.json_response(body, status=202, headers=_etag(written))


def _provider(
    request: web.Request, written: Written, *, status: int = 200, location: str | None = None
) -> web.Response:
    if written.branch is not None or written.pending:
        return _branched(written)
    assert written.snapshot is not None  # noqa: S101 - applied writes carry their snapshot
    answer = provider_answer(request.app, written.snapshot, written.subject)
    if answer is None:
        raise NotFound(f"`{written.subject}` was written but is not in the configuration")
    tag = answer_tag(request.app, written.snapshot, provider=written.subject)
    headers = ({"ETag": tag} if tag else _etag(written)) | (
        {"Location": location} if location and written.changed else {}
    )
    body = answer | {"commit": written.commit or answer.get("commit"), "generation": written.generation}
    return web.json_response(body, status=status if written.changed else 200, headers=headers)


def _routed(request: web.Request, written: Written, purpose: str) -> web.Response:
    if written.branch is not None or written.pending:
        return _branched(written)
    assert written.snapshot is not None  # noqa: S101
    answer = route_answer(request.app, written.snapshot, purpose)
    if answer is None:
        raise NotFound(f"no route for `{purpose}` after the write")
    tag = answer_tag(request.app, written.snapshot, purpose=purpose)
    headers = {"ETag": tag} if tag else _etag(written)
    return web.json_response(answer | {"commit": written.commit}, headers=headers)

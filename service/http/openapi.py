"""`GET /openapi.json`: the OpenAPI 3.1 description of every endpoint (SPEC 6), built once per app.

Every operation of the app is described here, beside the others: its scope, parameters,
body, answers and headers (the parts are `service.http.operations`). Schemas come from
pydantic models: the answers (`service.http.answers`), the write bodies
(`service.http.bodies`), the file models (a provider body is the file's fields, `api_key` in
plaintext) and the events. `tests/http/test_openapi.py` fails when the app has a route that
is not described here, and runs schemathesis against a live service, so an answer that does
not match its description fails the tests too.

OpenAPI's bearer scheme has no scopes: each operation names its scope in its description and
in `x-switchboard-scope`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from service import __version__
from service.config.models import AiServer, ApiKey
from service.http import answers, bodies, console, push, replicas, traffic
from service.http.context import PREFIX
from service.http.operations import (
    ETAG,
    GATEWAY_HEADERS,
    JSON,
    MERGE_PATCH,
    Operation,
    Schemas,
    body_errors,
    header,
    json_answer,
    path_id,
    provider_bodies,
    purpose,
    query,
    ref,
    request,
    with_headers,
    write_errors,
)
from service.http.write_api import REASON_HEADER
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

PATH = "/openapi.json"


def setup(app: web.Application) -> None:
    """Serve the document at `/openapi.json` (no authentication, like `/healthz`)."""
    app[_DOCUMENT] = _Encoded()
    app.router.add_get(PATH, _openapi)


@dataclass(slots=True)
class _Encoded:
    """The document's bytes: made on the first request, then kept for the app's life."""

    body: bytes | None = None


_DOCUMENT = web.AppKey("openapi_document", _Encoded)


async def _openapi(request: web.Request) -> web.StreamResponse:
    encoded = request.app[_DOCUMENT]
    if encoded.body is None:
        made = await asyncio.to_thread(document)  # pydantic's schema generation takes a moment
        encoded.body = json.dumps(made, separators=(",", ":")).encode()
    return web.Response(body=encoded.body, content_type=JSON)


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the service."""
    schemas = Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for op in operations(schemas):
        paths.setdefault(op.path, {})[op.method.lower()] = op.render(schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Switchboard",
            "version": __version__,
            "summary": "GitOps configuration service and OpenAI-compatible gateway for LLM providers",
            "description": _ABOUT,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [{"name": name, "description": text} for name, text in _TAGS.items()],
        "paths": paths,
        "components": {
            "schemas": schemas.render(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of the clients file (`switchboard token create --scope ...`).",
                }
            },
        },
    }


_ABOUT = (
    "Every endpoint but `/healthz`, `/readyz`, `/metrics`, `/openapi.json`, the console's files "
    "(`/ui/`) and the signed git webhook needs `Authorization: Bearer TOKEN` with the scope its "
    "description names (`x-switchboard-scope`) once a clients file "
    'exists. Errors are `{"error": {"type", "message", ...}}`; no input makes the service answer 500.'
)
_TAGS = {
    "service": "Liveness, readiness, metrics and this document.",
    "configuration": "What is active, the providers, the audit log, past states (SPEC 6).",
    "writes": "Writes that become git commits (SPEC 8).",
    "gateway": "The OpenAI-compatible gateway (SPEC 7).",
    "replicas": "Many replicas: the git webhook, and who serves which commit (SPEC 12).",
}


def operations(schemas: Schemas) -> Iterable[Operation]:
    """Every operation of the app: a route added to the app is described here."""
    yield from _service(schemas)
    for operation in _configuration(schemas):
        yield _watched(operation, schemas) if _is_watched(operation) else operation
    yield from _push(schemas)
    yield from _writes(schemas)
    yield from _gateway(schemas)
    yield from _replicas(schemas)


# -- change push (SPEC 9) ---------------------------------------------------------------------------

_PUSH_HEADERS = {
    "ETag": header('the answer\'s tag; for one provider `"<git blob id>.<index>"`'),
    push.INDEX_HEADER: header(
        "the index: the seq of the last configuration or health event", pattern="^[0-9]+$"
    ),
    push.REPLICA_HEADER: header("the replica that answered (an index means something only there)"),
}
_BLOCKING = (
    query(
        "index",
        "hold the answer until the index moves past this one (a blocking query)",
        {"type": "integer", "minimum": 0},
    ),
    query(
        "wait",
        "how long to hold: `500ms`, `30s`, `5m` or seconds (default 60 s, at most 300 s)",
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m)?\s*$"},
    ),
    {
        "name": "If-None-Match",
        "in": "header",
        "description": "an `ETag` held: 304 while it is current",
        "schema": {"type": "string"},
    },
)


def _is_watched(operation: Operation) -> bool:
    return operation.method == "GET" and operation.scope != "secrets:read"


def _watched(operation: Operation, s: Schemas) -> Operation:
    """A GET with SPEC 9's conditional and blocking forms, and their headers on its answers."""
    answers_ = dict(operation.answers)
    answers_["200"] = with_headers(answers_["200"], _PUSH_HEADERS)
    answers_["304"] = with_headers(
        {"description": "the `If-None-Match` tag is current: no body"}, _PUSH_HEADERS
    )
    answers_.setdefault("400", s.error("`index` or `wait` (or another parameter) is not valid"))
    answers_["503"] = s.error(
        "not ready, or too many requests held (`SWITCHBOARD_MAX_WATCHERS`; then with `Retry-After`)"
    )
    return replace(operation, answers=answers_, parameters=(*operation.parameters, *_BLOCKING))


def _push(s: Schemas) -> Iterable[Operation]:
    events = {
        "text/event-stream": {
            "schema": {
                "type": "string",
                "description": "`id: <seq>`, `event: <type>`, `data: <the event's JSON>` per event; "
                "`: keep-alive` comments every 15 s",
            }
        }
    }
    yield Operation(
        "GET",
        f"{PREFIX}/events",
        "config:read",
        "The event log as a live stream of server-sent events",
        {
            "200": {"description": "events as they are appended", "content": events},
            "400": s.error("`Last-Event-ID` or `after` is not a seq"),
            "503": s.error("too many streams held (`SWITCHBOARD_MAX_WATCHERS`), or not ready"),
        },
        (
            {
                "name": "Last-Event-ID",
                "in": "header",
                "description": "resume after this seq (wins over `after`)",
                "schema": {"type": "string", "pattern": "^[0-9]*$"},
            },
            query(
                "after",
                "resume after this seq: what was missed comes first, from the log",
                {"type": "integer", "minimum": 0},
            ),
        ),
        description="`secret.read` and `clients.updated` go only to tokens that also hold `admin`. "
        "Without `Last-Event-ID` or `after`, events from now on.",
    )
    yield _watched(
        Operation(
            "GET",
            f"{PREFIX}/whoami",
            "any",
            "Who the token is and what it may do",
            {"200": s.returns(answers.WhoAmI, "the client, and its scopes")},
            description="Any valid token. Without a clients file: `client` null and every scope.",
        ),
        s,
    )


# -- the service ------------------------------------------------------------------------------------


def _service(s: Schemas) -> Iterable[Operation]:
    metrics = {METRICS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}
    yield Operation("GET", "/healthz", None, "Liveness", {"200": s.returns(answers.Liveness, "it answers")})
    yield Operation(
        "GET",
        "/readyz",
        None,
        "Readiness: the first load is done; the files the last load refused, and why",
        {"200": s.returns(answers.Readiness, "ready"), "503": s.error("the first load is not complete")},
    )
    yield Operation(
        "GET", "/metrics", None, "Prometheus metrics", {"200": {"description": "text", "content": metrics}}
    )
    yield Operation(
        "GET", PATH, None, "This document", {"200": json_answer({"type": "object"}, "OpenAPI 3.1")}
    )
    html = {"text/html": {"schema": {"type": "string"}}}
    yield Operation(
        "GET",
        console.PATH.rstrip("/"),
        None,
        "The web console, at `ui/`",
        {"308": {"description": "to `ui/`", "headers": {"Location": header("`ui/`")}}},
    )
    yield Operation(
        "GET",
        console.PATH,
        None,
        "The web console (SPEC 10): a page that asks for a token and calls this API",
        {"200": {"description": "the page; never cached", "content": html}},
        description="Its assets are served from the package; a Content-Security-Policy allows this "
        "origin only.",
    )
    yield Operation(
        "GET",
        console.ASSETS,
        None,
        "A file of the web console (script, style, icon), cached for a year at the current version",
        {
            "200": {"description": "the file", "content": {"*/*": {"schema": {"type": "string"}}}},
            "404": s.error("no such file"),
        },
        (
            {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
        ),
    )
    yield Operation(
        "GET",
        console.PLAIN,
        None,
        "A file of the web console by its name alone (`index.html`, `app.js`...), never cached",
        {
            "200": {"description": "the file", "content": {"*/*": {"schema": {"type": "string"}}}},
            "404": s.error("no such file"),
        },
        ({"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},),
    )


# -- reading the configuration -------------------------------------------------------------------------

_TIME = {
    "description": "ISO 8601 (naive is UTC), a date, `now`, or a time ago: `10m`, `2h`, `3d`, `1w`",
    "anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "string", "format": "date"},
        {"type": "string", "pattern": "^[0-9]+[smhdw]$"},
        {"type": "string", "const": "now"},
    ],
    "examples": ["2026-11-27T05:33:08Z", "2h"],
}


def _configuration(s: Schemas) -> Iterable[Operation]:
    route = s.returns(answers.RouteAnswer, "the purpose's route, resolved")
    provider = s.returns(answers.ProviderAnswer, "the provider", name="ProviderAnswer")
    check = s.returns(answers.CheckAnswer, "the outcome, which counts as the provider's health")
    active = f"{PREFIX}/active"
    yield Operation(
        "GET",
        active,
        "config:read",
        "Every routed purpose",
        {"200": s.returns(answers.ActiveAnswer, "by purpose")},
    )
    yield Operation(
        "GET",
        f"{active}/{{purpose}}",
        "config:read",
        "One purpose, resolved",
        {"200": route, "404": s.error("no route for the purpose")},
        (purpose(),),
        description='The `ETag` is `"<git blob id of the routing file>.<hash of the answer>"`: '
        "`If-None-Match` compares it whole, `If-Match` on `PUT …/active/{purpose}` only its blob part.",
    )
    yield Operation(
        "GET",
        f"{active}/{{purpose}}/litellm",
        "secrets:read",
        "The first healthy candidate as LiteLLM parameters, its key decrypted",
        {
            "200": s.returns(answers.LitellmAnswer, "recorded in the event log as `secret.read`"),
            "404": s.error("no route for the purpose"),
            "503": s.error("no candidate is healthy now, or the configuration is not loaded"),
        },
        (purpose(),),
    )
    for segment, kind, example in (
        ("providers", "provider", "gpu"),
        ("api-keys", "api_key", "openrouter"),
        ("servers", "ai_server", "gpu"),
    ):
        what = f"Providers ({kind})" if kind != "provider" else "Providers"
        yield Operation(
            "GET",
            f"{PREFIX}/{segment}",
            "config:read",
            f"{what}, masked, with health",
            {"200": s.returns(answers.ProviderList, "by id")},
        )
        yield Operation(
            "GET",
            f"{PREFIX}/{segment}/{{id}}",
            "config:read",
            f"One {kind}, masked, with health",
            {"200": provider, "404": s.error(f"no such {kind}")},
            (path_id(example),),
        )
    yield Operation(
        "GET",
        traffic.PATH,
        "config:read",
        "Each provider's traffic since the service started: requests, errors, latency, tokens",
        {"200": s.returns(answers.TrafficAnswer, "every provider of the current configuration, by id")},
        description="The gateway's own counters (the numbers `/metrics` shows), by provider: attempts "
        "sent, those that failed, the mean time to the first byte of an answer, and the tokens the "
        "upstream reported.",
    )
    yield Operation(
        "GET",
        f"{PREFIX}/audit",
        "admin",
        "Events of the log, oldest first",
        {"200": s.returns(answers.AuditAnswer, "the events"), "400": s.error("a filter is not valid")},
        (
            query("subject", "a provider id, `routing` or `clients`"),
            query("type", "an event type (`provider.updated`) or a family (`provider`)"),
            query("since", "events at or after this time", _TIME),
            query("until", "events at or before this time", _TIME),
            query(
                "limit",
                "the most recent events kept (1000)",
                {"type": "integer", "minimum": 1, "maximum": 10_000},
            ),
        ),
    )
    yield Operation(
        "GET",
        f"{PREFIX}/state",
        "admin",
        "The configuration at a time, rebuilt from the event log",
        {"200": s.returns(answers.StateAnswer, "masked"), "400": s.error("`at` is not a time")},
        (query("at", "the time (default: now)", _TIME),),
    )
    yield Operation(
        "POST",
        f"{PREFIX}/providers/{{id}}/test",
        "admin",
        "Check a provider now: its models endpoint, with its key",
        {"200": check, "404": s.error("no such provider")},
        (path_id("gpu"),),
    )
    for segment, kind, example in (("api-keys", "api_key", "openrouter"), ("servers", "ai_server", "gpu")):
        yield Operation(
            "POST",
            f"{PREFIX}/{segment}/{{id}}/test",
            "admin",
            f"Check a provider of kind `{kind}` now, as `POST …/providers/{{id}}/test` does",
            {"200": check, "404": s.error(f"no such {kind}")},
            (path_id(example),),
        )
    yield Operation(
        "GET",
        f"{PREFIX}/servers/{{id}}/models",
        "config:read",
        "The models a server reports",
        {
            "200": s.returns(answers.ServerModels, "the server's models"),
            "404": s.error("no such server"),
            "502": s.returns(answers.UpstreamsFailedAnswer, "the server did not list its models"),
        },
        (path_id("gpu", "server"),),
    )


# -- writes ---------------------------------------------------------------------------------------

_WRITES = (
    "Validated as `switchboard validate` validates a commit (422, and nothing written, when it fails); "
    "committed with the client as author and `X-Switchboard-Reason` as the message's body; answered "
    "once the service applied the commit."
)
_REASON = {"name": REASON_HEADER, "in": "header", "description": "why: the commit message's body"}
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "description": "the file's `ETag` (its blob part counts): 412 when the file changed since",
}
_EXAMPLES: dict[str, dict[str, Any]] = {
    "ai_server": {"id": "new-server", "server_type": "vllm", "base_url": "http://127.0.0.1:9/v1"},
    "api_key": {
        "id": "new-key",
        "provider": "openrouter",
        "base_url": "http://127.0.0.1:9/v1",
        "api_key": "sk-or-example-0123456789abcdef",
    },
}


def _writes(s: Schemas) -> Iterable[Operation]:
    for model, stem in ((AiServer, "Server"), (ApiKey, "ApiKey")):
        for name, schema in provider_bodies(model, stem):
            s.plain(name, schema)
    reason, if_match = _string_header(_REASON), _string_header(_IF_MATCH)
    for segment, kind, stem in (("servers", "ai_server", "Server"), ("api-keys", "api_key", "ApiKey")):
        written = s.answer("WrittenProvider", answers.WrittenProvider)
        one = (path_id("spare"), if_match, reason)
        example = _EXAMPLES[kind]
        yield Operation(
            "POST",
            f"{PREFIX}/{segment}",
            "config:write",
            f"Create a provider of kind `{kind}`: one commit",
            {
                "201": json_answer(written, "created", ETag=ETAG, Location=header("where to read it")),
                **write_errors(s, if_match=False),
            },
            (reason,),
            request(ref(f"{stem}Create"), example),
            _WRITES,
        )
        yield Operation(
            "PUT",
            f"{PREFIX}/{segment}/{{id}}",
            "config:write",
            f"Replace a provider of kind `{kind}`: one commit",
            {
                "200": json_answer(written, "replaced", ETag=ETAG),
                "404": s.error(f"no such {kind}"),
                **write_errors(s, if_match=True),
            },
            one,
            request(ref(f"{stem}Replace"), {k: v for k, v in example.items() if k != "id"}),
            _WRITES,
        )
        yield Operation(
            "PATCH",
            f"{PREFIX}/{segment}/{{id}}",
            "config:write",
            f"Change fields of a provider of kind `{kind}` (a JSON merge patch): one commit",
            {
                "200": json_answer(written, "changed", ETag=ETAG),
                "404": s.error(f"no such {kind}"),
                **write_errors(s, if_match=True),
            },
            one,
            request(ref(f"{stem}Patch"), {"name": "Spare box"}, MERGE_PATCH, JSON),
            _WRITES,
        )
        yield Operation(
            "DELETE",
            f"{PREFIX}/{segment}/{{id}}",
            "config:write",
            f"Delete a provider of kind `{kind}`: one commit; 409 while routing names it",
            {
                "200": s.returns(answers.Deleted, "deleted"),
                "404": s.error(f"no such {kind}"),
                **write_errors(s, if_match=True, body=False),
            },
            one,
            None,
            _WRITES,
        )
    route = s.answer("RouteAnswer", answers.RouteAnswer)
    yield Operation(
        "PUT",
        f"{PREFIX}/active/{{purpose}}",
        "config:write",
        "Set a purpose's route (the routing file is made when there is none): one commit",
        {
            "200": json_answer(route, "the route, resolved", ETag=ETAG),
            "404": s.error("not a purpose"),
            **write_errors(s, if_match=True),
        },
        (purpose(), if_match, reason),
        request(s.body("RouteBody", bodies.RouteBody), {"primary": ["gpu"], "fallbacks": ["openrouter"]}),
        _WRITES,
    )
    yield Operation(
        "POST",
        f"{PREFIX}/active",
        "config:write",
        "Set a purpose's active provider, in the old design's form: one commit",
        {
            "200": json_answer(route, "the route, resolved", ETag=ETAG),
            "404": s.error("not a purpose"),
            **write_errors(s, if_match=False),
        },
        (reason,),
        request(s.body("ActiveForm", bodies.ActiveForm), {"purpose": "chat", "provider_id": "gpu"}),
        f"{_WRITES} Without `fallback_provider_id` the route keeps the fallbacks it has.",
    )


def _string_header(parameter: dict[str, Any]) -> dict[str, Any]:
    return parameter | {"schema": {"type": "string"}}


# -- the gateway ------------------------------------------------------------------------------------


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
)


def _gateway(s: Schemas) -> Iterable[Operation]:
    passed_on = {
        "description": "the upstream's own client error, as it is",
        "content": {JSON: {"schema": {}}},
    }
    for path, purpose_, body, example in _GATEWAY:
        ok: dict[str, Any] = {"description": "the provider's answer", "content": {JSON: {"schema": {}}}}
        if purpose_ == "chat":
            ok["content"]["text/event-stream"] = {
                "schema": s.answer("ServerSentEvent", answers.ServerSentEvent)
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
                    answers.UpstreamsFailedAnswer, "every candidate failed; each attempt listed"
                ),
                "503": s.error("no candidate can take the request now, or the configuration is not loaded"),
                "508": s.error("the request came back through this gateway: a `base_url` points at it"),
            },
            body=request(s.body(body.__name__, body), example),
            headers=GATEWAY_HEADERS,
        )
    yield Operation(
        "GET",
        "/v1/models",
        "completions",
        "The models of the enabled providers",
        {"200": s.returns(answers.ModelsAnswer, "OpenAI's model list")},
        headers=GATEWAY_HEADERS,
    )


# -- many replicas (SPEC 12) --------------------------------------------------------------------------


def _replicas(s: Schemas) -> Iterable[Operation]:
    signature = {
        "name": replicas.GITHUB_HEADER,
        "in": "header",
        "description": "GitHub: `sha256=` and the HMAC-SHA256 hex of the raw body, keyed with "
        "`SWITCHBOARD_WEBHOOK_SECRET`",
        "schema": {"type": "string"},
    }
    token = {
        "name": replicas.GITLAB_HEADER,
        "in": "header",
        "description": "GitLab: the secret token itself (`SWITCHBOARD_WEBHOOK_SECRET`)",
        "schema": {"type": "string"},
    }
    payload = {"type": "object", "description": "the git host's push event; only its signature is read"}
    yield Operation(
        "POST",
        replicas.HOOK,
        None,
        "A git host's push notification: pull now",
        {
            "202": s.returns(answers.HookAccepted, "verified: a pull runs now (requests coalesce)"),
            "401": s.error("no signature, a wrong one, or no `SWITCHBOARD_WEBHOOK_SECRET` here"),
            "404": s.error("no pull is configured here (`SWITCHBOARD_GIT_PULL`)"),
            "413": s.error("the body is over `SWITCHBOARD_MAX_BODY_BYTES`"),
        },
        (signature, token),
        {"required": False, "content": {JSON: {"schema": payload}}},
        description="Signed by the git host instead of a token: GitHub's `X-Hub-Signature-256` or "
        "GitLab's `X-Gitlab-Token`, compared in constant time; a wrong or missing one pulls nothing. "
        "Answered at once: while a pull runs, any number of notifications make one more pull.",
    )
    yield _watched(
        Operation(
            "GET",
            replicas.REPLICAS,
            "config:read",
            "Live replicas and the commit each serves",
            {"200": s.returns(answers.ReplicasAnswer, "this replica and every other heard from in 10 s")},
            description="From Redis heartbeats (every 2 s) when `SWITCHBOARD_REDIS_URL` is set; without "
            "Redis, or while it is unreachable, this replica alone and `shared` false. Never waits on Redis.",
        ),
        s,
    )

"""The reads of the configuration API as `GET /openapi.json` describes them (docs/reference.md §6, §9, §12).

Each GET but the `secrets:read` one takes docs/reference.md §9's conditional and blocking forms
(`watched`); the event stream, `whoami` and the replicas' routes are here too, beside the
reads they watch. The parts are `service.http.operations`; `service.http.openapi` puts these
in the document.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from service.http import (
    config_answers,
    error_answers,
    limits_answers,
    push,
    replicas,
    service_answers,
    traffic,
)
from service.http.context import PREFIX
from service.http.operations import JSON, Operation, Schemas, header, path_id, purpose, query, with_headers


def configuration(s: Schemas) -> Iterable[Operation]:
    """The reads of the configuration, each GET with the blocking forms of docs/reference.md §9."""
    for operation in _reads(s):
        yield watched(operation, s) if _is_watched(operation) else operation


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
_KINDS = (
    ("providers", "provider", "gpu"),
    ("api-keys", "api_key", "openrouter"),
    ("servers", "ai_server", "gpu"),
)
"""Each way to name providers: (path segment, kind, an example id)."""


def _reads(s: Schemas) -> Iterable[Operation]:
    route = s.returns(config_answers.RouteAnswer, "the purpose's route, resolved")
    provider = s.returns(config_answers.ProviderAnswer, "the provider", name="ProviderAnswer")
    check = s.returns(config_answers.CheckAnswer, "the outcome, which counts as the provider's health")
    active = f"{PREFIX}/active"
    yield Operation(
        "GET",
        active,
        "config:read",
        "Every routed purpose",
        {"200": s.returns(config_answers.ActiveAnswer, "by purpose")},
    )
    yield Operation(
        "GET",
        f"{active}/{{purpose}}",
        "config:read",
        "One purpose, resolved",
        {"200": route, "404": s.error("no route for the purpose")},
        (purpose(),),
        description='The `ETag` is `W/"<git blob id of the routing file>.<commit>.<hash>"`: '
        "`If-None-Match` compares it whole, `If-Match` on `PUT …/active/{purpose}` only its blob part.",
    )
    yield Operation(
        "GET",
        f"{active}/{{purpose}}/litellm",
        "secrets:read",
        "The first healthy candidate that serves the model as LiteLLM parameters, its key decrypted",
        {
            "200": s.returns(config_answers.LitellmAnswer, "recorded in the event log as `secret.read`"),
            "400": s.error("no `model` given, and the first healthy candidate declares no models"),
            "404": s.error(
                "no route for the purpose; or `model_not_found`: no provider of the route serves the model"
            ),
            "503": s.error("no candidate is healthy now, or the configuration is not loaded"),
        },
        (
            purpose(),
            query(
                "model",
                "the model as clients name it; the answer has it mapped through the provider's `model_map`. "
                "Left out: the candidate's first declared model",
            ),
        ),
    )
    for segment, kind, example in _KINDS:
        what = f"Providers ({kind})" if kind != "provider" else "Providers"
        yield Operation(
            "GET",
            f"{PREFIX}/{segment}",
            "config:read",
            f"{what}, masked, with health",
            {"200": s.returns(config_answers.ProviderList, "by id")},
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
        {
            "200": s.returns(
                config_answers.TrafficAnswer, "every provider of the current configuration, by id"
            )
        },
        description="The gateway's own counters (the numbers `/metrics` shows), by provider: attempts "
        "sent, those that failed, the mean time to the first byte of an answer, and the tokens the "
        "upstream reported.",
    )
    yield Operation(
        "GET",
        f"{PREFIX}/audit",
        "admin",
        "Events of the log, oldest first",
        {"200": s.returns(config_answers.AuditAnswer, "the events"), "400": s.error("a filter is not valid")},
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
        {"200": s.returns(config_answers.StateAnswer, "masked"), "400": s.error("`at` is not a time")},
        (query("at", "the time (default: now)", _TIME),),
    )
    for segment, kind, example in _KINDS:
        yield Operation(
            "POST",
            f"{PREFIX}/{segment}/{{id}}/test",
            "admin",
            "Check a provider now: its models endpoint, with its key"
            if kind == "provider"
            else f"Check a provider of kind `{kind}` now, as `POST …/providers/{{id}}/test` does",
            {"200": check, "404": s.error(f"no such {kind}")},
            (path_id(example),),
        )
    yield Operation(
        "GET",
        f"{PREFIX}/servers/{{id}}/models",
        "config:read",
        "The models a server reports",
        {
            "200": s.returns(config_answers.ServerModels, "the server's models"),
            "404": s.error("no such server"),
            "502": s.returns(error_answers.UpstreamsFailedAnswer, "the server did not list its models"),
        },
        (path_id("gpu", "server"),),
    )


# -- change push (docs/reference.md §9) ----------------------------------------------------------------------

_PUSH_HEADERS = {
    "ETag": header(
        'the answer\'s weak tag, `W/"<git blob id or ->.<commit or ->.<hash>"`: the same on every replica '
        "serving one commit with one health (docs/reference.md §6)"
    ),
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
        "description": "an `ETag` held: 304 while it is current; with `wait`, held until the answer "
        "differs from it, on any replica (docs/reference.md §9)",
        "schema": {"type": "string"},
    },
)


def _is_watched(operation: Operation) -> bool:
    return operation.method == "GET" and operation.scope != "secrets:read"


def watched(operation: Operation, s: Schemas) -> Operation:
    """A GET with docs/reference.md §9's conditional and blocking forms, and their headers on its answers."""
    answers_ = dict(operation.answers)
    answers_["200"] = with_headers(answers_["200"], _PUSH_HEADERS)
    answers_["304"] = with_headers(
        {"description": "the `If-None-Match` tag is current: no body"}, _PUSH_HEADERS
    )
    answers_.setdefault("400", s.error("`index` or `wait` (or another parameter) is not valid"))
    held = (
        "too many requests held (`SWITCHBOARD_MAX_WATCHERS`, or `SWITCHBOARD_MAX_WATCHERS_PER_CLIENT` "
        "for this client; then with `Retry-After`)"
    )
    own = operation.answers.get("503")
    answers_["503"] = s.error(f"{own['description']}; or {held}" if own else f"not ready, or {held}")
    return replace(operation, answers=answers_, parameters=(*operation.parameters, *_BLOCKING))


def change_push(s: Schemas) -> Iterable[Operation]:
    """The event stream and `whoami` (docs/reference.md §9)."""
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
            "503": s.error(
                "too many streams held (`SWITCHBOARD_MAX_WATCHERS`, or "
                "`SWITCHBOARD_MAX_WATCHERS_PER_CLIENT` for this client), or not ready"
            ),
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
    yield watched(
        Operation(
            "GET",
            f"{PREFIX}/whoami",
            "any",
            "Who the token is and what it may do",
            {
                "200": s.returns(
                    limits_answers.WhoAmI, "the client, its scopes, its limits and what it uses now"
                )
            },
            description="Any valid token. Without a clients file: `client` null and every scope.",
        ),
        s,
    )
    yield watched(
        Operation(
            "GET",
            f"{PREFIX}/limits",
            "usage:read",
            "Every client's and provider's limits and budget, with what each uses now (reference §13)",
            {"200": s.returns(limits_answers.LimitsAnswer, "clients and providers, with their use")},
            description="With Redis, the counts are every replica's; a provider's rates are this replica's.",
        ),
        s,
    )


# -- many replicas (docs/reference.md §12) -------------------------------------------------------------------


def many_replicas(s: Schemas) -> Iterable[Operation]:
    """The git webhook and the live replicas (docs/reference.md §12)."""
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
            "202": s.returns(service_answers.HookAccepted, "verified: a pull runs now (requests coalesce)"),
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
    yield watched(
        Operation(
            "GET",
            replicas.REPLICAS,
            "config:read",
            "Live replicas and the commit each serves",
            {
                "200": s.returns(
                    service_answers.ReplicasAnswer, "this replica and every other heard from in 10 s"
                )
            },
            description="From Redis heartbeats (every 2 s) when `SWITCHBOARD_REDIS_URL` is set; without "
            "Redis, or while it is unreachable, this replica alone and `shared` false. Never waits on Redis.",
        ),
        s,
    )

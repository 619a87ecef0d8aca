"""The writes of the configuration API as `GET /openapi.json` describes them (docs/reference.md §8).

Each write becomes one commit; its body, its `If-Match` and `X-Switchboard-Reason` headers
and its answers are described here with the parts of `service.http.operations`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from service.config.models import AiServer, ApiKey
from service.http import bodies, config_answers, write_answers
from service.http.context import PREFIX
from service.http.operations import (
    ETAG,
    JSON,
    MERGE_PATCH,
    Operation,
    Schemas,
    header,
    json_answer,
    path_id,
    provider_bodies,
    purpose,
    ref,
    request,
    write_errors,
)
from service.http.write_api import REASON_HEADER

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


def writes(s: Schemas) -> Iterable[Operation]:
    """Create, replace, change and delete a provider; set a route (each one commit)."""
    for model, stem in ((AiServer, "Server"), (ApiKey, "ApiKey")):
        for name, schema in provider_bodies(model, stem):
            s.plain(name, schema)
    reason, if_match = _string_header(_REASON), _string_header(_IF_MATCH)
    for segment, kind, stem in (("servers", "ai_server", "Server"), ("api-keys", "api_key", "ApiKey")):
        written = s.answer("WrittenProvider", write_answers.WrittenProvider)
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
        changes = (
            (
                "PUT",
                f"Replace a provider of kind `{kind}`: one commit",
                "replaced",
                request(ref(f"{stem}Replace"), {k: v for k, v in example.items() if k != "id"}),
            ),
            (
                "PATCH",
                f"Change fields of a provider of kind `{kind}` (a JSON merge patch): one commit",
                "changed",
                request(ref(f"{stem}Patch"), {"name": "Spare box"}, MERGE_PATCH, JSON),
            ),
        )
        for method, summary, done, body in changes:
            yield Operation(
                method,
                f"{PREFIX}/{segment}/{{id}}",
                "config:write",
                summary,
                {
                    "200": json_answer(written, done, ETag=ETAG),
                    "404": s.error(f"no such {kind}"),
                    **write_errors(s, if_match=True),
                },
                one,
                body,
                _WRITES,
            )
        yield Operation(
            "DELETE",
            f"{PREFIX}/{segment}/{{id}}",
            "config:write",
            f"Delete a provider of kind `{kind}`: one commit; 409 while routing names it",
            {
                "200": s.returns(write_answers.Deleted, "deleted"),
                "404": s.error(f"no such {kind}"),
                **write_errors(s, if_match=True, body=False),
            },
            one,
            None,
            _WRITES,
        )
    route = s.answer("RouteAnswer", config_answers.RouteAnswer)
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

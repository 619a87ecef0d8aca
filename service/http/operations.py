"""What `GET /openapi.json` is made of: operations, their parts, and schemas from pydantic types.

`service.http.openapi` and the tables beside it (`config_operations`, `write_operations`,
`gateway_operations`) list the app's operations with these parts; this module renders them
as OpenAPI 3.1 (JSON Schema 2020-12, which is what pydantic writes).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter

from service.config.models import PURPOSES, AiServer, ApiKey, Scope
from service.gateway.call import ATTEMPTS_HEADER, PROVIDER_HEADER
from service.http import error_answers, write_answers
from service.http.context import PREFIX

REF = "#/components/schemas/{model}"
_MONEY = r"^[0-9]+(\.[0-9]+)?$"
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


class Schemas:
    """`components.schemas`: pydantic types and plain schemas, referenced by name."""

    def __init__(self) -> None:
        self._types: dict[str, tuple[Literal["validation", "serialization"], TypeAdapter[Any]]] = {}
        self._plain: dict[str, dict[str, Any]] = {}

    def answer(self, name: str, type_: Any) -> dict[str, Any]:
        """A reference to what an answer holds: `type_` as it is serialized."""
        self._types.setdefault(name, ("serialization", TypeAdapter(type_)))
        return ref(name)

    def body(self, name: str, type_: Any) -> dict[str, Any]:
        """A reference to what a request body holds: `type_` as it is validated."""
        self._types.setdefault(name, ("validation", TypeAdapter(type_)))
        return ref(name)

    def plain(self, name: str, schema: dict[str, Any]) -> dict[str, Any]:
        """A reference to a schema written out (or derived from a model's)."""
        self._plain.setdefault(name, schema)
        return ref(name)

    def returns(
        self, type_: Any, description: str, *, name: str | None = None, **headers: dict[str, Any]
    ) -> dict[str, Any]:
        """A JSON answer holding `type_` (named after its class unless `name` is given)."""
        return json_answer(self.answer(name or type_.__name__, type_), description, **headers)

    def error(self, description: str) -> dict[str, Any]:
        """An error answer: `{"error": {"type", "message", ...}}`."""
        return self.returns(error_answers.ErrorAnswer, description)

    def render(self) -> dict[str, Any]:
        rendered: dict[str, Any] = {}
        for mode in ("validation", "serialization"):
            inputs = [(name, m, adapter) for name, (m, adapter) in self._types.items() if m == mode]
            tops, defs = TypeAdapter.json_schemas(inputs, ref_template=REF)
            found = {**defs.get("$defs", {}), **{n: s for (n, _), s in tops.items() if s != ref(n)}}
            if mode == "serialization":  # an answer carries every field: a default says nothing there
                found = {name: _without_defaults(schema) for name, schema in found.items()}
            rendered |= found
        return dict(sorted((rendered | self._plain).items()))


def ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(model=name)}


def _without_defaults(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_defaults(v) for k, v in schema.items() if k != "default"}
    if isinstance(schema, list):
        return [_without_defaults(v) for v in schema]
    return schema


@dataclass(frozen=True, slots=True)
class Operation:
    """One method on one path: its scope (None: no authentication), answers by status, and parts."""

    method: str
    path: str
    scope: Scope | Literal["any"] | None
    """`any`: any valid token, whatever its scopes."""
    summary: str
    answers: Mapping[str, dict[str, Any]]
    parameters: tuple[dict[str, Any], ...] = ()
    body: dict[str, Any] | None = None
    description: str = ""
    headers: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """Headers every answer carries, errors included."""
    errors_as: str | None = None
    """The schema every error answer takes instead of ours (a protocol's own error shape)."""

    @property
    def tag(self) -> str:
        if self.path.startswith("/v1/"):
            return "gateway"
        if not self.path.startswith(PREFIX):
            return "service"
        if self.path.startswith((f"{PREFIX}/hooks/", f"{PREFIX}/replicas")):
            return "replicas"
        if self.path.startswith(f"{PREFIX}/usage"):
            return "usage"
        return "configuration" if self.method == "GET" or self.path.endswith("/test") else "writes"

    def render(self, schemas: Schemas) -> dict[str, Any]:
        # every endpoint, the public ones too (docs/reference.md §6.1)
        responses = {"421": schemas.error("without authentication: the `Host` is not a loopback name")}
        responses |= self.answers
        if self.scope is not None:
            responses = {
                "401": schemas.error("no token, or an unknown one"),
                "403": schemas.error("the token lacks the scope"),
                "503": schemas.error("the first load of the configuration is not complete"),
            } | responses
            responses = {"415": unsupported_media_type(schemas)} | responses  # a GET's body too
        if self.errors_as is not None:
            responses = {status: _error_as(r, self.errors_as) for status, r in responses.items()}
        if self.headers:
            responses = {status: with_headers(r, self.headers) for status, r in responses.items()}
        scope_line = f"Scope: `{self.scope}`." if self.scope else "No authentication."
        op: dict[str, Any] = {
            "operationId": _operation_id(self.method, self.path),
            "summary": self.summary,
            "description": f"{self.description}\n\n{scope_line}".strip(),
            "tags": [self.tag],
            "security": [{"bearer": []}] if self.scope else [],
        }
        if self.scope:
            op["x-switchboard-scope"] = self.scope
        if self.parameters:
            op["parameters"] = list(self.parameters)
        if self.body is not None:
            op["requestBody"] = self.body
        op["responses"] = dict(sorted(responses.items()))
        return op


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}") for w in path.removeprefix(PREFIX).replace("-", "_").split("/") if w]
    if path.endswith("/"):  # `/ui/` beside `/ui`
        words.append("index")
    return "_".join([method.lower(), *words]).replace(".", "_")


# -- answers ---------------------------------------------------------------------------------------


def json_answer(schema: dict[str, Any], description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    """A JSON answer; `headers` by name, `_` for `-` (`ETag=`, `Location=`)."""
    answer: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        answer["headers"] = {name.replace("_", "-"): header for name, header in headers.items()}
    return answer


def with_headers(answer: dict[str, Any], headers: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    return {**answer, "headers": {**answer.get("headers", {}), **headers}}


def header(description: str, *, required: bool = True, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"} | ({"pattern": pattern} if pattern else {})
    return {"description": description, "required": required, "schema": schema}


GATEWAY_HEADERS = {
    PROVIDER_HEADER: header("the provider that answered (`none` when none did)"),
    ATTEMPTS_HEADER: header("how many upstreams were tried", pattern="^[0-9]+$"),
    "x-request-id": header(
        "the upstream's id, or one unique to the request when it sent none: the id of its usage record"
    ),
    "x-switchboard-cost-usd": header(
        "what the request cost, in USD (a whole answer only, not a stream)", required=False, pattern=_MONEY
    ),
    "x-switchboard-remaining-requests": header(
        "a client with limits: requests left of its `rpm` in the last 60 s, this one counted"
        " (`unlimited` without an `rpm`)",
        required=False,
    ),
    "x-switchboard-remaining-tokens": header(
        "a client with limits: tokens left of its `tpm` in the last 60 s (once settled, for a whole"
        " answer; `unlimited` without a `tpm`)",
        required=False,
    ),
    "x-switchboard-budget-remaining-usd": header(
        "a client with a budget: what is left in its period, this request reserved (a whole answer: settled)",
        required=False,
        pattern=_MONEY,
    ),
}
ETAG = header('`"<git blob id of the file written>"`: send it back as `If-Match`')


_OUR_ERRORS = (ref("ErrorAnswer"), ref("UpstreamsFailedAnswer"))


def _error_as(response: dict[str, Any], name: str) -> dict[str, Any]:
    """`response` with its schema `name` when it is one of our error answers."""
    content = response.get("content", {})
    if content.get(JSON, {}).get("schema") not in _OUR_ERRORS:
        return response
    return {**response, "content": {**content, JSON: {**content[JSON], "schema": ref(name)}}}


def body_errors(schemas: Schemas) -> dict[str, dict[str, Any]]:
    """What a request with a JSON body may be answered besides its own errors."""
    return {
        "400": schemas.error("the body is not valid JSON, not an object, or nested too deep"),
        "413": schemas.error("the body is too large (`SWITCHBOARD_MAX_BODY_BYTES`)"),
        "415": unsupported_media_type(schemas),
    }


def unsupported_media_type(schemas: Schemas) -> dict[str, Any]:
    """415, which every operation behind a token may answer (docs/reference.md §6)."""
    return schemas.error(
        "a body whose `Content-Type` is not JSON (`application/json`, `application/merge-patch+json`); "
        "without authentication, any such request without a JSON media type, body or not"
    )


def write_errors(schemas: Schemas, *, if_match: bool, body: bool = True) -> dict[str, dict[str, Any]]:
    """What a write may be answered besides its success (docs/reference.md §8)."""
    errors = {
        "202": schemas.returns(
            write_answers.WriteAccepted,
            "`branch` mode: committed to a new branch for review, nothing applied; or, from git-sync's "
            "checkout, pushed and not applied here yet (`pending`)",
            name="WriteAccepted",
            ETag=header("the file's blob id (none for a delete)", required=False),
        ),
        "405": with_headers(
            schemas.error(
                "writes are off (`SWITCHBOARD_WRITE_MODE=off`, or no git repository), or this replica is "
                "fed from a remote (git-sync, `SWITCHBOARD_GIT_PULL`) and `SWITCHBOARD_GIT_PUSH` is not set"
            ),
            {"Allow": header("what the path still takes: `GET, HEAD`")},
        ),
        "409": schemas.error(
            "a conflict: the file has uncommitted local changes, a key would be encrypted while "
            "`.sops.yaml` has uncommitted changes, git failed or refused the write (its reason in "
            "`message`), the push failed, the local branch has commits the remote lacks, or "
            "(delete) routing still names the provider; nothing was written. Or: the remote has "
            "the write but this service does not serve it (refused, and why), said with "
            '`"pushed": true` and the `commit` the remote keeps'
        ),
        "422": schemas.returns(
            error_answers.InvalidAnswer,
            "the configuration after the write would not be valid, or a `base_url` is outside "
            "`SWITCHBOARD_ALLOWED_UPSTREAMS` (link-local when unset); nothing was written",
        ),
        **(body_errors(schemas) if body else {}),
        "503": schemas.error(
            "the first load of the configuration is not complete, or 64 writes are already waiting "
            "for their turn (`busy`, with `Retry-After`)"
        ),
    }
    if if_match:
        errors["412"] = schemas.error("`If-Match` names a version of the file that is no longer current")
    return errors


# -- parameters and bodies --------------------------------------------------------------------------


def path_id(example: str, what: str = "provider") -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "description": f"the {what}'s id (its file's name)",
        "schema": {"type": "string"},
        "example": example,
    }


def purpose(description: str = "a purpose") -> dict[str, Any]:
    return {
        "name": "purpose",
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "enum": list(PURPOSES)},
    }


def query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema or {"type": "string"}}


def request(schema: dict[str, Any], example: Any, *media_types: str) -> dict[str, Any]:
    """A required request body, in each media type given (JSON by default)."""
    return {
        "required": True,
        "content": {media: {"schema": schema, "example": example} for media in media_types or (JSON,)},
    }


def provider_bodies(model: type[AiServer] | type[ApiKey], stem: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """`<stem>Create`, `<stem>Replace` and `<stem>Patch`: the file's fields, `api_key` in plaintext
    (after the schemas those fields refer to).

    Derived from the file's model, so a field added to the file is a field of the bodies.
    """
    base = model.model_json_schema(ref_template=REF, mode="validation")
    yield from base.pop("$defs", {}).items()  # the parts the fields refer to (Price, Budget)
    properties = dict(base["properties"])
    plaintext = {
        "type": "string",
        "minLength": 1,
        "description": "In plaintext: sops encrypts it for the `.sops.yaml` recipients before it "
        "reaches disk.",
    }
    properties["api_key"] = plaintext if "api_key" in base.get("required", []) else nullable(plaintext)
    required = [name for name in base.get("required", []) if name != "kind"]
    create = base | {
        "title": f"{stem}Create",
        "description": f"{base.get('description', '')} The file's fields; `kind` may be left out.",
        "properties": properties,
        "required": required,
    }
    yield f"{stem}Create", create
    yield (
        f"{stem}Replace",
        create
        | {
            "title": f"{stem}Replace",
            "description": "The whole document: `api_key` left out keeps the current key, `id` left out "
            "is the path's.",
            "required": [name for name in required if name not in ("api_key", "id")],
        },
    )
    patch = {
        name: nullable({k: v for k, v in value.items() if k != "default"})
        for name, value in properties.items()
        if name not in ("kind", "id")
    }
    yield (
        f"{stem}Patch",
        {
            "title": f"{stem}Patch",
            "description": "A JSON merge patch (RFC 7386): a field given is set, a field given as null is "
            "removed, the others are kept. `kind` and `id` may be given but not changed.",
            "type": "object",
            "additionalProperties": False,
            "properties": {"kind": properties["kind"], "id": properties["id"], **patch},
        },
    )


def nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`schema`, or null."""
    if any(option.get("type") == "null" for option in schema.get("anyOf", [])):
        return dict(schema)
    described = {k: v for k, v in schema.items() if k in ("title", "description", "default")}
    inner = {k: v for k, v in schema.items() if k not in described}
    return {**described, "anyOf": [inner, {"type": "null"}]}

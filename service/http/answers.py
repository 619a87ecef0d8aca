"""What the HTTP API answers, as pydantic models: the response schemas of `GET /openapi.json`.

Handlers build their answers as plain dicts (rendered once per snapshot, cheap to encode);
these models describe those dicts and are never on a request's path. They are strict
(`extra="forbid"`), so schemathesis, run against a live service in the tests, fails when an
answer grows a field that is not described here: describe it, then ship it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from service.config.metering import Budget, Limits, Price
from service.config.models import Protocol, Purpose, Scope, ServerType
from service.journal.events import Event
from service.vendors import VENDORS

ProviderKind = Literal["ai_server", "api_key"]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- providers and routes ------------------------------------------------------------------------


class ProviderHealth(_Answer):
    """What is known of a provider's health: the confirmed status and reason (shared between
    replicas, in the answer's tag), the last check's measurements, and this replica's circuit."""

    status: Literal["healthy", "unhealthy", "unknown"] = Field(
        description="the confirmed status (docs/reference.md §7): not changed by this replica's circuit"
    )
    reason: str | None = Field(
        description="why it is unhealthy; `budget`: skipped, out of budget until its period ends"
    )
    checked_at: datetime | None = Field(description="the last check that told, UTC (not in the tag)")
    latency_ms: float | None = Field(description="the last check's latency (not in the tag)")
    circuit: Literal["closed", "open", "half_open"] = Field(
        description="this replica's own circuit: `open` is routed around; not health, not in the tag"
    )


class _Provider(_Answer):
    id: str
    name: str | None
    base_url: str = Field(description="where requests go (the vendor's default when the file sets none)")
    models: list[str]
    model_map: dict[str, str]
    purposes: list[Purpose]
    enabled: bool
    api_key: str | None = Field(description="masked: `****5d80` (`****` for a short key), or null")
    connect_timeout_s: float
    timeout_s: float
    first_byte_timeout_s: float
    idle_timeout_s: float
    file: str = Field(description="the file that defines it, e.g. `providers.d/gpu.yaml`")
    commit: str | None = Field(description="the last commit that touched the file; null outside git")
    health: ProviderHealth
    # Only when the file sets them (an answer without them is what it was before they existed).
    pricing: dict[str, Price] | None = Field(None, description="USD per million tokens, by model")
    budget: Budget | None = Field(None, description="the provider's spending cap")
    protocols: list[Protocol] | None = Field(None, description="the protocols its upstream speaks natively")


class ServerAnswer(_Provider):
    """A self-hosted model server, masked, with its health."""

    kind: Literal["ai_server"]
    server_type: ServerType


class ApiKeyAnswer(_Provider):
    """A vendor key, masked, with its health."""

    kind: Literal["api_key"]
    provider: str = Field(json_schema_extra={"enum": list[JsonValue](sorted(VENDORS))})


ProviderAnswer = Annotated[ServerAnswer | ApiKeyAnswer, Field(discriminator="kind")]
"""A provider as `GET …/providers/{id}` answers it."""


class WrittenServer(ServerAnswer):
    """A server as a write answers it: the provider once applied, with the generation that applied it."""

    generation: int


class WrittenApiKey(ApiKeyAnswer):
    """A key as a write answers it: the provider once applied, with the generation that applied it."""

    generation: int


WrittenProvider = Annotated[WrittenServer | WrittenApiKey, Field(discriminator="kind")]


class ProviderList(_Answer):
    """Providers of the current configuration, by id."""

    providers: list[ProviderAnswer]
    generation: int


class RouteAnswer(_Answer):
    """One purpose, resolved: its primaries (load-balanced by weight), then its fallbacks in order."""

    purpose: Purpose
    primary: list[ProviderAnswer]
    fallbacks: list[ProviderAnswer]
    weights: dict[str, float]
    unavailable: list[str] | None = Field(
        None, description="ids the route names whose files are refused here (left out of the lists above)"
    )
    commit: str | None
    generation: int


class ActiveAnswer(_Answer):
    """Every routed purpose, resolved."""

    purposes: dict[Purpose, RouteAnswer]
    commit: str | None
    generation: int


class Deleted(_Answer):
    """A provider whose file a write removed."""

    id: str
    kind: ProviderKind
    deleted: Literal[True]
    file: str
    commit: str
    generation: int


class Branched(_Answer):
    """A write in `branch` mode: committed to a new branch for review, nothing applied."""

    branch: str = Field(description="`switchboard/<verb>-<id>-<n>`")
    commit: str
    file: str


class Pushed(_Answer):
    """A write from git-sync's checkout, pushed to the remote but not applied here yet: git-sync
    did not bring it back within the wait (docs/reference.md §12). It is served once git-sync swaps it in."""

    pending: Literal[True]
    commit: str
    file: str


WriteAccepted = Branched | Pushed
"""202: a write committed to a branch for review, or pushed and not applied here yet."""


# -- checks, models, secrets ----------------------------------------------------------------------


class CheckAnswer(_Answer):
    """A health check run now: the provider's models endpoint asked with its key."""

    ok: bool
    latency_ms: float
    message: str


class ServerModels(_Answer):
    """The models a server reports."""

    id: str
    models: list[str]


class LitellmAnswer(_Answer):
    """The first healthy candidate of a purpose as LiteLLM parameters, its key decrypted."""

    purpose: Purpose
    provider: str
    model: str = Field(description="the model as clients name it (`litellm_params.model` has it mapped)")
    generation: int
    litellm_params: dict[str, JsonValue]
    models: list[str]


# -- traffic -----------------------------------------------------------------------------------------


class TokenCounts(_Answer):
    prompt: int
    completion: int


class ProviderTraffic(_Answer):
    """One provider's upstream traffic since the service started, from its own counters."""

    requests: int = Field(description="attempts sent to the provider, whatever came of them")
    errors: int = Field(
        description="attempts that failed (connection, timeout, 408, 429, 5xx, its key refused) or "
        "broke mid-answer; a 4xx passed on to the client is the client's, not counted"
    )
    latency_ms: float | None = Field(description="mean time to the first byte of an answer; null before any")
    tokens: TokenCounts = Field(description="tokens the upstream reported in `usage`")


class TrafficAnswer(_Answer):
    """Each provider of the current configuration, with its traffic since `since`."""

    since: str = Field(
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$", description="when the counters started, UTC"
    )
    providers: dict[str, ProviderTraffic]


# -- the event log -----------------------------------------------------------------------------------


class AuditAnswer(_Answer):
    """Events of the log that match the filters, oldest first."""

    events: list[Event]
    count: int


class ConfigView(_Answer):
    """The configuration as the event log records it: masked, providers by id."""

    providers: dict[str, dict[str, JsonValue]]
    routing: dict[str, dict[str, JsonValue]]
    clients: dict[str, dict[str, JsonValue]]


class StateAnswer(_Answer):
    """The configuration as it stood at a time, rebuilt from the event log."""

    at: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
    seq: int = Field(description="the last event at or before `at` (0: none)")
    config: ConfigView


# -- the service ----------------------------------------------------------------------------------


class Liveness(_Answer):
    status: Literal["ok"]


class RefusedFile(_Answer):
    file: str
    reason: str


class SyncAnswer(_Answer):
    """The built-in pull (docs/reference.md §12): `failed` while the branch cannot fast-forward, and why."""

    status: Literal["ok", "failed"]
    reason: str | None
    remote_commit: str | None = Field(description="what the remote's branch is at; null before a fetch")


class Readiness(_Answer):
    """Ready once the first load is done; `refused` lists the files the last load set aside."""

    status: Literal["ready"]
    replica: str = Field(description="`SWITCHBOARD_REPLICA` (default: the host name)")
    generation: int
    last_applied_commit: str | None
    last_attempted_commit: str | None
    refused: list[RefusedFile]
    degraded: bool = Field(
        description="true while any file is refused, Redis is configured but away, or the usage ledger "
        "is degraded"
    )
    limits: Literal["redis", "local", "refuse"] = Field(
        description="where limits and budgets are counted: `redis`, or this replica alone (`local`; "
        "with Redis configured and away, `SWITCHBOARD_LIMITS_WITHOUT_REDIS`)"
    )
    ledger: Literal["ok", "degraded", "off"] = Field(
        description="the usage ledger (reference §13): `degraded` while its database cannot be reached "
        "(records wait in the spool), `off` with `SWITCHBOARD_USAGE_DB=off`"
    )
    sync: SyncAnswer | None = Field(None, description="only with `SWITCHBOARD_GIT_PULL`")


class ReplicaAnswer(_Answer):
    """One replica and the commit it serves, as its last heartbeat said."""

    replica: str
    commit: str | None
    generation: int
    ready: bool
    seen_at: datetime = Field(description="when this replica last heard from it, UTC")


class ReplicasAnswer(_Answer):
    """Every replica heard from in the last 10 s (with Redis), this one included."""

    replicas: list[ReplicaAnswer]
    shared: bool = Field(description="false without Redis (or while it is unreachable): this replica alone")


class HookAccepted(_Answer):
    """A git host's notification, verified: a pull runs now."""

    status: Literal["accepted"]
    replica: str


# -- the gateway --------------------------------------------------------------------------------------


class ModelEntry(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str = Field(description="the provider that serves it")


class ServerSentEvent(BaseModel):
    """One event of a `text/event-stream` answer: `data:` is a JSON chunk, or `[DONE]` at the end."""

    model_config = ConfigDict(extra="allow", frozen=True)

    data: str
    event: str | None = None
    id: str | None = None


class ModelsAnswer(_Answer):
    """OpenAI's model list: the models of the enabled providers."""

    object: Literal["list"]
    data: list[ModelEntry]


# -- errors ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """`type` names the case (`not_found`, `conflict`...); more fields may describe it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    message: str


class ErrorAnswer(_Answer):
    """Every error: `{"error": {"type", "message", ...}}`."""

    error: ErrorDetail


class MessagesErrorAnswer(_Answer):
    """An error on Anthropic's Messages paths, in Anthropic's shape:
    `{"type": "error", "error": {"type", "message", ...}}` (docs/reference.md §14)."""

    type: Literal["error"]
    error: ErrorDetail


class ProblemItem(_Answer):
    file: str
    path: str = Field(description="the field to blame, dotted (`purposes.chat.primary.0`); empty for none")
    message: str


class InvalidDetail(ErrorDetail):
    type: Literal["invalid"]
    problems: list[ProblemItem]


class InvalidAnswer(_Answer):
    """422: the write would make the configuration invalid; nothing was written."""

    error: InvalidDetail


class Attempt(_Answer):
    provider: str
    status: int | None = Field(description="the upstream's HTTP status; null when none came back")
    reason: str


class UpstreamsFailedDetail(ErrorDetail):
    type: Literal["upstreams_failed"]
    attempts: list[Attempt]


class UpstreamsFailedAnswer(_Answer):
    """502: every candidate upstream failed; each attempt is listed."""

    error: UpstreamsFailedDetail


class LimitsUse(_Answer):
    """What a client or provider uses now (docs/reference.md §13); money as decimal strings of USD."""

    requests_60s: int
    tokens_60s: int
    in_flight: int
    budget_spent_usd: str | None = Field(description="spent in the budget's period; null without a budget")
    budget_reserved_usd: str | None = Field(description="held by requests in flight")
    period_end: str | None = Field(description="ISO 8601 UTC; null for `total` or without a budget")


class ClientLimits(_Answer):
    name: str
    limits: Limits | None
    used: LimitsUse


class ProviderBudget(_Answer):
    budget: Budget


class ProviderLimits(_Answer):
    id: str
    limits: ProviderBudget | None
    used: LimitsUse


class LimitsAnswer(_Answer):
    """Every client's and provider's limits, with what is used now."""

    clients: list[ClientLimits]
    providers: list[ProviderLimits]
    mode: Literal["redis", "local", "refuse"] = Field(description="as `/readyz`'s `limits`")
    replicas: int = Field(
        ge=1,
        description="the live replicas this one last saw in Redis (itself included; 1 without Redis): "
        "in `local` mode each spends only its share of what each budget had left",
    )


class WhoAmI(_Answer):
    """Who a token is: its client's name (null without a clients file), its scopes, and its own
    limits and use (null without a clients file)."""

    client: str | None
    scopes: list[Scope]
    limits: Limits | None
    used: LimitsUse | None

"""What the configuration API's reads answer (docs/reference.md §6): providers, routes, checks,
traffic, the audit log and past states, as `GET /openapi.json` describes them (`service.http.answers`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, JsonValue

from service.config.metering import Budget, Price
from service.config.models import Protocol, Purpose, ServerType
from service.http.answers import Answer
from service.journal.events import Event
from service.vendors import VENDORS

# -- providers and routes ------------------------------------------------------------------------


class ProviderHealth(Answer):
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


class _Provider(Answer):
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


class ProviderList(Answer):
    """Providers of the current configuration, by id."""

    providers: list[ProviderAnswer]
    generation: int


class RouteAnswer(Answer):
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


class ActiveAnswer(Answer):
    """Every routed purpose, resolved."""

    purposes: dict[Purpose, RouteAnswer]
    commit: str | None
    generation: int


# -- checks, models, secrets ----------------------------------------------------------------------


class CheckAnswer(Answer):
    """A health check run now: the provider's models endpoint asked with its key."""

    ok: bool
    latency_ms: float
    message: str


class ServerModels(Answer):
    """The models a server reports."""

    id: str
    models: list[str]


class LitellmAnswer(Answer):
    """The first healthy candidate of a purpose as LiteLLM parameters, its key decrypted."""

    purpose: Purpose
    provider: str
    model: str = Field(description="the model as clients name it (`litellm_params.model` has it mapped)")
    generation: int
    litellm_params: dict[str, JsonValue]
    models: list[str]


# -- traffic -----------------------------------------------------------------------------------------


class TokenCounts(Answer):
    prompt: int
    completion: int


class ProviderTraffic(Answer):
    """One provider's upstream traffic since the service started, from its own counters."""

    requests: int = Field(description="attempts sent to the provider, whatever came of them")
    errors: int = Field(
        description="attempts that failed (connection, timeout, 408, 429, 5xx, its key refused) or "
        "broke mid-answer; a 4xx passed on to the client is the client's, not counted"
    )
    latency_ms: float | None = Field(description="mean time to the first byte of an answer; null before any")
    tokens: TokenCounts = Field(description="tokens the upstream reported in `usage`")


class TrafficAnswer(Answer):
    """Each provider of the current configuration, with its traffic since `since`."""

    since: str = Field(
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$", description="when the counters started, UTC"
    )
    providers: dict[str, ProviderTraffic]


# -- the event log -----------------------------------------------------------------------------------


class AuditAnswer(Answer):
    """Events of the log that match the filters, oldest first."""

    events: list[Event]
    count: int


class ConfigView(Answer):
    """The configuration as the event log records it: masked, providers by id."""

    providers: dict[str, dict[str, JsonValue]]
    routing: dict[str, dict[str, JsonValue]]
    clients: dict[str, dict[str, JsonValue]]


class StateAnswer(Answer):
    """The configuration as it stood at a time, rebuilt from the event log."""

    at: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
    seq: int = Field(description="the last event at or before `at` (0: none)")
    config: ConfigView

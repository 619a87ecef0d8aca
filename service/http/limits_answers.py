"""What the limits' reads answer (docs/reference.md §13): every client's and provider's
limits and use, and `whoami`, as `GET /openapi.json` describes them (`service.http.answers`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from service.config.metering import Budget, Limits
from service.config.models import Scope
from service.http.answers import Answer


class LimitsUse(Answer):
    """What a client or provider uses now (docs/reference.md §13); money as decimal strings of USD."""

    requests_60s: int
    tokens_60s: int
    in_flight: int
    budget_spent_usd: str | None = Field(description="spent in the budget's period; null without a budget")
    budget_reserved_usd: str | None = Field(description="held by requests in flight")
    period_end: str | None = Field(description="ISO 8601 UTC; null for `total` or without a budget")


class ClientLimits(Answer):
    name: str
    limits: Limits | None
    used: LimitsUse


class ProviderBudget(Answer):
    budget: Budget


class ProviderLimits(Answer):
    id: str
    limits: ProviderBudget | None
    used: LimitsUse


class LimitsAnswer(Answer):
    """Every client's and provider's limits, with what is used now."""

    clients: list[ClientLimits]
    providers: list[ProviderLimits]
    mode: Literal["redis", "local", "refuse"] = Field(description="as `/readyz`'s `limits`")
    replicas: int = Field(
        ge=1,
        description="the live replicas this one last saw in Redis (itself included; 1 without Redis): "
        "in `local` mode each spends only its share of what each budget had left",
    )


class WhoAmI(Answer):
    """Who a token is: its client's name (null without a clients file), its scopes, and its own
    limits and use (null without a clients file)."""

    client: str | None
    scopes: list[Scope]
    limits: Limits | None
    used: LimitsUse | None

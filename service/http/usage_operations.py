"""The usage ledger's reads (docs/reference.md §13) as `GET /openapi.json` describes them, and their answers.

`service.http.usage_api` serves them; the answers are built by `service.usage.query`, and the
models here say their shapes (schemathesis holds the live answers to them).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from service.http import usage_api
from service.http.config_operations import watched
from service.http.operations import JSON, Operation, Schemas, query
from service.usage.query import GROUP_KEYS, MAX_REQUESTS

_MONEY = r"^[0-9]+(\.[0-9]+)?$"


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UsageTotals(Answer):
    """Counts and cost of a set of records."""

    requests: int = Field(description="every record")
    errors: int = Field(description="failed upstream (a 5xx that no limit gave)")
    limited: int = Field(description="refused by a limit (429, and a `refuse`-mode 503)")
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_usd: str = Field(pattern=_MONEY, description='USD, a decimal string (`"0.000825"`)')


class UsageRow(UsageTotals):
    """One group: its keys (those of `group_by`, each under its own name), then its totals."""

    client: str | None = Field(None, description="with `group_by=client`; null: no client")
    provider: str | None = Field(None, description="with `group_by=provider`; null: refused before one")
    model: str | None = Field(None, description="with `group_by=model`: as the client asked")
    purpose: str | None = Field(None, description="with `group_by=purpose`")
    hour: str | None = Field(None, description="with `group_by=hour`: ISO 8601 UTC (`2026-11-27T05:00:00Z`)")
    day: str | None = Field(None, description="with `group_by=day`: `YYYY-MM-DD`, UTC")
    month: str | None = Field(None, description="with `group_by=month`: `YYYY-MM`, UTC")


class UsageAnswer(Answer):
    """The ledger's records in [since, until), grouped."""

    since: datetime
    until: datetime
    group_by: list[str] = Field(description="the keys asked for, in order")
    rows: list[UsageRow] = Field(description="one a group that has records, ordered by its keys")
    totals: UsageTotals = Field(description="every row added up")
    shared: bool = Field(description="true when the ledger is PostgreSQL, shared by every replica")


class UsageRecord(Answer):
    """One answered request; no prompt, no completion, no key, no token."""

    id: str = Field(description="the answer's `x-request-id`")
    ts: datetime
    client: str | None
    purpose: str
    model: str | None = Field(description="as the client asked")
    provider: str | None = Field(description="null when refused before one was chosen")
    upstream_model: str | None
    status: int = Field(description="the HTTP status the client got")
    stream: bool
    attempts: int
    latency_ms: float
    ttfb_ms: float | None
    prompt_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_usd: str = Field(pattern=_MONEY)
    priced: bool
    estimated: bool
    replica: str


class UsageRequests(Answer):
    """A page of records, newest first."""

    requests: list[UsageRecord]
    next_cursor: str | None = Field(description="the next page's `cursor`; null on the last page")


_TIME = {
    "description": "ISO 8601 (naive is UTC), a date, `now`, or a time ago: `10m`, `2h`, `3d`, `1w`",
    "type": "string",
    "examples": ["2026-11-27T05:00:00Z", "7d"],
}


def usage(s: Schemas) -> Iterable[Operation]:
    """`GET …/usage` and `GET …/usage/requests`."""
    unavailable = s.error(
        "`ledger_unavailable`: the ledger's database cannot be reached (records wait in the spool), "
        "or the ledger is off; or the configuration is not loaded"
    )
    filters = (
        query("client", "only this client's records"),
        query("provider", "only this provider's records"),
    )
    yield watched(
        Operation(
            "GET",
            usage_api.USAGE,
            "usage:read",
            "Usage and cost, grouped: by client, provider, model, purpose, hour, day or month",
            {
                "200": {
                    **s.returns(UsageAnswer, "the groups and their totals"),
                    "content": {
                        JSON: {"schema": s.answer("UsageAnswer", UsageAnswer)},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                "400": s.error("a parameter is not valid"),
                "503": unavailable,
            },
            (
                query("since", "records at or after this time (default: 7 days ago)", _TIME),
                query("until", "records before this time (default: now)", _TIME),
                query(
                    "group_by",
                    f"one key or several, comma-separated: {', '.join(GROUP_KEYS)}",
                    {"type": "string", "examples": ["client,day"]},
                ),
                *filters,
                query("model", "only this model (as clients asked)"),
                query(
                    "format", "`json` (default) or `csv` (columns: the rows' keys)", {"enum": ["json", "csv"]}
                ),
            ),
            description="Whole hours come from the hourly rollups (kept for good), the edges of the range "
            "from the raw records (kept `SWITCHBOARD_USAGE_RETENTION_DAYS`). `errors` are records that "
            "failed upstream (5xx), `limited` those a limit refused (429).",
        ),
        s,
    )
    yield watched(
        Operation(
            "GET",
            usage_api.REQUESTS,
            "usage:read",
            "The raw records, newest first, a page at a time",
            {
                "200": s.returns(UsageRequests, "a page"),
                "400": s.error("a parameter is not valid"),
                "503": unavailable,
            },
            (
                *filters,
                query("since", "records at or after this time", _TIME),
                query("until", "records before this time", _TIME),
                query(
                    "status",
                    "an HTTP status (`429`) or a class (`5xx`)",
                    {"type": "string", "pattern": "^([1-5][0-9][0-9]|[1-5][xX][xX])$"},
                ),
                query(
                    "limit",
                    f"records a page (100; more than {MAX_REQUESTS} is {MAX_REQUESTS})",
                    {"type": "integer", "minimum": 1},
                ),
                query("cursor", "the previous page's `next_cursor`"),
            ),
        ),
        s,
    )

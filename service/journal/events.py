"""The events of the log: what the service did, one pydantic model per type.

One pydantic model per event type, in a union discriminated on `type`; the JSON Schema of
the log comes from them (`event_log_schema`). Each line carries `prev`, the hash of the event
before it (`GENESIS` for seq 1), and `hash`, the sha256 hex of the canonical JSON of the event
without its `hash` field, so that editing, deleting or reordering a line breaks the chain
(`verify`).

An event is built as a draft, `ProviderAdded(subject=..., file=..., changes=...)`, and
`service.journal.log.EventLog.append` fills in `seq`, `ts`, `prev` and `hash`.

Events carry masks (`****5d80`), never secrets: the views they are diffed from are masked.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)
from typing_extensions import TypedDict

from service.config import view

GENESIS = "0" * 64
"""The `prev` of the first event (seq 1): there is no event before it."""

_SHA256: dict[str, JsonValue] = {"pattern": "^[0-9a-f]{64}$"}
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_TS_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$"


def to_utc(value: datetime) -> datetime:
    """`value` in UTC; a naive time is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _format_ts(value: datetime) -> str:
    return to_utc(value).strftime(_TS_FORMAT)


def now() -> datetime:
    """The current time, in UTC."""
    return datetime.now(UTC)


Timestamp = Annotated[
    datetime,
    AfterValidator(to_utc),
    PlainSerializer(_format_ts, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": _TS_PATTERN}),
]
"""A UTC time, written as `2026-11-27T05:33:08.123456Z`; naive times are taken as UTC."""


class FieldChange(TypedDict, total=False):
    """One changed field: its value before and after. A missing `new` means the field was removed."""

    old: JsonValue
    new: JsonValue


class BaseEvent(BaseModel):
    """The fields every event has. A draft has `seq` 0 and no hash until it is appended."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_serialization_defaults_required=True)

    # Drafts have seq 0 and empty hashes; the schema (json_schema_extra) describes the log's lines.
    seq: int = Field(0, ge=0, json_schema_extra={"minimum": 1}, description="1, 2, 3... in the log")
    ts: Timestamp = Field(default_factory=now, description="when it was appended, UTC")
    type: str
    subject: str | None = Field(None, description="the provider id, 'routing' or 'clients'")
    file: str | None = Field(None, description="the file it came from, e.g. providers.d/x.yaml")
    commit: str | None = Field(None, description="HEAD when the file is committed unchanged there")
    author: str | None = Field(None, description="author of the last commit touching the file")
    uncommitted: bool = Field(False, description="the file differs from HEAD (commit is null)")
    changes: dict[str, FieldChange] = Field(default_factory=dict)
    prev: str = Field(
        "", json_schema_extra=_SHA256, description="hash of the event before; GENESIS for seq 1"
    )
    hash: str = Field("", json_schema_extra=_SHA256, description="sha256 hex of the event without `hash`")

    @model_validator(mode="after")
    def _commit_or_uncommitted(self) -> BaseEvent:
        if self.uncommitted and self.commit is not None:
            raise ValueError("an event with a commit cannot be uncommitted")
        return self


class ServiceStarted(BaseEvent):
    """The service started; `recovered` reports a torn last line set aside on open."""

    type: Literal["service.started"] = "service.started"
    version: str
    pid: int
    replica: str | None = Field(
        None, description="SWITCHBOARD_REPLICA (docs/reference.md §12); null in older logs"
    )
    recovered: str | None = None


class ProviderAdded(BaseEvent):
    """A provider appeared; `changes` holds every field as {"old": null, "new": value}."""

    type: Literal["provider.added"] = "provider.added"
    subject: str


class ProviderUpdated(BaseEvent):
    """A provider changed; `changes` holds only the fields that differ (a rotated key too)."""

    type: Literal["provider.updated"] = "provider.updated"
    subject: str


class ProviderRemoved(BaseEvent):
    """A provider's file is gone; `changes` holds every field as {"old": value, "new": null}."""

    type: Literal["provider.removed"] = "provider.removed"
    subject: str


class RoutingUpdated(BaseEvent):
    """The routing changed; `changes` maps each purpose that differs to its old and new route."""

    type: Literal["routing.updated"] = "routing.updated"
    subject: str = "routing"


class ClientsUpdated(BaseEvent):
    """The clients changed; `changes` maps each client that differs to its old and new entry
    (`scopes`, `limits`, `token_sha256` masked as `****` and its last four: a token replaced alone
    is a change too; logs from before it have entries without it)."""

    type: Literal["clients.updated"] = "clients.updated"
    subject: str = "clients"


class ConfigRejected(BaseEvent):
    """A file (or a whole batch) was refused; the previous good configuration stays."""

    type: Literal["config.rejected"] = "config.rejected"
    file: str | None = None
    reason: str


class ProviderHealthChanged(BaseEvent):
    """A provider went healthy/unhealthy: `changes` = {"status": {"old", "new"}}. Transitions only."""

    type: Literal["provider.health_changed"] = "provider.health_changed"
    subject: str
    reason: str | None = None


class SecretRead(BaseEvent):
    """A `secrets:read` client was given a provider's decrypted key."""

    type: Literal["secret.read"] = "secret.read"
    subject: str = Field(description="the provider whose key was read")
    client: str
    purpose: str | None = None
    provider: Annotated[str | None, WithJsonSchema({"type": "string"})] = Field(
        None,
        description="the provider whose key was read, as `subject` (absent from older events)",
        exclude_if=lambda value: value is None,  # an older line read back is dumped as it was hashed
    )

    @model_validator(mode="before")
    @classmethod
    def _provider(cls, data: Any) -> Any:
        """A draft (no `seq` yet) names its `provider` as its `subject`; a line read back is as written."""
        if isinstance(data, dict) and not data.get("seq") and "provider" not in data and "subject" in data:
            return {**data, "provider": data["subject"]}
        return data


class SyncFailed(BaseEvent):
    """A pull that could not be applied (docs/reference.md §12), once per distinct failure: the branch cannot
    fast-forward (local commits, local edits, a remote rewritten) or the fetch failed. The
    replica goes on serving `commit`, what it has."""

    type: Literal["sync.failed"] = "sync.failed"
    subject: str = Field(description="what is pulled: REMOTE/BRANCH")
    reason: str
    remote_commit: str | None = Field(None, description="what the remote's branch is at; null if unknown")


class BudgetExhausted(BaseEvent):
    """A budget refused a request for the first time in its period (docs/reference.md §13): a client's (its
    request answered 429) or a provider's (skipped, the request fell back). Once per subject and
    period in each replica's log; nothing else of usage goes to the log."""

    type: Literal["budget.exhausted"] = "budget.exhausted"
    subject: str = Field(description="the client's name or the provider's id")
    kind: Literal["client", "provider"]
    period_end: str | None = Field(description="when the period ends, ISO 8601 UTC; null for `total`")


Event = Annotated[
    ServiceStarted
    | ProviderAdded
    | ProviderUpdated
    | ProviderRemoved
    | RoutingUpdated
    | ClientsUpdated
    | ConfigRejected
    | ProviderHealthChanged
    | SecretRead
    | SyncFailed
    | BudgetExhausted,
    Field(discriminator="type"),
]
"""One line of the event log."""

EVENT: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_TYPES: tuple[type[BaseEvent], ...] = get_args(get_args(Event)[0])  # the union's members


def event_log_schema() -> dict[str, Any]:
    """The JSON Schema of one line of the log."""
    schema = EVENT.json_schema(mode="serialization")
    schema["title"] = "Switchboard event"
    schema["description"] = "One line of the event log (JSON Lines, hash-chained)."
    return schema


def draft_from_change(
    change: view.Change, *, commit: str | None = None, author: str | None = None, uncommitted: bool = False
) -> Event:
    """The event draft recording one `view.Change`, ready for `EventLog.append`."""
    if change.type not in view.VIEW_CHANGING_TYPES:
        raise ValueError(f"not a configuration change: {change.type}")
    fields = {"type": change.type, "subject": change.subject, "file": change.file, "changes": change.changes}
    return EVENT.validate_python(fields | {"commit": commit, "author": author, "uncommitted": uncommitted})


def event_hash(data: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of an event's fields, leaving `hash` out."""
    body = {k: v for k, v in data.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_event(line: str | bytes) -> Event:
    """One line of the log as an event; ValueError when it is not one."""
    return EVENT.validate_json(line)

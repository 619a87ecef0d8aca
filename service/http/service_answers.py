"""What the service's own routes answer: liveness, readiness, the replicas and the git webhook
(docs/reference.md §12), as `GET /openapi.json` describes them (`service.http.answers`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from service.http.answers import Answer

# -- the service ----------------------------------------------------------------------------------


class Liveness(Answer):
    status: Literal["ok"]


class RefusedFile(Answer):
    file: str
    reason: str


class SyncAnswer(Answer):
    """The built-in pull (docs/reference.md §12): `failed` while the branch cannot fast-forward, and why."""

    status: Literal["ok", "failed"]
    reason: str | None
    remote_commit: str | None = Field(description="what the remote's branch is at; null before a fetch")


class EventLogAnswer(Answer):
    """The event log (docs/reference.md §5): `failed` while the file was replaced, removed,
    truncated or written by another hand under the service, and nothing is appended to it."""

    status: Literal["ok", "failed"]
    reason: str | None


class Readiness(Answer):
    """Ready once the first load is done; `refused` lists the files the last load set aside."""

    status: Literal["ready"]
    replica: str = Field(description="`SWITCHBOARD_REPLICA` (default: the host name)")
    generation: int
    last_applied_commit: str | None
    last_attempted_commit: str | None
    refused: list[RefusedFile]
    degraded: bool = Field(
        description="true while any file is refused, Redis is configured but away, the usage ledger "
        "is degraded, or the event log failed"
    )
    limits: Literal["redis", "local", "refuse"] = Field(
        description="where limits and budgets are counted: `redis`, or this replica alone (`local`; "
        "with Redis configured and away, `SWITCHBOARD_LIMITS_WITHOUT_REDIS`)"
    )
    ledger: Literal["ok", "degraded", "off"] = Field(
        description="the usage ledger (reference §13): `degraded` while its database cannot be reached "
        "(records wait in the spool), `off` with `SWITCHBOARD_USAGE_DB=off`"
    )
    event_log: EventLogAnswer
    sync: SyncAnswer | None = Field(None, description="only with `SWITCHBOARD_GIT_PULL`")


class ReplicaAnswer(Answer):
    """One replica and the commit it serves, as its last heartbeat said."""

    replica: str
    commit: str | None
    generation: int
    ready: bool
    seen_at: datetime = Field(description="when this replica last heard from it, UTC")


class ReplicasAnswer(Answer):
    """Every replica heard from in the last 10 s (with Redis), this one included."""

    replicas: list[ReplicaAnswer]
    shared: bool = Field(description="false without Redis (or while it is unreachable): this replica alone")


class HookAccepted(Answer):
    """A git host's notification, verified: a pull runs now."""

    status: Literal["accepted"]
    replica: str

"""The event log: an append-only, hash-chained JSON Lines file of what the service did.

One pydantic model per event type, in a union discriminated on `type`; the JSON Schema of
the log comes from them (`event_log_schema`). Each line carries `prev`, the hash of the event
before it (`GENESIS` for seq 1), and `hash`, the sha256 hex of the canonical JSON of the event
without its `hash` field, so that editing, deleting or reordering a line breaks the chain
(`verify`).

An event is built as a draft, `ProviderAdded(subject=..., file=..., changes=...)`, and
`EventLog.append` fills in `seq`, `ts`, `prev` and `hash`.

Events carry masks (`****5d80`), never secrets: the views they are diffed from are masked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from typing_extensions import TypedDict

from service import state
from service.errors import ChainBroken, EventLogError
from service.files import fsync_path

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
    """The clients changed; `changes` maps each client that differs to its old and new entry."""

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


Event = Annotated[
    ServiceStarted
    | ProviderAdded
    | ProviderUpdated
    | ProviderRemoved
    | RoutingUpdated
    | ClientsUpdated
    | ConfigRejected
    | ProviderHealthChanged
    | SecretRead,
    Field(discriminator="type"),
]
"""One line of the event log."""

_EVENT: TypeAdapter[Event] = TypeAdapter(Event)
_EVENT_TYPES: tuple[type[BaseEvent], ...] = get_args(get_args(Event)[0])  # the union's members
_E = TypeVar("_E", bound=BaseEvent)


def event_log_schema() -> dict[str, Any]:
    """The JSON Schema of one line of the log."""
    schema = _EVENT.json_schema(mode="serialization")
    schema["title"] = "Switchboard event"
    schema["description"] = "One line of the event log (JSON Lines, hash-chained)."
    return schema


def draft_from_change(
    change: state.Change, *, commit: str | None = None, author: str | None = None, uncommitted: bool = False
) -> Event:
    """The event draft recording one `state.Change`, ready for `EventLog.append`."""
    if change.type not in state.VIEW_CHANGING_TYPES:
        raise ValueError(f"not a configuration change: {change.type}")
    fields = {"type": change.type, "subject": change.subject, "file": change.file, "changes": change.changes}
    return _EVENT.validate_python(fields | {"commit": commit, "author": author, "uncommitted": uncommitted})


def event_hash(data: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of an event's fields, leaving `hash` out."""
    body = {k: v for k, v in data.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_event(line: str | bytes) -> Event:
    """One line of the log as an event; ValueError when it is not one."""
    return _EVENT.validate_json(line)


class EventLog:
    """The log file, opened for appending; one process at a time (an exclusive flock).

    Opening reads every event. A torn last line, left by a crash mid-write, is moved to
    `<path>.broken` and described in `recovered_tail`; the file is cut back to the last
    whole line. Lines that do not parse in the middle of the file are not repaired: opening
    fails, and `verify` names the first bad seq. The hash chain itself is checked by `verify`.
    """

    def __init__(self, path: Path | str, on_append: Callable[[BaseEvent], None] | None = None) -> None:
        self.path = Path(path)
        self.on_append = on_append
        """Called after each append (metrics count events by type here)."""
        self.recovered_tail: str | None = None
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            raise EventLogError(f"{self.path}: another process has the event log open") from exc
        try:
            if created:
                fsync_path(self.path.parent)
            self._events = self._load()
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> list[Event]:
        data = self.path.read_bytes()
        lines, tail = _split(data)
        if tail is not None:
            self._set_aside(tail, len(data) - len(tail), len(lines))
        events: list[Event] = []
        for number, line in enumerate(lines, start=1):
            try:
                events.append(parse_event(line))
            except ValueError as exc:
                raise EventLogError(
                    f"{self.path}: line {number} is not a valid event; run `switchboard audit verify`"
                ) from exc
        return events

    def _set_aside(self, tail: bytes, keep: int, whole_lines: int) -> None:
        broken = self.path.with_name(self.path.name + ".broken")
        existed = broken.exists()
        with broken.open("ab") as out:
            out.write(tail if tail.endswith(b"\n") else tail + b"\n")
            out.flush()
            os.fsync(out.fileno())
        if not existed:
            fsync_path(broken.parent)
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        self.recovered_tail = (
            f"a torn last line ({len(tail)} bytes after line {whole_lines}) was moved to {broken}"
        )

    def append(self, draft: _E) -> _E:
        """Write `draft` as the next event (seq, ts, prev, hash filled in): one write, fsynced."""
        if type(draft) not in _EVENT_TYPES:  # only what `parse_event` can read back
            raise TypeError(f"not an event type of the log: {type(draft).__name__}")
        with self._lock:
            if self._fd < 0:
                raise EventLogError(f"{self.path}: the event log is closed")
            last = self._events[-1] if self._events else None
            ts = now() if last is None else max(now(), last.ts)  # never backwards, for replay
            update = {"seq": self.last_seq + 1, "ts": ts, "prev": self.last_hash, "hash": ""}
            event = draft.model_copy(update=update)
            data = event.model_dump(mode="json", exclude={"prev", "hash"}) | {"prev": event.prev}
            try:
                data["hash"] = event_hash(data)
                line = (json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
            except ValueError as exc:
                raise EventLogError(f"{self.path}: event is not valid JSON: {exc}") from exc
            self._write(line)
            event = event.model_copy(update={"hash": data["hash"]})
            self._events.append(cast("Event", event))
        if self.on_append is not None:
            self.on_append(event)
        return event

    def _write(self, line: bytes) -> None:
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)  # one write: a crash leaves at most a torn tail
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            os.fsync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise EventLogError(f"{self.path}: cannot append: {exc}") from exc

    def events(self) -> list[Event]:
        """Every event in the log, oldest first (a copy of the list; the events are frozen)."""
        with self._lock:
            return list(self._events)

    @property
    def last_seq(self) -> int:
        """The seq of the last event, 0 for an empty log."""
        return self._events[-1].seq if self._events else 0

    @property
    def last_hash(self) -> str:
        """The hash of the last event, `GENESIS` for an empty log."""
        return self._events[-1].hash if self._events else GENESIS

    def close(self) -> None:
        """Release the file; appending afterwards is an error."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_events(path: Path | str) -> list[Event]:
    """The events of a log without opening it for writing (a torn last line is skipped)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    lines, _ = _split(data)
    try:
        return [parse_event(line) for line in lines]
    except ValueError as exc:
        message = f"{path}: the event log has invalid lines; run `switchboard audit verify`"
        raise EventLogError(message) from exc


def verify(path: Path | str) -> int:
    """Check the whole chain; the number of events, or ChainBroken naming the first bad seq."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EventLogError(f"{path}: cannot read the event log: {exc.strerror}") from exc
    prev = GENESIS
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    for seq, line in enumerate(raw_lines, start=1):
        if seq == len(raw_lines) and not data.endswith(b"\n"):
            raise ChainBroken(seq, "the last line is torn (no newline at its end)")
        try:
            record = json.loads(line)
        except ValueError:
            raise ChainBroken(seq, f"line {seq} is not valid JSON") from None
        if not isinstance(record, dict):
            raise ChainBroken(seq, f"line {seq} is not a JSON object")
        if record.get("seq") != seq:
            raise ChainBroken(seq, f"expected seq {seq} on line {seq}, found {record.get('seq')!r}")
        if record.get("prev") != prev:
            raise ChainBroken(seq, "prev is not the hash of the event before it")
        try:
            intact = record.get("hash") == event_hash(record)
        except ValueError:  # NaN or Infinity: json.loads takes them, canonical JSON does not
            intact = False
        if not intact:
            raise ChainBroken(seq, "hash does not match the event's content")
        try:
            _EVENT.validate_python(record)
        except ValidationError as exc:
            raise ChainBroken(seq, f"not a valid event ({exc.error_count()} errors)") from None
        prev = record["hash"]
    return len(raw_lines)


def _split(data: bytes) -> tuple[list[bytes], bytes | None]:
    """Whole lines, and a torn tail: bytes after the last newline, or a last line that is not JSON."""
    *lines, rest = data.split(b"\n")
    if rest:
        return lines, rest
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            torn = lines.pop()
            return lines, torn + b"\n"
    return lines, None

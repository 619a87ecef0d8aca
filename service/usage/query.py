"""What `/usage` and `/usage/requests` (and `switchboard usage`) ask the ledger, and the answers.

Parameters arrive as strings (a URL's query, the command line's flags); `UsageQuery.parse`
and `RequestsQuery.parse` check every one and raise BadRequest (400) naming what is wrong, so
nothing a caller sends reaches the database but as a bound value or a key from a fixed list.
The answers' shapes are docs/reference.md §13's exactly; `usage_csv` writes the same rows as CSV, its
columns the rows' keys.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from service.errors import BadRequest
from service.journal.replay import parse_time
from service.usage.record import Record, money
from service.usage.values import micros

GROUP_KEYS = ("client", "provider", "model", "purpose", "hour", "day", "month")
TIME_KEYS = frozenset({"hour", "day", "month"})
DEFAULT_SINCE = "7d"
MAX_REQUESTS = 1000
DEFAULT_REQUESTS = 100
MAX_GROUPS = 100_000
"""More rows than a caller can use (a year by hour, client and model): narrow the query."""
MAX_FILTER = 256
"""Longer filter values cannot match: stored text is cut to this length."""

GroupKey = tuple[str | None, ...]
Format = Literal["json", "csv"]


@dataclass(slots=True)
class Totals:
    """The counts and cost of a set of records: a row of `/usage` without its keys."""

    requests: int = 0
    errors: int = 0
    limited: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = field(default_factory=Decimal)

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.limited += other.limited
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cost_usd += other.cost_usd

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "limited": self.limited,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost_usd": money(self.cost_usd),
        }


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """`GET …/usage`: records in [since, until), grouped by `group_by`, filtered by the others."""

    since: datetime
    until: datetime
    group_by: tuple[str, ...] = ()
    client: str | None = None
    provider: str | None = None
    model: str | None = None
    format: Format = "json"

    @classmethod
    def parse(cls, params: Mapping[str, str], now: datetime) -> UsageQuery:
        """From a URL's query (or the command line's flags); BadRequest when anything is wrong."""
        _only(params, {"since", "until", "group_by", "client", "provider", "model", "format"})
        until = _time(params, "until", now) or now
        since = _time(params, "since", now) or parse_time(DEFAULT_SINCE, now)
        if since > until:
            raise BadRequest("`since` is after `until`")
        fmt = params.get("format") or "json"
        if fmt not in ("json", "csv"):
            raise BadRequest(f"`format` must be json or csv, not {fmt[:20]!r}")
        return cls(
            since=since,
            until=until,
            group_by=group_keys(params.get("group_by") or ""),
            client=_filter(params, "client"),
            provider=_filter(params, "provider"),
            model=_filter(params, "model"),
            format="csv" if fmt == "csv" else "json",
        )


@dataclass(frozen=True, slots=True)
class RequestsQuery:
    """`GET …/usage/requests`: the raw records, newest first, `limit` a page, after `cursor`."""

    since: datetime | None = None
    until: datetime | None = None
    client: str | None = None
    provider: str | None = None
    status: tuple[int, int] | None = None
    """The statuses asked for, inclusive: (404, 404), or (500, 599) for `5xx`."""
    limit: int = DEFAULT_REQUESTS
    cursor: tuple[int, str] | None = None
    """(ts in microseconds, id) of the last record of the previous page."""

    @classmethod
    def parse(cls, params: Mapping[str, str], now: datetime) -> RequestsQuery:
        _only(params, {"since", "until", "client", "provider", "status", "limit", "cursor"})
        since, until = _time(params, "since", now), _time(params, "until", now)
        if since is not None and until is not None and since > until:
            raise BadRequest("`since` is after `until`")
        return cls(
            since=since,
            until=until,
            client=_filter(params, "client"),
            provider=_filter(params, "provider"),
            status=_status(params.get("status")),
            limit=_limit(params.get("limit")),
            cursor=decode_cursor(params["cursor"]) if params.get("cursor") else None,
        )


def group_keys(text: str) -> tuple[str, ...]:
    """`client,day` as keys, checked against the list, each once, in the order given."""
    keys: list[str] = []
    for part in text.split(","):
        key = part.strip()
        if not key:
            continue
        if key not in GROUP_KEYS:
            raise BadRequest(f"`group_by`: {key[:40]!r} is not one of {', '.join(GROUP_KEYS)}")
        if key not in keys:
            keys.append(key)
    return tuple(keys)


# -- answers ----------------------------------------------------------------------------------------


def too_many_groups() -> BadRequest:
    return BadRequest(
        f"more than {MAX_GROUPS} groups: narrow `since`/`until`, filter, or group by fewer keys"
    )


def usage_answer(query: UsageQuery, groups: Mapping[GroupKey, Totals], shared: bool) -> dict[str, Any]:
    """docs/reference.md §13's answer: `{"since", "until", "group_by", "rows", "totals", "shared"}`."""
    totals = Totals()
    rows = []
    for key in sorted(groups, key=lambda k: tuple("" if v is None else v for v in k)):
        counted = groups[key]
        if counted.requests == 0:
            continue
        totals.add(counted)
        rows.append({**dict(zip(query.group_by, key, strict=True)), **counted.to_json()})
    return {
        "since": iso(query.since),
        "until": iso(query.until),
        "group_by": list(query.group_by),
        "rows": rows,
        "totals": totals.to_json(),
        "shared": shared,
    }


def usage_csv(answer: Mapping[str, Any]) -> str:
    """The answer's rows as CSV: a header of the rows' keys, then a line a row.

    A cell that a spreadsheet would run as a formula (a model named `=HYPERLINK(…)` by a
    client) is prefixed with `'`, as OWASP advises.
    """
    columns = [*answer["group_by"], *Totals().to_json()]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in answer["rows"]:
        writer.writerow([_cell(row[c]) for c in columns])
    return out.getvalue()


def requests_answer(records: list[Record], limit: int) -> dict[str, Any]:
    """`{"requests": [...], "next_cursor"}`, given up to `limit + 1` records (one more says there
    is a next page)."""
    page = records[:limit]
    more = len(records) > limit
    return {
        "requests": [r.to_json() for r in page],
        "next_cursor": encode_cursor(page[-1]) if more and page else None,
    }


def encode_cursor(record: Record) -> str:
    raw = json.dumps([micros(record.ts), record.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        ts, rid = json.loads(raw)
        if (
            isinstance(ts, int)
            and not isinstance(ts, bool)
            and isinstance(rid, str)
            and abs(ts) < 2**62
            and "\x00" not in rid
        ):
            rid.encode()  # a lone surrogate names no record, and no database binds it: ValueError
            return ts, rid
    except (binascii.Error, ValueError, TypeError, RecursionError):
        pass
    raise BadRequest("`cursor` is not one this service gave (use `next_cursor` as it is)")


def iso(value: datetime) -> str:
    """ISO 8601 UTC with `Z`."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def day_start(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def day_after(value: datetime) -> datetime:
    """The first midnight (UTC) at or after `value`."""
    start = day_start(value)
    return start if start == value else start + timedelta(days=1)


def hour_start(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_after(value: datetime) -> datetime:
    """The first hour boundary at or after `value`."""
    start = hour_start(value)
    return start if start == value else start + timedelta(hours=1)


# -- parameters --------------------------------------------------------------------------------------


def _only(params: Mapping[str, str], known: set[str]) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0][:40]!r}; known: {', '.join(sorted(known))}")


def _time(params: Mapping[str, str], name: str, now: datetime) -> datetime | None:
    text = params.get(name)
    if not text:
        return None
    try:
        value = parse_time(text, now)
    except ValueError as exc:
        raise BadRequest(f"`{name}`: {exc}") from None
    if not datetime(1971, 1, 1, tzinfo=UTC) <= value <= datetime(9000, 1, 1, tzinfo=UTC):
        raise BadRequest(f"`{name}` is out of range")
    return value


def _filter(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    if not value:
        return None
    if len(value) > MAX_FILTER:
        raise BadRequest(f"`{name}` is longer than {MAX_FILTER} characters")
    if "\x00" in value:  # stored text never holds one, and PostgreSQL refuses it in a parameter
        raise BadRequest(f"`{name}` holds a NUL character")
    return value


def _status(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    value = text.strip().lower()
    if len(value) == 3 and value.endswith("xx") and value[0] in "12345":
        low = int(value[0]) * 100
        return low, low + 99
    if value.isdigit() and len(value) == 3:
        return int(value), int(value)
    raise BadRequest(f"`status` must be an HTTP status (429) or a class (5xx), not {text[:20]!r}")


def _limit(text: str | None) -> int:
    if not text:
        return DEFAULT_REQUESTS
    digits = text.strip()
    if digits.isascii() and digits.isdigit() and len(digits) > 9:  # however large: the maximum
        return MAX_REQUESTS
    try:
        limit = int(digits)
    except ValueError:
        raise BadRequest(f"`limit` is not a whole number: {text[:20]!r}") from None
    if limit < 1:
        raise BadRequest("`limit` must be at least 1")
    return min(limit, MAX_REQUESTS)  # clamped, not refused (docs/reference.md §13)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value

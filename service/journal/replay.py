"""Reading the event log: the configuration at a time, events by filter, time arguments.

`replay` is what `state --at` and `GET /api/v1/llm-config/state?at=` stand on: applying the
events in order rebuilds the masked configuration exactly. `filter_events` and
`parse_time` serve `audit show` and `GET /api/v1/llm-config/audit`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TypeVar

from service.config.view import ConfigView, apply_change, empty_view
from service.journal.events import BaseEvent, to_utc
from service.journal.events import now as current_time

_E = TypeVar("_E", bound=BaseEvent)


def replay(events: Iterable[BaseEvent], at: datetime | None = None) -> ConfigView:
    """The configuration (masked) as it stood at `at` (default: now), rebuilt from the events."""
    limit = None if at is None else to_utc(at)
    config = empty_view()
    for event in events:
        if limit is None or event.ts <= limit:
            apply_change(config, event.type, event.subject, event.changes)  # in place
    return config


def filter_events(
    events: Iterable[_E],
    subject: str | None = None,
    type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[_E]:
    """Events matching every filter given, oldest first; `limit` keeps the most recent ones.

    `events` may be a stream (`iter_events`): it is read once.

    `type` is a type (`provider.updated`) or a family (`provider`); `since` and `until`
    are inclusive.
    """
    if limit is not None and limit <= 0:
        return []
    low = None if since is None else to_utc(since)
    high = None if until is None else to_utc(until)
    found: deque[_E] = deque(maxlen=limit)  # a stream of any length: only the last `limit` kept
    for e in events:
        if (
            (subject is None or e.subject == subject)
            and (type is None or e.type == type or e.type.startswith(type + "."))
            and (low is None or e.ts >= low)
            and (high is None or e.ts <= high)
        ):
            found.append(e)
    return list(found)


_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


_PLUS_AS_SPACE = re.compile(r"^(.*T[\d:.]+) (\d\d:?\d\d)$")
"""A time whose offset's `+` came through a URL's query as a space."""


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A time argument: ISO 8601 (naive = UTC), a date (midnight UTC), `now`, or `10m`/`2h`/`3d` ago."""
    reference = current_time() if now is None else to_utc(now)
    value = text.strip()
    if value == "now":
        return reference
    relative = _RELATIVE.match(value)
    try:
        if relative:
            amount, unit = relative.groups()
            return reference - timedelta(**{_UNITS[unit]: int(amount)})
        # a date alone is its midnight; RFC 3339's lower-case `t` and `z` are read too, and an
        # offset's `+` that a query string turned into a space (`?since=...T05:00:00 02:00`)
        return to_utc(datetime.fromisoformat(_PLUS_AS_SPACE.sub(r"\1+\2", value.upper())))
    except OverflowError:  # `99999999d` ago, or a time that leaves the calendar once in UTC
        raise ValueError(f"out of range: {text!r}") from None
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use ISO 8601 like 2026-11-27T05:33:08Z, a date, or 10m, 2h, 3d)"
        ) from None

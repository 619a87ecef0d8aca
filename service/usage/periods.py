"""A budget's periods (docs/reference.md §13): a UTC day, a week from Monday, a calendar month, or all time.

A request counts in the period in which it was admitted: one at 23:59:59.9 in the old day,
one at 00:00:00.0 in the new. Each period has a key that names it in counters
(`day:2026-12-04`, `week:2026-11-30`, `month:2026-12`, `total`), so a new period starts from
nothing without any job to run, and a changed budget amount keeps what was spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from service.config.metering import Period


@dataclass(frozen=True, slots=True)
class Window:
    """One period of a budget: its key, when it started and when it ends (None: never)."""

    key: str
    start: datetime
    end: datetime | None

    def seconds_left(self, now: datetime) -> float | None:
        """Seconds until the period ends (None for `total`)."""
        return None if self.end is None else max(0.0, (self.end - now).total_seconds())

    @property
    def end_text(self) -> str | None:
        """`period_end` as the API shows it: ISO 8601 UTC, or None for `total`."""
        return None if self.end is None else self.end.strftime("%Y-%m-%dT%H:%M:%SZ")


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def window(period: Period, now: datetime) -> Window:
    """The period of kind `period` that `now` (UTC) falls in."""
    now = now.astimezone(UTC)
    if period == "total":
        return Window("total", EPOCH, None)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return Window(f"day:{day:%Y-%m-%d}", day, day + timedelta(days=1))
    if period == "week":
        monday = day - timedelta(days=day.weekday())
        return Window(f"week:{monday:%Y-%m-%d}", monday, monday + timedelta(days=7))
    first = day.replace(day=1)
    following = (
        first.replace(year=first.year + 1, month=1)
        if first.month == 12
        else first.replace(month=first.month + 1)
    )
    return Window(f"month:{first:%Y-%m}", first, following)

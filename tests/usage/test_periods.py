"""Budget periods (docs/reference.md §13): UTC days, weeks from Monday, calendar months, all time."""

from __future__ import annotations

from datetime import UTC, datetime

from service.usage.periods import window


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_a_request_at_23_59_59_9_counts_in_the_old_day_and_one_at_midnight_in_the_new() -> None:
    old = window("day", at("2026-12-04T23:59:59.900"))
    new = window("day", at("2026-12-05T00:00:00.000"))
    assert old.key == "day:2026-12-04" and new.key == "day:2026-12-05"
    assert old.end == new.start and old.end_text == "2026-12-05T00:00:00Z"


def test_weeks_start_on_monday_and_months_roll_over_the_year() -> None:
    sunday = window("week", at("2026-12-06T12:00:00"))
    assert sunday.key == "week:2026-11-30" and sunday.end == at("2026-12-07T00:00:00")
    december = window("month", at("2026-12-31T23:00:00"))
    assert december.key == "month:2026-12" and december.end == at("2027-01-01T00:00:00")


def test_total_never_ends() -> None:
    total = window("total", at("2026-12-04T10:00:00"))
    assert total.key == "total" and total.end is None and total.end_text is None
    assert total.seconds_left(at("2030-01-01T00:00:00")) is None


def test_a_time_in_another_zone_is_taken_in_utc() -> None:
    from datetime import timedelta, timezone

    tokyo = datetime(2026, 12, 5, 8, 0, tzinfo=timezone(timedelta(hours=9)))  # 23:00 UTC the day before
    assert window("day", tokyo).key == "day:2026-12-04"

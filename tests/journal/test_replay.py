"""Reading the event log: replay at a time, filters, time arguments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.config.view import empty_view
from service.journal.events import ProviderHealthChanged, ServiceStarted
from service.journal.log import EventLog
from service.journal.reader import read_events
from service.journal.replay import filter_events, parse_time, replay
from tests.journal.test_events import record
from tests.support.views import provider_view


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "events.jsonl"


def test_replay_at_a_time_before_and_after_a_change(log_path: Path) -> None:
    v1 = {"providers": {"a": provider_view("a")}, "routing": {}, "clients": {}}
    v2 = {"providers": {"a": provider_view("a", base_url="https://b/v1")}, "routing": {}, "clients": {}}
    with EventLog(log_path) as log:
        log.append(ServiceStarted(version="0.1.0", pid=1))
        record(log, empty_view(), v1, commit="c1", author="Jane <j@x>")
        between = log.events()[-1].ts
        record(log, v1, v2, commit=None, uncommitted=True)
        changed_at = log.events()[-1].ts
        events = log.events()

    assert replay(events, at=between - timedelta(microseconds=1)) == empty_view()
    assert replay(events, at=between) == v1
    assert replay(events, at=changed_at - timedelta(microseconds=1)) == v1
    assert replay(events, at=changed_at) == v2
    assert replay(read_events(log_path)) == v2
    assert replay(events, at=changed_at.replace(tzinfo=None)) == v2


def test_filter_events_by_subject_type_time_and_limit(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append(ServiceStarted(version="0.1.0", pid=1))
        for pid in ("a", "b", "a"):
            log.append(ProviderHealthChanged(subject=pid, changes={"status": {"old": "x", "new": "y"}}))
        events = log.events()

    assert [e.seq for e in filter_events(events, subject="a")] == [2, 4]
    assert [e.seq for e in filter_events(events, type="provider")] == [2, 3, 4]
    assert [e.seq for e in filter_events(events, type="provider.health_changed", limit=2)] == [3, 4]
    assert [e.seq for e in filter_events(events, since=events[1].ts, until=events[2].ts)] == [2, 3]
    assert filter_events(events, type="provider.added") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T05:33:08Z", datetime(2026, 11, 27, 5, 33, 8, tzinfo=UTC)),
        ("2026-11-27T05:33:08", datetime(2026, 11, 27, 5, 33, 8, tzinfo=UTC)),
        ("2026-11-27T07:33:08+02:00", datetime(2026, 11, 27, 5, 33, 8, tzinfo=UTC)),
        ("2026-11-27", datetime(2026, 11, 27, tzinfo=UTC)),
        ("2026-11-27t05:33:08z", datetime(2026, 11, 27, 5, 33, 8, tzinfo=UTC)),
        ("2026-11-27T07:33:08 02:00", datetime(2026, 11, 27, 5, 33, 8, tzinfo=UTC)),
        ("2026-11-27T07:33:08.5 0200", datetime(2026, 11, 27, 5, 33, 8, 500000, tzinfo=UTC)),
        ("10m", datetime(2026, 11, 28, 11, 50, tzinfo=UTC)),
        ("2h", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
        ("3d", datetime(2026, 11, 25, 12, 0, tzinfo=UTC)),
        ("now", datetime(2026, 11, 28, 12, 0, tzinfo=UTC)),
    ],
)
def test_parse_time_reads_iso_dates_and_relative_ages(text: str, expected: datetime) -> None:
    assert parse_time(text, now=datetime(2026, 11, 28, 12, 0, tzinfo=UTC)) == expected


@pytest.mark.parametrize("text", ["yesterday", "10 minutes", "-3d", ""])
def test_parse_time_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="not a time"):
        parse_time(text)


@pytest.mark.parametrize(
    "text", ["99999999999d", "9999999w", "0001-01-01T00:00:00+14:00", "9999-12-31T23:00:00-05:00"]
)
def test_parse_time_refuses_a_time_out_of_the_calendar(text: str) -> None:
    """Found by schemathesis' probes of `?since=`: these raised OverflowError, a 500."""
    with pytest.raises(ValueError, match="out of range"):
        parse_time(text, now=datetime(2026, 11, 28, 12, 0, tzinfo=UTC))

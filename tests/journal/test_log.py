"""The log keeps an index, not the events: reading back from the file, bounded memory, counters."""

from __future__ import annotations

import os
import threading
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from service.config.view import diff_views, empty_view
from service.errors import EventLogError
from service.journal.events import (
    ConfigRejected,
    ProviderHealthChanged,
    SecretRead,
    ServiceStarted,
    draft_from_change,
)
from service.journal.log import EventLog
from service.journal.reader import read_events, verify
from service.journal.replay import filter_events, replay
from tests.journal.test_events import record
from tests.support.views import provider_view


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "events.jsonl"


def health(pid: str, new: str = "unhealthy") -> ProviderHealthChanged:
    return ProviderHealthChanged(subject=pid, changes={"status": {"old": "healthy", "new": new}})


def write_history(path: Path, rounds: int) -> None:
    """A log that changes the configuration, checks health and reads secrets, `rounds` times."""
    view = empty_view()
    with EventLog(path) as log:
        log.append(ServiceStarted(version="0.1.0", pid=1))
        for n in range(rounds):
            target = {
                "providers": {
                    "a": provider_view("a", base_url=f"https://a{n}/v1"),
                    **({"b": provider_view("b")} if n % 3 else {}),
                },
                "routing": {"chat": {"primary": ["a"], "weights": {}, "fallbacks": []}},
                "clients": {},
            }
            record(log, view, target, commit=f"{n:040x}")
            view = target
            log.append(health("a"))
            log.append(SecretRead(subject="a", client="ops"))


def test_opening_a_long_log_keeps_no_event_in_memory(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What is tested is opening the log. Writing it is no part of that: 20,000 fsyncs took over
    # a minute on a disk shared with other work, so the log is written without them.
    with monkeypatch.context() as writing, EventLog(log_path) as log:
        writing.setattr(os, "fsync", lambda fd: None)
        for n in range(20_000):
            log.append(health(f"p{n % 50}", "healthy" if n % 2 else "unhealthy"))
    size = log_path.stat().st_size

    tracemalloc.start()
    try:
        opened = EventLog(log_path)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with opened:
        # 25 bytes of index an event, not the events (which would be several times the file)
        assert held < 1_000_000 < size
        assert opened.last_seq == 20_000
        assert [e.seq for e in opened.events_after(19_998)] == [19_999, 20_000]


def test_events_after_reads_in_order_from_the_file_up_to_a_limit(log_path: Path) -> None:
    write_history(log_path, 30)
    with EventLog(log_path) as log:
        everything = read_events(log_path)
        assert list(log.events_after(0)) == everything
        assert [e.seq for e in log.events_after(10, limit=3)] == [11, 12, 13]
        assert list(log.events_after(log.last_seq)) == []
        assert list(log.events_after(log.last_seq + 5)) == []
        after = log.append(health("b"))
        assert list(log.events_after(after.seq - 1)) == [after]


def test_events_after_reads_from_a_worker_thread_while_appends_go_on(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append(ServiceStarted(version="0.1.0", pid=1))
        done = threading.Event()
        seen: list[int] = []
        failures: list[BaseException] = []

        def follow() -> None:
            try:
                while not done.is_set() or seen[-1] < log.last_seq:
                    seen.extend(e.seq for e in log.events_after(seen[-1] if seen else 0))
            except BaseException as exc:
                failures.append(exc)

        reader = threading.Thread(target=follow)
        reader.start()
        for n in range(300):
            log.append(SecretRead(subject=f"p{n}", client="ops"))
        done.set()
        reader.join(timeout=30)

    assert not failures
    assert seen == list(range(1, 302))


def test_replay_and_select_from_the_file_agree_with_the_events(log_path: Path) -> None:
    write_history(log_path, 40)
    events = read_events(log_path)
    with EventLog(log_path) as log:
        for event in [*events[::7], events[-1]]:
            for at in (event.ts, event.ts - timedelta(microseconds=1)):
                included = [e for e in events if e.ts <= at]
                assert log.replay(at) == (included[-1].seq if included else 0, replay(events, at))
        assert log.replay() == (events[-1].seq, replay(events))
        assert log.checkpoint() == replay(events)
        middle = events[len(events) // 2].ts
        for filters in (
            {},
            {"subject": "b"},
            {"type": "provider"},
            {"type": "provider.updated", "limit": 5},
            {"subject": "a", "type": "secret.read", "since": middle},
            {"until": middle, "limit": 3},
            {"type": "nothing"},
        ):
            assert log.select(**filters) == filter_events(events, **filters), filters


def test_config_index_skips_secret_reads_and_starts_and_survives_a_restart(log_path: Path) -> None:
    with EventLog(log_path) as log:
        assert log.config_index == 0
        log.append(ServiceStarted(version="0.1.0", pid=1))
        assert log.config_index == 0
        rejected = log.append(ConfigRejected(file="providers.d/x.yaml", reason="bad"))
        assert log.config_index == rejected.seq
        changed = log.append(health("a"))
        log.append(SecretRead(subject="a", client="ops"))
        assert log.config_index == changed.seq
    with EventLog(log_path) as reopened:
        assert reopened.config_index == changed.seq
        reopened.append(ServiceStarted(version="0.1.0", pid=2))
        assert reopened.config_index == changed.seq


def test_the_checkpoint_follows_appends_and_is_the_callers_copy(log_path: Path) -> None:
    v1 = {"providers": {"a": provider_view("a")}, "routing": {}, "clients": {}}
    with EventLog(log_path) as log:
        record(log, empty_view(), v1)
        held = log.checkpoint()
        assert held == v1
        held["providers"].clear()
        assert log.checkpoint() == v1
    with EventLog(log_path) as reopened:
        assert reopened.checkpoint() == v1


def test_every_on_append_callback_runs_even_after_one_fails(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, int]] = []

    def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    with EventLog(log_path, on_append=lambda e: seen.append(("first", e.seq))) as log:
        log.on_append += [broken, lambda e: seen.append(("last", e.seq))]
        event = log.append(ServiceStarted(version="0.1.0", pid=1))

    assert seen == [("first", 1), ("last", 1)]
    assert event.seq == 1 and read_events(log_path) == [event]
    assert "on_append callback failed" in caplog.text


def test_the_file_a_routing_change_named_is_remembered_across_a_restart(log_path: Path) -> None:
    v1 = {"providers": {"a": provider_view("a")}, "routing": {"chat": {"primary": ["a"]}}, "clients": {}}
    with EventLog(log_path) as log:
        assert log.last_file_of("routing.updated") is None
        for change in diff_views(empty_view(), v1, routing_file="providers.d/routes.yaml", clients_file=None):
            log.append(draft_from_change(change))
    with EventLog(log_path) as reopened:
        assert reopened.last_file_of("routing.updated") == "providers.d/routes.yaml"
        assert reopened.last_file_of("clients.updated") is None


def _truncate(path: Path) -> None:
    path.write_bytes(b"")


def _replace(path: Path) -> None:
    copy = path.with_name("copy.jsonl")
    copy.write_bytes(path.read_bytes())
    copy.replace(path)


def _remove(path: Path) -> None:
    path.unlink()


def _append(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b'{"seq": 99}\n')


def _edit_last_line(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-3] + b"X" + data[-2:])  # same length, in place


def _a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    ("tamper", "fault"),
    [
        (_truncate, "truncated"),
        (_replace, "replaced"),
        (_remove, "removed"),
        (_a_directory, "replaced"),
        (_append, "written to by another hand"),
        (_edit_last_line, "last line was changed"),
    ],
)
def test_a_file_changed_under_the_log_is_neither_appended_to_nor_read(
    log_path: Path, tamper: Callable[[Path], None], fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    with EventLog(log_path) as log:
        log.append(ServiceStarted(version="0.1.0", pid=1))
        log.append(health("a"))
        tamper(log_path)
        before = log_path.read_bytes() if log_path.is_file() else None

        for attempt in (
            lambda: log.append(health("b")),
            lambda: list(log.events_after(0)),
            lambda: log.select(),
            lambda: log.replay(),
            log.check,
        ):
            with pytest.raises(EventLogError, match=fault):
                attempt()
        # nothing appended: no event whose `prev` forks the chain from what is there now
        assert (log_path.read_bytes() if log_path.is_file() else None) == before
        assert log.last_seq == 2 and log.fault is not None and fault in log.fault
    assert caplog.text.count(fault) == 1  # logged once, not at each refusal


def test_a_log_moved_back_under_the_service_is_appended_to_again(log_path: Path) -> None:
    aside = log_path.with_name("aside.jsonl")
    with EventLog(log_path) as log:
        log.append(ServiceStarted(version="0.1.0", pid=1))
        log_path.rename(aside)
        with pytest.raises(EventLogError, match="removed or moved away"):
            log.append(health("a"))
        aside.rename(log_path)
        log.append(health("a"))
        assert log.fault is None
        assert [e.seq for e in log.events_after(0)] == [1, 2]
    assert verify(log_path) == 2


def test_a_log_made_unreadable_under_the_service_is_still_read_and_appended_to(log_path: Path) -> None:
    with EventLog(log_path) as log:
        log.append(ServiceStarted(version="0.1.0", pid=1))
        log_path.chmod(0)
        try:
            log.append(health("a"))
            assert [e.seq for e in log.select()] == [1, 2]  # through the file it holds open
        finally:
            log_path.chmod(0o600)
    assert verify(log_path) == 2


def test_a_log_that_is_a_fifo_is_refused_at_once(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True)
    os.mkfifo(log_path)
    with pytest.raises(EventLogError, match="not a regular file"):
        EventLog(log_path)  # not read: nothing would ever end it

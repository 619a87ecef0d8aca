"""The event log on real files: the hash chain, crash recovery, verify, replay and queries."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config.view import ConfigView, diff_views, empty_view
from service.errors import ChainBroken, EventLogError
from service.journal.events import (
    GENESIS,
    ConfigRejected,
    ProviderAdded,
    ProviderHealthChanged,
    ProviderUpdated,
    SecretRead,
    ServiceStarted,
    draft_from_change,
    event_log_schema,
    parse_event,
)
from service.journal.log import EventLog
from service.journal.reader import read_events, verify
from service.journal.replay import filter_events, replay
from tests.support.strategies import views
from tests.support.views import provider_view

SECRET = "sk-or-v1-0123456789abcdef5d80"


def record(log: EventLog, old: ConfigView, new: ConfigView, **git: Any) -> None:
    for change in diff_views(old, new, routing_file="providers.d/routing.yaml", clients_file=None):
        log.append(draft_from_change(change, **git))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "events.jsonl"


def write_events(path: Path, count: int) -> None:
    with EventLog(path) as log:
        log.append(ServiceStarted(version="0.1.0", pid=1))
        for n in range(2, count + 1):
            log.append(ProviderHealthChanged(subject=f"p{n}", changes={"status": {"old": "a", "new": "b"}}))


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_appended_events_read_back_and_verify(log_path: Path) -> None:
    with EventLog(log_path) as log:
        started = log.append(ServiceStarted(version="0.1.0", pid=42))
        added = log.append(
            ProviderAdded(subject="a", file="providers.d/a.yaml", commit=None, uncommitted=True)
        )

    assert log_path.parent.is_dir()
    assert (started.seq, added.seq) == (1, 2)
    assert verify(log_path) == 2
    with EventLog(log_path) as reopened:
        assert reopened.events() == [started, added]
        assert (reopened.last_seq, reopened.last_hash) == (2, added.hash)
        assert reopened.recovered_tail is None
    assert read_events(log_path) == [started, added]


def test_hash_is_sha256_of_the_canonical_json_without_the_hash_field(log_path: Path) -> None:
    write_events(log_path, 3)

    prev = GENESIS
    for line in lines(log_path):
        event = json.loads(line)
        body = {k: v for k, v in event.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert event["hash"] == hashlib.sha256(canonical.encode()).hexdigest()
        assert event["prev"] == prev
        prev = event["hash"]


def test_line_matches_the_spec_example_format(log_path: Path) -> None:
    changes = {"base_url": {"old": "https://a/v1", "new": "https://b/v1"}}
    with EventLog(log_path) as log:
        log.append(ProviderUpdated(subject="o", file="providers.d/o.yaml", commit="3f2a9c1", changes=changes))

    event = json.loads(lines(log_path)[0])
    assert list(event)[:2] == ["seq", "ts"]
    assert list(event)[-2:] == ["prev", "hash"]
    assert datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert event["ts"].endswith("Z") and len(event["ts"]) == len("2026-11-27T05:33:08.123456Z")
    assert (event["commit"], event["uncommitted"], event["changes"]) == ("3f2a9c1", False, changes)


def test_spec_example_event_parses() -> None:
    example = {
        "seq": 7,
        "ts": "2026-11-27T05:33:08.123456Z",
        "type": "provider.updated",
        "subject": "openrouter-default",
        "file": "providers.d/openrouter-default.yaml",
        "commit": "3f2a9c1",
        "author": "Jane Doe <jane@example.com>",
        "changes": {
            "base_url": {"old": "https://a/v1", "new": "https://b/v1"},
            "api_key": {"old": "****5d80", "new": "****9a1c"},
        },
        "prev": "0" * 64,
        "hash": "f" * 64,
    }

    event = parse_event(json.dumps(example))

    assert isinstance(event, ProviderUpdated)
    assert event.ts == datetime(2026, 11, 27, 5, 33, 8, 123456, tzinfo=UTC)
    assert event.model_dump(mode="json")["ts"] == example["ts"]


def test_schema_has_one_definition_per_event_type() -> None:
    schema = event_log_schema()

    assert set(schema["discriminator"]["mapping"]) == {
        "service.started",
        "provider.added",
        "provider.updated",
        "provider.removed",
        "routing.updated",
        "clients.updated",
        "config.rejected",
        "provider.health_changed",
        "secret.read",
        "sync.failed",
        "budget.exhausted",
    }
    assert "hash" in schema["$defs"]["SecretRead"]["required"]
    json.dumps(schema)


def test_torn_last_line_is_set_aside_reported_and_the_log_keeps_appending(log_path: Path) -> None:
    write_events(log_path, 3)
    intact = log_path.read_bytes()
    torn = b'{"seq": 4, "ts": "2026-11-27T05:3'
    log_path.write_bytes(intact + torn)
    with pytest.raises(ChainBroken) as broken:
        verify(log_path)
    assert broken.value.seq == 4

    with EventLog(log_path) as log:
        assert log.recovered_tail is not None
        assert "events.jsonl.broken" in log.recovered_tail
        assert log.last_seq == 3
        log.append(ConfigRejected(file="providers.d/x.yaml", reason="schema: unknown field"))

    assert log_path.with_name("events.jsonl.broken").read_bytes() == torn + b"\n"
    assert log_path.read_bytes().startswith(intact)
    assert verify(log_path) == 4


def test_a_second_torn_line_is_appended_to_the_broken_file(log_path: Path) -> None:
    write_events(log_path, 1)
    for garbage in (b"{not json}\n", b'{"seq"'):
        with log_path.open("ab") as out:
            out.write(garbage)
        EventLog(log_path).close()

    assert log_path.with_name("events.jsonl.broken").read_bytes() == b'{not json}\n{"seq"\n'
    assert verify(log_path) == 1


def test_tampered_middle_line_is_named_by_verify(log_path: Path) -> None:
    write_events(log_path, 5)
    text = lines(log_path)
    text[2] = text[2].replace('"p3"', '"p9"')
    log_path.write_text("\n".join(text) + "\n", encoding="utf-8")

    with pytest.raises(ChainBroken) as broken:
        verify(log_path)

    assert broken.value.seq == 3
    assert "seq 3" in str(broken.value)


def test_rehashed_tampered_line_breaks_the_next_link(log_path: Path) -> None:
    write_events(log_path, 5)
    text = lines(log_path)
    event = json.loads(text[2])
    event["subject"] = "p9"
    body = {k: v for k, v in event.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    event["hash"] = hashlib.sha256(canonical.encode()).hexdigest()
    text[2] = json.dumps(event)
    log_path.write_text("\n".join(text) + "\n", encoding="utf-8")

    with pytest.raises(ChainBroken) as broken:
        verify(log_path)

    assert broken.value.seq == 4


def test_deleted_middle_line_is_named_by_verify(log_path: Path) -> None:
    write_events(log_path, 6)
    text = lines(log_path)
    del text[3]
    log_path.write_text("\n".join(text) + "\n", encoding="utf-8")

    with pytest.raises(ChainBroken) as broken:
        verify(log_path)

    assert broken.value.seq == 4


def test_verify_counts_an_empty_log_and_refuses_a_missing_one(log_path: Path) -> None:
    EventLog(log_path).close()

    assert verify(log_path) == 0
    with pytest.raises(EventLogError, match="cannot read"):
        verify(log_path.with_name("missing.jsonl"))


def test_garbage_in_the_middle_is_not_repaired_on_open(log_path: Path) -> None:
    write_events(log_path, 3)
    text = lines(log_path)
    text[1] = "{oops"
    log_path.write_text("\n".join(text) + "\n", encoding="utf-8")

    with pytest.raises(EventLogError, match="line 2"):
        EventLog(log_path)
    with pytest.raises(ChainBroken) as broken:
        verify(log_path)
    assert broken.value.seq == 2
    assert not log_path.with_name("events.jsonl.broken").exists()


def test_only_one_process_appends_at_a_time(log_path: Path) -> None:
    with EventLog(log_path), pytest.raises(EventLogError, match="another process"):
        EventLog(log_path)


def test_appending_after_close_is_an_error(log_path: Path) -> None:
    log = EventLog(log_path)
    log.close()
    with pytest.raises(EventLogError, match="closed"):
        log.append(ServiceStarted(version="0.1.0", pid=1))


def test_concurrent_appends_keep_one_unbroken_chain(log_path: Path) -> None:
    with EventLog(log_path) as log:

        def append_many(name: str) -> None:
            for _ in range(25):
                log.append(SecretRead(subject="a", client=name))

        threads = [threading.Thread(target=append_many, args=(f"c{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert verify(log_path) == 100
    timestamps = [e.ts for e in read_events(log_path)]
    assert timestamps == sorted(timestamps)


def test_secrets_never_reach_the_log_only_their_masks(log_path: Path) -> None:
    old: ConfigView = {
        "providers": {"a": provider_view("a", api_key="****5d80")},
        "routing": {},
        "clients": {},
    }
    new: ConfigView = {
        "providers": {"a": provider_view("a", api_key="****5d80")},
        "routing": {},
        "clients": {},
    }
    with EventLog(log_path) as log:
        record(log, empty_view(), old)
        for change in diff_views(old, new, frozenset({"a"}), routing_file=None, clients_file=None):
            log.append(draft_from_change(change))

    text = log_path.read_text(encoding="utf-8")
    assert SECRET not in text
    assert SECRET[:-4] not in text
    [rotated] = filter_events(read_events(log_path), type="provider.updated")
    assert rotated.changes == {"api_key": {"old": "****5d80", "new": "****5d80"}}


def test_a_value_json_cannot_hold_is_refused_and_nothing_is_written(log_path: Path) -> None:
    with EventLog(log_path) as log:
        with pytest.raises(EventLogError, match="not valid JSON"):
            log.append(ProviderAdded(subject="a", changes={"timeout_s": {"old": None, "new": float("inf")}}))
        assert log.last_seq == 0
        log.append(ServiceStarted(version="0.1.0", pid=1))

    assert verify(log_path) == 1


def test_a_draft_with_a_commit_cannot_be_uncommitted() -> None:
    with pytest.raises(ValueError, match="uncommitted"):
        ProviderAdded(subject="a", commit="abc", uncommitted=True)


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(views, min_size=1, max_size=4))
def test_replaying_the_log_rebuilds_each_view_after_a_json_round_trip(
    tmp_path: Path, sequence: list[ConfigView]
) -> None:
    path = tmp_path / f"events-{len(list(tmp_path.iterdir()))}.jsonl"
    view = empty_view()
    with EventLog(path) as log:
        for target in sequence:
            record(log, view, target)
            view = target
            rebuilt = replay(read_events(path))
            assert json.dumps(rebuilt, sort_keys=True) == json.dumps(target, sort_keys=True)
    assert verify(path) == len(read_events(path))


def test_a_secret_read_names_its_provider_and_an_older_one_without_it_still_verifies(log_path: Path) -> None:
    """docs/reference.md §5: `secret.read` (client, provider). A line written before `provider` was
    added verifies, reads back, replays and is shown (`/audit`) as it was hashed; the schema of
    the log takes both."""
    old = {
        "seq": 1,
        "ts": "2026-11-27T05:33:08.123456Z",
        "type": "secret.read",
        "subject": "openrouter-main",
        "file": None,
        "commit": None,
        "author": None,
        "uncommitted": False,
        "changes": {},
        "prev": GENESIS,
        "client": "deployer",
        "purpose": "chat",
    }
    old["hash"] = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    log_path.parent.mkdir()
    log_path.write_text(json.dumps(old) + "\n")
    with EventLog(log_path) as log:
        log.append(SecretRead(subject="gpu", provider="gpu", client="deployer", purpose="chat"))
        log.append(SecretRead(subject="gpu", client="ops"))  # a draft names it as its subject
    assert verify(log_path) == 3
    first, second, third = read_events(log_path)
    shown = first.model_dump(mode="json")
    assert "provider" not in shown and shown == old  # as it was hashed
    assert [e["provider"] for e in map(json.loads, lines(log_path)[1:])] == ["gpu", "gpu"]
    assert (second.model_dump(mode="json")["provider"], third.subject) == ("gpu", "gpu")
    assert replay([first, second, third]) == empty_view()
    schema = event_log_schema()
    assert schema["$defs"]["SecretRead"]["properties"]["provider"]["type"] == "string"
    for line in lines(log_path):
        jsonschema.validate(json.loads(line), schema)

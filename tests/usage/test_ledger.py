"""The ledger end to end with real parts: a spool on disk, SQLite or a real PostgreSQL, crashes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from service.errors import LedgerUnavailable
from service.usage import drain as drain_module
from service.usage import encoding
from service.usage import spool as spool_module
from service.usage import values as bounds
from service.usage.encoding import encode, values_of
from service.usage.ledger import Ledger
from service.usage.query import RequestsQuery, UsageQuery
from service.usage.record import Record
from service.usage.spool import TORN, Spool, SpoolBusy
from service.usage.stores import SQLStore, open_store, sql
from tests.conftest import eventually
from tests.support.postgres import PostgresServer
from tests.usage.conftest import NOW, record

ROOT = Path(__file__).resolve().parents[2]


def make_ledger(url: str, tmp_path: Path, **options: Any) -> Ledger:
    return Ledger(open_store(url, tmp_path), tmp_path / "spool", retry_max_s=0.2, **options)


@pytest.fixture
async def ledger(store_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    made = make_ledger(store_url, tmp_path)
    await made.start()
    try:
        yield made
    finally:
        await made.stop()


def _spooled(tmp_path: Path, good: list[Record], poison: bytes, at: int) -> Path:
    """A spool whose one segment holds `good`'s lines with `poison` among them, at `at`."""
    spool = tmp_path / "spool"
    spool.mkdir()
    lines = [encode(r) for r in good]
    lines.insert(at, poison)
    (spool / "000000000001.jsonl").write_bytes(b"".join(lines))
    return spool


def stored_ids(url: str, tmp_path: Path) -> list[str]:
    """Every id in the database, repeated ones repeated (read with a store of its own)."""
    store = open_store(url, tmp_path)
    assert store is not None
    try:
        store.open()
        return [r.id for r in store.requests(RequestsQuery(limit=10**9))]
    finally:
        store.close()


def totals(store: SQLStore, **params: str) -> dict[str, Any]:
    query = UsageQuery.parse({"since": "2000-01-01", **params}, datetime.now(UTC) + timedelta(days=1))
    groups = store.grouped(query)
    return {"requests": sum(t.requests for t in groups.values())}


async def test_a_submitted_record_is_stored_within_two_seconds_without_being_asked(ledger: Ledger) -> None:
    submitted = record()
    ledger.submit(submitted)
    started = asyncio.get_running_loop().time()

    async def stored() -> bool:
        page = await ledger.requests(RequestsQuery())
        return [r["id"] for r in page["requests"]] == [submitted.id]

    await eventually(stored, timeout=2)
    assert asyncio.get_running_loop().time() - started < 2
    answer = await ledger.usage(UsageQuery.parse({"since": "2026-11-27"}, NOW + timedelta(hours=1)))
    assert answer["totals"]["requests"] == 1  # the rollups too

    def spool_empty() -> bool:  # the segment goes just after its commit (fsyncs in between)
        written = 0
        for segment in ledger.spool_dir.glob("*.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                written += segment.stat().st_size
        return written == 0

    await eventually(spool_empty, timeout=2)


async def test_spent_counts_stored_records_and_those_still_in_the_spool(ledger: Ledger) -> None:
    for cost in ("0.10", "0.25", "1.5"):
        ledger.submit(record(cost_usd=Decimal(cost), client="budgeted"))
    ledger.submit(record(cost_usd=Decimal(7), client="someone-else"))
    ledger.submit(record(cost_usd=Decimal(9), client="budgeted", ts=NOW - timedelta(days=40)))
    assert await ledger.spent("client", "budgeted", NOW - timedelta(days=30)) == Decimal("1.85")
    assert await ledger.spent("provider", "openai", NOW - timedelta(days=365)) == Decimal("17.85")


async def test_spent_before_a_time_cuts_whole_hours_and_ragged_ends_alike(ledger: Ledger) -> None:
    """What a budget new in the configuration had spent before it came (`until`): rollups for the
    whole hours between, records for the partial hours at either end."""
    hour = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    for minutes, cost in ((10, 1), (90, 2), (120, 4), (170, 8), (185, 16)):
        ledger.submit(record(ts=hour + timedelta(minutes=minutes), cost_usd=Decimal(cost), client="c"))
    spent = ledger.spent
    assert await spent("client", "c", hour) == 31
    assert await spent("client", "c", hour, hour + timedelta(hours=3)) == 15
    assert await spent("client", "c", hour + timedelta(minutes=20), hour + timedelta(minutes=160)) == 6
    assert await spent("client", "c", hour + timedelta(minutes=125), hour + timedelta(minutes=175)) == 8
    assert await spent("client", "c", hour, hour + timedelta(minutes=10)) == 0


async def test_a_spool_of_an_earlier_version_with_exponent_costs_is_stored_exactly(
    store_url: str, tmp_path: Path
) -> None:
    """Lines written before issue 22 say `"7.5E-7"` where lines now say `"0.00000075"`: a spool
    left by the earlier version is stored all the same, at the same exact costs."""
    spool = tmp_path / "spool"
    spool.mkdir()
    old = [record(client="old", cost_usd=Decimal(text)) for text in ("7.5E-7", "1.25E-5", "2E+1")]
    lines = []
    for sent in old:
        values = json.loads(encode(sent))
        values[18] = str(sent.cost_usd)  # as the earlier `fields` wrote it: str(Decimal)
        lines.append(json.dumps(values, separators=(",", ":")).encode() + b"\n")
    assert b'"7.5E-7"' in lines[0]
    new = record(client="old", cost_usd=Decimal("0.00000075"))
    (spool / "000000000003.jsonl").write_bytes(b"".join(lines) + encode(new))
    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        assert await ledger.spent("client", "old", NOW - timedelta(days=1)) == Decimal("20.0000140")
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in [*old, new])
        assert not (spool / TORN).exists()
    finally:
        await ledger.stop()


async def test_a_graceful_stop_stores_the_spool_first(store_url: str, tmp_path: Path) -> None:
    ledger = make_ledger(store_url, tmp_path, linger_s=30)  # its thread would wait a long time
    await ledger.start()
    submitted = [record() for _ in range(50)]
    for r in submitted:
        ledger.submit(r)
    await ledger.stop()
    assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in submitted)


async def test_a_segment_stored_but_not_yet_removed_is_not_stored_twice(
    store_url: str, tmp_path: Path
) -> None:
    """A crash between a batch's commit and its segment's removal: the next start stores it again."""
    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    submitted = [record() for _ in range(30)]
    for r in submitted:
        ledger.submit(r)
    await ledger.flush()
    await ledger.stop()
    again = tmp_path / "spool" / "000000000001.jsonl"  # as if it had never been removed
    again.write_bytes(b"".join(encode(r) for r in submitted))

    restarted = make_ledger(store_url, tmp_path)
    await restarted.start()
    try:
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in submitted)
        assert restarted.store is not None
        assert totals(restarted.store) == {"requests": 30}  # rollups not counted twice
        assert not again.exists()
    finally:
        await restarted.stop()


async def test_a_torn_line_is_set_aside_and_the_rest_stored(store_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [record(), record()]
    torn = encode(record())[:40]
    (spool / "000000000007.jsonl").write_bytes(encode(good[0]) + b"not a record\n" + encode(good[1]) + torn)

    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in good)
        aside = (spool / TORN).read_bytes()
        assert b"not a record" in aside and torn in aside
    finally:
        await ledger.stop()


async def test_a_record_the_database_refuses_is_set_aside_and_holds_nothing_back(
    store_url: str, tmp_path: Path
) -> None:
    """A line no database takes (a cost past 64 bits, written by hand or an older version)."""
    good = [record() for _ in range(9)]
    poison = encode(record(id="poison")).replace(b'"0.000825"', b'"1e30"')
    spool = _spooled(tmp_path, good, poison, at=4)

    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in good)
        assert b"poison" in (spool / TORN).read_bytes()
    finally:
        await ledger.stop()


async def test_a_line_whose_cost_is_a_number_holds_nothing_back(store_url: str, tmp_path: Path) -> None:
    """A line written by hand may give its cost as a JSON number (`0.000825`, not the text
    `"0.000825"`): it is read as a decimal cost, and stored, as it was before costs were read
    from their digits; the lines after it are stored too."""
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [record() for _ in range(3)]
    numeric = encode(record(id="numeric")).replace(b'"0.000825"', b"0.000825")
    assert b",0.000825," in numeric
    (spool / "000000000001.jsonl").write_bytes(encode(good[0]) + numeric + b"".join(map(encode, good[1:])))

    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(["numeric", *(r.id for r in good)])
        assert not (spool / TORN).exists()
        assert await ledger.spent("client", good[0].client, NOW - timedelta(days=1)) == 4 * Decimal(
            "0.000825"
        )
    finally:
        await ledger.stop()


async def test_a_line_with_a_lone_surrogate_holds_nothing_back(store_url: str, tmp_path: Path) -> None:
    """A spool line (an older version's, or written by hand) may hold an escaped lone surrogate
    (`"gpt\\ud800"`), which json's module reads and neither database binds: setting it aside
    wrote it with `dumps`' fallback, which could not encode it either, so every drain cycle
    failed on it and held back every record behind it. Now it is kept, and the rest stored."""
    good = [record() for _ in range(5)]
    poison = encode(record(id="poison")).replace(b'"gpt-4o"', b'"gpt\\ud800"', 1)
    spool = _spooled(tmp_path, good, poison, at=2)

    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        await ledger.flush()
        assert ledger.state == "ok"
        assert set(stored_ids(store_url, tmp_path)) >= {r.id for r in good}
        answer = await ledger.usage(UsageQuery.parse({"since": "2026-11-27"}, NOW + timedelta(hours=1)))
        assert answer["totals"]["requests"] >= len(good)
    finally:
        await ledger.stop()
    assert not list(spool.glob("*.jsonl"))  # the segment is stored, not tried again each cycle
    kept = (spool / TORN).read_bytes() if (spool / TORN).exists() else b""
    if b"poison" in kept:  # set aside: as the line said it
        assert kept.splitlines()[-1] + b"\n" == poison
    else:
        assert "poison" in stored_ids(store_url, tmp_path)


HOSTILE_LINES = {
    "an id that is a number": (1, 12345, "12345"),
    "a client that is a list": (3, ["a"], "['a']"),
    "a model holding NUL": (5, "gpt\x00-4o", "gpt-4o"),
    "a model holding a lone surrogate": (5, "gpt\ud800", "gpt?"),
    "a status true": (8, True, 1),
    "a latency that is text": (11, "abc", 0.0),
    "a latency null": (11, None, 0.0),
    "a latency past any float": (11, 10**400, 0.0),
    "a count past 64 bits": (13, 10**30, bounds.MAX_COUNT),
    "a count that is text": (13, "100", 100),
    "a purpose null": (4, None, "-"),
    "a flag null": (9, None, False),
}


@pytest.mark.parametrize("hostile", list(HOSTILE_LINES))
async def test_a_line_written_otherwise_is_bounded_as_a_request_is_and_holds_nothing_back(
    store_url: str, tmp_path: Path, hostile: str
) -> None:
    """A spool line an older version or a hand wrote may hold a value of another type than
    `encoding.fields` writes. Such values failed every drain cycle, holding back every record
    behind them: PostgreSQL refused a status `true` or a list for a type, not for its data, and
    the ledger took it for the database being down (`/usage` answered 503); an id that is a
    number came back as text and was not found among the batch's (KeyError); SQLite stored a
    latency `"abc"`, and `/usage/requests` failed on it ever after. Now the line's values are
    bounded as a request's are, and it is stored with the rest."""
    at, value, stored = HOSTILE_LINES[hostile]
    good = [record() for _ in range(5)]
    poison = values_of(record(id="poison"))
    poison[at] = value
    line = json.dumps(poison, separators=(",", ":")).encode() + b"\n"
    spool = _spooled(tmp_path, good, line, at=2)

    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        await ledger.flush()
        assert ledger.state == "ok"
        page = await ledger.requests(RequestsQuery(limit=100))
        assert len(page["requests"]) == len(good) + 1
        found = next(r for r in page["requests"] if r["id"] not in {g.id for g in good})
        assert found[encoding.FIELDS[at - 1]] == stored
        answer = await ledger.usage(UsageQuery.parse({"since": "2026-11-27"}, NOW + timedelta(hours=1)))
        assert answer["totals"]["requests"] == len(good) + 1
        assert not (spool / TORN).exists()
        assert not (spool / "000000000001.jsonl").exists()  # stored, not tried again each cycle
    finally:
        await ledger.stop()


async def test_a_line_whose_cost_is_negative_is_set_aside_not_stored_as_money(
    store_url: str, tmp_path: Path
) -> None:
    """A line written by hand with a cost of `"-1"` was stored as minus a dollar, taking it off
    what its client spent. A cost out of bounds is never made other money: the line is set aside."""
    good = [record() for _ in range(3)]
    poison = encode(record(id="poison")).replace(b'"0.000825"', b'"-1"')
    spool = _spooled(tmp_path, good, poison, at=1)

    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in good)
        assert b"poison" in (spool / TORN).read_bytes()
        spent = await ledger.spent("client", good[0].client, NOW - timedelta(days=1))
        assert spent == 3 * Decimal("0.000825")
    finally:
        await ledger.stop()


async def test_a_segment_that_cannot_be_read_holds_back_no_other(store_url: str, tmp_path: Path) -> None:
    """A sealed segment the ledger cannot read (a disk error; here a folder in its place) made
    every drain cycle fail before the later segments and the active one were stored: nothing was
    stored again until it was gone. It is kept and tried again; every other record is stored."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "000000000001.jsonl").mkdir()  # open() fails: IsADirectoryError
    older = [record() for _ in range(3)]
    (spool / "000000000002.jsonl").write_bytes(b"".join(map(encode, older)))

    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        new = record()
        ledger.submit(new)
        await ledger.flush()
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in [*older, new])
        assert (spool / "000000000001.jsonl").is_dir()  # kept, not removed
        assert ledger.state == "ok"
        # with the database down at start, what the spool holds is counted still (it raised)
        spooled = await ledger.spooled("client", new.client or "", NOW - timedelta(days=1))
        assert spooled == 4 * Decimal("0.000825")
    finally:
        await ledger.stop()


async def test_retention_deletes_old_records_at_start_and_keeps_the_rollups(
    store_url: str, tmp_path: Path
) -> None:
    clock: Callable[[], datetime] = lambda: NOW  # noqa: E731
    ledger = make_ledger(store_url, tmp_path, clock=clock, retention_days=30)
    await ledger.start()
    ledger.submit(record(ts=NOW - timedelta(days=31)))
    ledger.submit(record(ts=NOW - timedelta(days=29)))
    await ledger.flush()
    await ledger.stop()

    restarted = make_ledger(store_url, tmp_path, clock=clock, retention_days=30)
    await restarted.start()  # retention runs on the ledger's thread at once, then every hour
    try:

        async def purged() -> bool:
            page = await restarted.requests(RequestsQuery())
            return [r["ts"] for r in page["requests"]] == ["2026-10-29T05:33:08.123456Z"]

        await eventually(purged)
        answer = await restarted.usage(UsageQuery.parse({"since": "60d"}, NOW))
        assert answer["totals"]["requests"] == 2
    finally:
        await restarted.stop()


async def test_a_spool_that_cannot_be_written_keeps_records_in_memory_until_it_can(ledger: Ledger) -> None:
    spool = ledger._spool
    assert spool is not None and spool._fd is not None
    read_only = os.open(os.devnull, os.O_RDONLY)
    os.dup2(read_only, spool._fd)  # the next write fails (EBADF), as a full or failing disk would
    os.close(read_only)
    held = [record() for _ in range(5)]
    for r in held:
        ledger.submit(r)  # never raises
    assert ledger._memory

    async def stored() -> bool:
        page = await ledger.requests(RequestsQuery())
        return sorted(r["id"] for r in page["requests"]) == sorted(r.id for r in held)

    await eventually(stored, timeout=5)
    await eventually(lambda: ledger.state == "ok")


async def test_two_processes_cannot_share_a_spool(store_url: str, tmp_path: Path) -> None:
    first = make_ledger(store_url, tmp_path)
    await first.start()
    try:
        with pytest.raises(SpoolBusy, match="give each process its own SWITCHBOARD_USAGE_SPOOL"):
            await make_ledger(store_url, tmp_path).start()
    finally:
        await first.stop()


async def test_off_keeps_nothing_and_says_so(tmp_path: Path) -> None:
    ledger = Ledger(open_store("off", tmp_path), tmp_path / "spool")
    await ledger.start()
    ledger.submit(record())
    assert ledger.state == "off" and not (tmp_path / "spool").exists()
    with pytest.raises(LedgerUnavailable, match="off"):
        await ledger.spent("client", "ops-center", NOW)
    with pytest.raises(LedgerUnavailable, match="off"):
        await ledger.usage(UsageQuery.parse({}, NOW))
    await ledger.stop()


# -- PostgreSQL stopped and started again ---------------------------------------------------------


async def test_postgresql_down_for_a_while_loses_no_record_and_stores_none_twice(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    ledger = make_ledger(postgres_url, tmp_path)
    await ledger.start()
    try:
        before = [record() for _ in range(20)]
        for r in before:
            ledger.submit(r)
        await ledger.flush()

        postgres_server.stop()
        during = [record(client="spooled", cost_usd=Decimal("0.5")) for _ in range(40)]
        for r in during:
            ledger.submit(r)
        await eventually(lambda: ledger.state == "degraded", timeout=15)
        with pytest.raises(LedgerUnavailable, match="spool"):
            await ledger.usage(UsageQuery.parse({}, NOW))
        with pytest.raises(LedgerUnavailable):
            await ledger.spent("client", "spooled", NOW - timedelta(days=1))
        assert await ledger.spooled("client", "spooled", NOW - timedelta(days=1)) == Decimal(20)

        postgres_server.start()
        await eventually(lambda: ledger.state == "ok", timeout=15)

        async def all_stored() -> bool:
            return len(stored_ids(postgres_url, tmp_path)) == 60

        await eventually(all_stored, timeout=15)
        ids = stored_ids(postgres_url, tmp_path)
        assert sorted(ids) == sorted(r.id for r in before + during)  # each once
        assert ledger.store is not None and totals(ledger.store) == {"requests": 60}
        assert await ledger.spent("client", "spooled", NOW - timedelta(days=1)) == Decimal(20)
    finally:
        postgres_server.ensure_running()
        await ledger.stop()


async def test_a_service_starts_with_postgresql_down_and_stores_once_it_is_up(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    postgres_server.stop()
    ledger = make_ledger(postgres_url, tmp_path)
    try:
        await asyncio.wait_for(ledger.start(), timeout=10)  # degraded, not stuck
        assert ledger.state == "degraded"
        submitted = [record() for _ in range(10)]
        for r in submitted:
            ledger.submit(r)
        postgres_server.start()
        await eventually(lambda: len(stored_ids(postgres_url, tmp_path)) == 10, timeout=15)
        assert ledger.state == "ok"
    finally:
        postgres_server.ensure_running()
        await ledger.stop()


# -- kill -9 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounds", [3])
async def test_kill_9_while_submitting_loses_no_record_and_stores_none_twice(
    store_url: str, tmp_path: Path, rounds: int
) -> None:
    """A process submits as fast as it can and prints each id once `submit` returned; it is
    killed with SIGKILL at some moment (mid-write, mid-batch, mid-commit), three times over.
    After a restart every printed id is stored exactly once, and the rollups agree."""
    printed: list[str] = []
    for round_ in range(rounds):
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.usage.submitter", str(tmp_path / "spool"), store_url, f"r{round_}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert process.stdout is not None
        wanted = len(printed) + 3000
        while len(printed) < wanted:
            line = await asyncio.to_thread(process.stdout.readline)
            assert line, "the submitter ended before it was killed"
            printed.append(line.decode().strip())
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait)
        process.stdout.close()

    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()  # stores what the killed processes left in the spool
    try:
        ids = stored_ids(store_url, tmp_path)
        assert len(ids) == len(set(ids))  # none twice
        assert set(printed) <= set(ids)  # none lost
        assert ledger.store is not None and totals(ledger.store) == {"requests": len(ids)}
    finally:
        await ledger.stop()


async def test_a_sqlite_file_removed_under_the_ledger_is_made_again_and_loses_nothing_more(
    tmp_path: Path,
) -> None:
    """Without this, batches went on into the removed file (the open connection kept it), and
    their spool segments were deleted: records stored nowhere anyone could read."""
    db = tmp_path / "usage.db"
    ledger = make_ledger(str(db), tmp_path)
    await ledger.start()
    try:
        ledger.submit(record())
        await ledger.flush()
        for leftover in tmp_path.glob("usage.db*"):
            leftover.unlink()
        after = [record() for _ in range(3)]
        for r in after:
            ledger.submit(r)
        await ledger.flush()
        assert sorted(stored_ids(str(db), tmp_path)) == sorted(r.id for r in after)
        page = await ledger.requests(RequestsQuery())
        assert len(page["requests"]) == 3
    finally:
        await ledger.stop()


async def test_tables_dropped_under_the_ledger_are_made_again_and_no_record_is_set_aside(
    store_url: str, tmp_path: Path
) -> None:
    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        ledger.submit(record())
        await ledger.flush()
        assert ledger.store is not None
        with ledger.store._transaction() as cur:
            for table in ("usage_records", "usage_hourly", "usage_daily"):
                cur.execute(f"DROP TABLE {table}")
        after = [record() for _ in range(3)]
        for r in after:
            ledger.submit(r)
        await eventually(lambda: sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in after), 10)
        assert not (tmp_path / "spool" / TORN).exists()
    finally:
        await ledger.stop()


async def test_records_stored_from_memory_are_those_a_kill_9_leaves_in_the_spool(
    store_url: str, tmp_path: Path
) -> None:
    """The ledger stores what this process wrote from memory (issue 22). What a kill -9 leaves
    in the spool at that moment stores the same records (into a database of its own), and stores
    nothing twice in the same one (a crash between the commit and the segment's removal)."""
    ledger = make_ledger(store_url, tmp_path, linger_s=30)
    await ledger.start()
    submitted = [
        record(client="caf\u00e9\x00", model="m\ud800", ttfb_ms=12.25),
        record(status=429, provider=None, cost_usd=Decimal(0), limited=True),
        record(status=502, latency_ms=math.nan, completion_tokens=2**70, cost_usd=Decimal("1e-13")),
        *(record(ts=NOW + timedelta(hours=i), cost_usd=Decimal(i).scaleb(-7)) for i in range(40)),
    ]
    for r in submitted:
        ledger.submit(r)
    left = {p.name: p.read_bytes() for p in (tmp_path / "spool").glob("*.jsonl")}  # what a kill -9 leaves
    assert sum(data.count(b"\n") for data in left.values()) == len(submitted)
    await ledger.flush()
    assert ledger.stored == len(submitted)
    assert ledger.store is not None
    from_memory = sorted(ledger.store.requests(RequestsQuery(limit=1000)), key=lambda r: r.id)
    by_hour = UsageQuery.parse({"since": "2026-11-01", "group_by": "hour"}, NOW + timedelta(days=3))
    before = await ledger.usage(by_hour)
    await ledger.stop()

    for name, data in left.items():  # killed after the commit, before the segment was removed
        (tmp_path / "spool" / name).write_bytes(data)
    restarted = make_ledger(store_url, tmp_path)
    await restarted.start()
    try:
        assert restarted.stored == 0
        assert await restarted.usage(by_hour) == before
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in submitted)
    finally:
        await restarted.stop()

    spool = tmp_path / "other-spool"  # the same files, stored from the file alone
    spool.mkdir()
    for name, data in left.items():
        (spool / name).write_bytes(data)
    other = Ledger(open_store(str(tmp_path / "from-file.db"), tmp_path), spool)
    await other.start()
    try:
        assert other.store is not None
        from_file = sorted(other.store.requests(RequestsQuery(limit=1000)), key=lambda r: r.id)
    finally:
        await other.stop()
    assert from_file == from_memory


def test_the_spool_tells_what_is_stored_and_keeps_the_rows_of_what_is_not(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(b"a\n", "row a")
    spool.append(b"b\n", "row b")
    taken = spool.take()
    assert taken is not None
    rows, end = taken
    assert rows == ["row a", "row b"]
    spool.append(b"c\n", "row c")
    spool.stored(end)
    assert spool.active_lines() == [b"c\n"]  # what `spent` adds to the database's
    spool.seal()  # not stored whole: its file is kept, and the rows not taken
    (segment,) = spool.sealed()
    assert spool.kept(segment) == ["row c"] and segment.read_bytes() == b"a\nb\nc\n"
    spool.remove(segment)

    spool.append(b"d\n", "row d")
    taken = spool.take()
    assert taken is not None
    spool.stored(taken[1])
    spool.seal()  # stored whole: removed at once
    assert spool.sealed() == [] and [p.stat().st_size for p in tmp_path.glob("*.jsonl")] == [0]

    spool.append(b"e\n")  # a line without its row (written back from memory): read from the file
    assert spool.take() is None
    spool.seal()
    (segment,) = spool.sealed()
    assert spool.kept(segment) is None
    spool.close()


async def test_a_large_purge_holds_back_neither_new_records_nor_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retention lowered over a year of records deletes hundreds of millions of rows, a chunk a
    transaction: that runs in slices between the ledger's other work, so a record is still stored
    within 2 s and a stop is not kept waiting. (Scaled down: a chunk is one record here.)"""
    monkeypatch.setattr(sql, "_PURGE_CHUNK", 1)
    url = str(tmp_path / "usage.db")
    store = open_store(url, tmp_path)
    assert store is not None
    store.open()
    old = [record(ts=NOW - timedelta(days=200, seconds=i)) for i in range(40_000)]
    store.insert(old)
    store.close()

    clock: Callable[[], datetime] = lambda: NOW  # noqa: E731
    ledger = make_ledger(url, tmp_path, clock=clock, retention_days=90)
    await ledger.start()
    stopped = False
    try:
        reader = open_store(url, tmp_path)
        assert reader is not None

        def left() -> int:
            return len(reader.requests(RequestsQuery(limit=10**6)))

        await eventually(lambda: left() < len(old), timeout=10)  # the purge has begun
        new = record(ts=NOW)
        ledger.submit(new)
        await eventually(lambda: new.id in stored_ids(url, tmp_path), timeout=2)
        assert left() > 1  # ... and is not over
        started = asyncio.get_running_loop().time()
        await ledger.stop()
        stopped = True
        assert asyncio.get_running_loop().time() - started < 2
        reader.close()
    finally:
        if not stopped:
            await ledger.stop()


def test_a_stored_segment_is_kept_a_while_for_a_start_with_the_database_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored whole, a segment is renamed `.stored`: read by `retained` (never stored again), gone
    `RETAIN_S` later; a start numbers its segments past the kept ones, and keeps those a while."""
    monkeypatch.setattr(spool_module, "RETAIN_S", 0.3)
    spool = Spool(tmp_path)
    spool.append(b"a\n", "row a")
    taken = spool.take()
    assert taken is not None
    spool.stored(taken[1])
    spool.seal()
    assert spool.sealed() == [] and spool.retained() == [b"a\n"]
    assert sorted(p.name for p in tmp_path.glob("0*")) == ["000000000001.stored", "000000000002.jsonl"]
    spool.close()  # an empty active segment: nothing to keep

    again = Spool(tmp_path)
    assert again.sealed() == [] and again.retained() == [b"a\n"]
    again.append(b"b\n", "row b")
    taken = again.take()
    assert taken is not None
    again.stored(taken[1])
    again.seal()
    assert sorted(p.name for p in tmp_path.glob("0*")) == [
        "000000000001.stored",
        "000000000002.stored",
        "000000000003.jsonl",
    ]
    time.sleep(0.35)
    again.expire()
    assert again.retained() == [] and [p.name for p in tmp_path.glob("0*")] == ["000000000003.jsonl"]
    again.close()


async def test_a_group_larger_than_a_slice_of_rows_is_stored_whole_and_a_bad_record_in_it_set_aside(
    store_url: str, tmp_path: Path
) -> None:
    """The rows of a large group are made `ROW_SLICE` at a time (the ledger's thread pausing
    between slices): every record is stored once, and one the database refuses, in a later
    slice, is still the only one set aside."""
    ledger = make_ledger(store_url, tmp_path, linger_s=30)
    await ledger.start()
    try:
        good = [record(ts=NOW + timedelta(seconds=i)) for i in range(2 * drain_module.ROW_SLICE + 5)]
        poison = values_of(record(id="poison"))
        poison[18] = "1e30"  # a cost past what 64 bits hold: refused by the database
        for i, r in enumerate(good):
            if i == drain_module.ROW_SLICE + 7:
                ledger.write(poison)
            ledger.submit(r)
        await ledger.flush()
        assert ledger.stored == len(good)
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in good)
        assert b"poison" in (tmp_path / "spool" / TORN).read_bytes()
        answer = await ledger.usage(UsageQuery.parse({"since": "2026-11-27"}, NOW + timedelta(days=1)))
        assert answer["totals"]["requests"] == len(good)
    finally:
        await ledger.stop()


async def test_a_previous_process_segment_longer_than_a_slice_is_stored_whole(
    store_url: str, tmp_path: Path
) -> None:
    """A segment read from its file is decoded `ROW_SLICE` lines at a time (the ledger's thread
    pausing between slices): every record is stored once, a damaged line set aside."""
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [record(ts=NOW + timedelta(seconds=i)) for i in range(2 * drain_module.ROW_SLICE + 3)]
    lines = [encode(r) for r in good]
    lines.insert(drain_module.ROW_SLICE + 1, b'[1, "damaged"\n')
    (spool / "000000000001.jsonl").write_bytes(b"".join(lines))
    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        assert ledger.stored == len(good)
        assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in good)
        assert b"damaged" in (spool / TORN).read_bytes()
    finally:
        await ledger.stop()


async def test_a_spool_folder_replaced_by_a_file_is_said_once_and_loses_no_record(
    store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's `rm -rf spool; touch spool` under the service: every cycle logged a traceback
    and `state` stayed `ok`. It is one error line now, `degraded` until the folder can be used
    again (made again once the file is gone), and every record is stored once."""
    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    try:
        ledger.submit(record())
        await ledger.flush()
        shutil.rmtree(tmp_path / "spool")
        (tmp_path / "spool").write_bytes(b"")
        during = [record() for _ in range(4)]
        for r in during:
            ledger.submit(r)
            await asyncio.sleep(0.3)  # a cycle each (`flush` would raise the spool's error)

        async def stored(n: int) -> bool:
            page = await ledger.requests(RequestsQuery(limit=100))
            return len(page["requests"]) == n == len({r["id"] for r in page["requests"]})

        await eventually(lambda: stored(5), timeout=10)
        assert ledger.state == "degraded"
        said = [r for r in caplog.records if r.levelname == "ERROR" and "usage spool" in r.getMessage()]
        assert len(said) == 1 and said[0].exc_info is None and "cannot be used" in said[0].getMessage()
        (tmp_path / "spool").unlink()
        after = [record() for _ in range(3)]
        for r in after:
            ledger.submit(r)
        await eventually(lambda: ledger.state == "ok", timeout=10)
        await eventually(lambda: stored(8), timeout=10)
        assert (tmp_path / "spool").is_dir()
    finally:
        await ledger.stop()


async def test_a_stop_while_the_spool_folder_is_a_file_stores_what_came_and_ends(
    store_url: str, tmp_path: Path
) -> None:
    ledger = make_ledger(store_url, tmp_path)
    await ledger.start()
    shutil.rmtree(tmp_path / "spool")
    (tmp_path / "spool").write_bytes(b"")
    came = [record() for _ in range(3)]
    for r in came:
        ledger.submit(r)
    await ledger.stop()  # it raised NotADirectoryError (the last segment kept as `.stored`)
    assert sorted(stored_ids(store_url, tmp_path)) == sorted(r.id for r in came)

"""Budgets' spent survives a restart (docs/reference.md §13): read back from the ledger (`SpentSource`), or
from the snapshot kept on local disk plus the spool when the ledger is down; never zero."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal

import pytest

from service.config.metering import Budget
from service.usage.ledger import Ledger as UsageLedger
from service.usage.limits.amounts import usd
from service.usage.limits.keeper import Keeper
from service.usage.limits.limiter import Limiter
from service.usage.limits.spent import Snapshot, SpentFile
from service.usage.limits.tickets import Refused, budget_key
from service.usage.stores import open_store
from tests.usage.conftest import record
from tests.usage.limits.test_limiter import Clock, limits

BUDGET = Budget(usd=Decimal(10), period="month")


class Ledger:
    """What the usage ledger answers (the protocol it implements), with a database that can be down."""

    def __init__(self, spent: str, spooled: str = "0") -> None:
        self.total = Decimal(spent)
        self.spool = Decimal(spooled)
        self.down = False
        self.asked: list[tuple[str, str, datetime]] = []

    async def spent(
        self,
        kind: Literal["client", "provider"],
        subject: str,
        since: datetime,
        until: datetime | None = None,
    ) -> Decimal:
        self.asked.append((kind, subject, since))
        if self.down:
            raise ConnectionError("the database is down")
        return self.total

    async def spooled(self, kind: Literal["client", "provider"], subject: str, since: datetime) -> Decimal:
        return self.spool


def keeper(clock: Clock, source: Ledger | None, file: SpentFile | None) -> Keeper:
    kept = Keeper(Limiter(clock=clock), source=source, file=file)
    kept.configure([("client", "c", BUDGET)], ["c"])
    return kept


def key(clock: Clock) -> str:
    limiter = Limiter(clock=clock)
    return budget_key("client", "c", limiter.window("month", limiter.now_ms()))


async def test_spent_is_read_from_the_ledger_since_the_period_began() -> None:
    clock = Clock("2026-12-04T12:00:00")
    ledger = Ledger("7.5")
    kept = keeper(clock, ledger, None)
    await kept.load()
    assert kept.ready.is_set()
    assert ledger.asked == [("client", "c", datetime(2026, 12, 1, tzinfo=UTC))]
    assert usd(kept.limiter.spent_here(key(clock))[0]) == Decimal("7.5")
    ticket, _ = await kept.limiter.admit(
        "r", "c", limits(budget={"usd": "10", "period": "month"}), Decimal(2)
    )
    assert ticket.use is not None and ticket.use.spent == 7_500_000_000


async def test_with_the_ledger_down_the_snapshot_and_the_spool_since_it(tmp_path: Path) -> None:
    clock = Clock()
    file = SpentFile(tmp_path / "usage-spent.json")
    first = keeper(clock, Ledger("0"), file)
    await first.load()
    ticket, _ = await first.limiter.admit(
        "r1", "c", limits(budget={"usd": "10", "period": "month"}), Decimal(4)
    )
    await first.limiter.settle(ticket, Decimal(3), 1)
    _held, _ = await first.limiter.admit(
        "r2", "c", limits(budget={"usd": "10", "period": "month"}), Decimal(2)
    )
    await first.write_snapshot(force=True)  # then the process dies with r2 in flight
    ledger = Ledger("999", spooled="0.5")
    ledger.down = True
    second = keeper(clock, ledger, file)
    await second.load()
    # 3 spent + 2 held when it died (charged in full) + 0.5 in the spool since the snapshot
    assert usd(second.limiter.spent_here(key(clock))[0]) == Decimal("5.5")


async def test_the_larger_of_the_ledger_and_the_snapshot_wins(tmp_path: Path) -> None:
    clock = Clock()
    file = SpentFile(tmp_path / "usage-spent.json")
    file.write(Snapshot(datetime.now(UTC), 1, {key(clock): (1_000_000_000, 2_000_000_000)}))
    ahead = keeper(clock, Ledger("2"), file)
    await ahead.load()
    assert ahead.limiter.spent_here(key(clock))[0] == 3_000_000_000
    behind = keeper(clock, Ledger("4"), file)
    await behind.load()
    assert behind.limiter.spent_here(key(clock))[0] == 4_000_000_000


async def test_a_snapshot_of_another_period_or_garbage_counts_for_nothing(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "usage-spent.json"
    file = SpentFile(path)
    file.write(Snapshot(datetime.now(UTC), 1, {"client:c:month:2020-01": (9_000_000_000, 0)}))
    kept = keeper(clock, None, file)
    await kept.load()
    assert kept.limiter.spent_here(key(clock))[0] == 0
    for garbage in (
        "{",
        "[]",
        '{"at": "x"}',
        '{"at": "2026-01-01T00:00:00+00:00", "replicas": 1, '
        '"budgets": {"k": {"spent": "-1", "reserved": "0"}}}',
    ):
        path.write_text(garbage)
        assert file.read() is None


async def test_a_new_period_starts_from_nothing_without_any_job() -> None:
    clock = Clock("2026-11-30T23:59:59.900")
    kept = keeper(clock, Ledger("9.9"), None)
    await kept.load()
    lim = limits(budget={"usd": "10", "period": "month"})
    with pytest.raises(Refused):
        await kept.limiter.admit("r", "c", lim, Decimal(1))
    clock.advance(0.1)  # December
    ticket, _ = await kept.limiter.admit("s", "c", lim, Decimal(1))
    assert ticket.holds["client"].key.endswith("month:2026-12")


async def test_a_period_that_began_while_counting_is_not_read_back_on_top_of_the_counts() -> None:
    clock = Clock("2026-11-30T23:59:59.900")
    kept = keeper(clock, Ledger("0"), None)
    await kept.load()
    clock.advance(0.1)
    lim = limits(budget={"usd": "10", "period": "month"})
    ticket, _ = await kept.limiter.admit("s", "c", lim, Decimal(1))
    await kept.limiter.settle(ticket, Decimal(1), 1)
    assert kept.source is not None
    kept.source.total = Decimal(1)  # type: ignore[attr-defined]  # the ledger has the record too
    await kept.tick()
    assert kept.limiter.spent_here(key(clock))[0] == 1_000_000_000


async def test_a_request_in_flight_across_a_change_of_period_counts_toward_the_new_budget() -> None:
    """docs/reference.md §13.2: "what was already spent in the period stays spent". A request admitted
    under a day's budget is still in flight when the files make it a month's: the ledger has no
    record of it when the month's spend before the change is read, and its cost is settled under
    the day's key; the month counts it all the same (its reservation: its cost is not known)."""
    clock = Clock()  # 2026-12-04T12:00
    kept = Keeper(Limiter(clock=clock), source=Ledger("14"))
    kept.configure([("client", "c", Budget(usd=Decimal(100), period="day"))], ["c"])
    await kept.load()
    ticket, _ = await kept.limiter.admit(
        "r1", "c", limits(budget={"usd": "100", "period": "day"}), Decimal(2)
    )
    clock.advance(1)
    kept.configure([("client", "c", Budget(usd=Decimal(100), period="month"))], ["c"])
    monthly = limits(budget={"usd": "100", "period": "month"})
    later, _ = await kept.limiter.admit("r2", "c", monthly, Decimal(1))  # counted under the month's
    await kept.tick()
    await kept.limiter.settle(ticket, Decimal(1), 1)
    await kept.limiter.settle(later, Decimal(1), 1)
    await kept.tick()
    assert kept.limiter.spent_here(key(clock)) == (17_000_000_000, 0)  # 14 before, 2 held, 1 after


async def test_requests_as_a_change_of_period_lands_do_not_pass_the_budget() -> None:
    """docs/reference.md §13.2: "spent never exceeds a budget, whatever the concurrency". Ten requests
    of 1 USD sent as the files make a day's budget of 20 USD a month's, 14 spent in the month
    before: each waits for that to be read, and six are admitted, not ten."""
    clock = Clock()
    kept = Keeper(Limiter(clock=clock), source=Ledger("14"))
    kept.configure([("client", "c", Budget(usd=Decimal(20), period="day"))], ["c"])
    await kept.load()
    clock.advance(1)
    kept.configure([("client", "c", Budget(usd=Decimal(20), period="month"))], ["c"])
    monthly = limits(budget={"usd": "20", "period": "month"})
    results = await asyncio.gather(
        *(kept.limiter.admit(f"r{n}", "c", monthly, Decimal(1)) for n in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(r, Refused) for r in results) == 6
    assert kept.limiter.spent_here(key(clock)) == (14_000_000_000, 6_000_000_000)


async def test_what_was_stored_since_the_snapshot_counts_after_a_start_with_the_database_down(
    tmp_path: Path,
) -> None:
    """The process dies after the last snapshot of spent; what it spent since was stored in the
    database, so its segment left the spool; it starts again with the database down. The
    stored segment is still on local disk: the snapshot plus the spool count it, not zero."""
    file = SpentFile(tmp_path / "usage-spent.json")
    budget = {"usd": "10", "period": "month"}
    ledger = UsageLedger(open_store(str(tmp_path / "usage.db"), tmp_path), tmp_path / "spool")
    await ledger.start()
    first = Keeper(Limiter(), source=ledger, file=file)
    first.configure([("client", "ops-center", BUDGET)], ["ops-center"])
    await first.load()
    await first.write_snapshot(force=True)  # the last snapshot before the process dies
    ticket, _ = await first.limiter.admit("r1", "ops-center", limits(budget=budget), Decimal(4))
    await first.limiter.settle(ticket, Decimal(3), 1)
    ledger.submit(record(ts=datetime.now(UTC), client="ops-center", cost_usd=Decimal(3)))
    await ledger.flush()  # in the database: its segment is done with
    await ledger.stop()

    down = UsageLedger(open_store(str(tmp_path / "a-file" / "usage.db"), tmp_path), tmp_path / "spool")
    (tmp_path / "a-file").write_text("not a folder: the database cannot be opened")
    await down.start()
    try:
        assert down.state == "degraded"
        second = Keeper(Limiter(), source=down, file=file)
        second.configure([("client", "ops-center", BUDGET)], ["ops-center"])
        await second.load()
        current = second.limiter.window("month", second.limiter.now_ms())
        spent, _ = second.limiter.spent_here(budget_key("client", "ops-center", current))
        assert usd(spent) == Decimal(3)
    finally:
        await down.stop()

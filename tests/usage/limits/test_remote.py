"""The limiter on Debian's real redis-server: one limit for many replicas (here, limiters
sharing one Redis, each with its own epoch), Redis stopped and started mid-run, a replica that
dies holding reservations, and servers that hang or answer garbage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from service.config.metering import Budget, Limits
from service.usage.ledger import Ledger
from service.usage.limits.amounts import usd
from service.usage.limits.keeper import Keeper
from service.usage.limits.limiter import Limiter
from service.usage.limits.remote import Remote, Unavailable
from service.usage.limits.spent import SpentSource
from service.usage.limits.tickets import Refused, budget_key
from service.usage.stores import open_store
from tests.conftest import eventually
from tests.support.replicas import RedisServer
from tests.usage.conftest import record
from tests.usage.limits.test_limiter import Clock, limits


class SharedLedger(Ledger):
    """One ledger for every replica, as PostgreSQL is (docs/reference.md §13.4), here in SQLite."""

    @property
    def shared(self) -> bool:
        return True


@contextlib.asynccontextmanager
async def replica(
    url: str,
    clock: Clock,
    *,
    source: SpentSource | None = None,
    budgets: Sequence[tuple[str, str, Budget]] = (),
    **options: Any,
) -> AsyncIterator[Keeper]:
    """A limiter on `url` and its keeper, loaded (as a replica at start) with `budgets`
    configured and what they spent read from `source`."""
    limiter = Limiter(remote=Remote(url), clock=clock, **options)
    keeper = Keeper(limiter, source=source)
    keeper.configure(budgets, [subject for kind, subject, _ in budgets if kind == "client"])
    await keeper.load()
    try:
        yield keeper
    finally:
        assert limiter.remote is not None
        await limiter.remote.aclose()


async def attempt(limiter: Limiter, name: str, lim: Limits, cost: str) -> Any:
    try:
        ticket, _ = await limiter.admit(name, "c", lim, Decimal(cost))
    except Refused as refused:
        return refused
    return ticket


async def test_two_replicas_share_one_rpm_and_one_budget(redis_server: RedisServer) -> None:
    clock = Clock()
    lim = limits(rpm=30, budget={"usd": "1", "period": "day"})
    async with replica(redis_server.url, clock) as a, replica(redis_server.url, clock) as b:
        assert a.limiter.up and b.limiter.up and a.limiter.mode == "redis"
        owners = [(a if n % 2 else b).limiter for n in range(100)]
        results = await asyncio.gather(
            *(attempt(owner, f"r{n}", lim, "0.1") for n, owner in enumerate(owners))
        )
        admitted = [
            (owner, r) for owner, r in zip(owners, results, strict=True) if not isinstance(r, Refused)
        ]
        assert len(admitted) == 10  # ten reservations of 0.1 cover the budget, across both
        assert {r.limit for r in results if isinstance(r, Refused)} == {"budget"}
        await asyncio.gather(*(owner.settle(t, Decimal("0.1"), 10) for owner, t in admitted))
        a.configure([("client", "c", lim.budget)], ["c"])  # type: ignore[list-item]  # what refresh reads
        await a.refresh()
        key = admitted[0][1].holds["client"].key
        assert a.limiter.known[key] == (1_000_000_000, 0)
        # The rpm: 10 admitted so far; 20 more fit in the minute across both replicas, then none.
        cheap = limits(rpm=30)
        results = await asyncio.gather(
            *(attempt((a if n % 2 else b).limiter, f"s{n}", cheap, "0") for n in range(40))
        )
        assert sum(not isinstance(r, Refused) for r in results) == 20
        assert {r.limit for r in results if isinstance(r, Refused)} == {"rpm"}


async def test_a_replica_that_dies_holding_reservations_is_charged_in_full_when_its_lease_ends(
    redis_server: RedisServer,
) -> None:
    clock = Clock()
    lim = limits(max_parallel=2, budget={"usd": "1", "period": "month"})
    async with replica(redis_server.url, clock, lease_ms=2000) as a, replica(redis_server.url, clock) as b:
        held = await attempt(a.limiter, "dying", lim, "0.4")
        assert not isinstance(held, Refused)
        assert isinstance(await attempt(b.limiter, "x", lim, "0.7"), Refused)  # 0.4 held + 0.7 > 1
        a.limiter.up = False  # the replica is gone: no settle, no renewal
        clock.advance(3)  # past its lease
        ticket = await attempt(b.limiter, "y", lim, "0.5")
        assert not isinstance(ticket, Refused)  # its slot was freed...
        await b.refresh()
        key = ticket.holds["client"].key
        assert b.limiter.known[key] == (400_000_000, 500_000_000)  # ...and its 0.4 charged in full


async def test_redis_stopped_mid_run_each_replica_spends_only_its_share_then_reconciles(
    redis_server: RedisServer,
) -> None:
    clock = Clock()
    lim = limits(rpm=1000, budget={"usd": "1", "period": "day"})
    async with replica(redis_server.url, clock) as a, replica(redis_server.url, clock) as b:
        a.configure([("client", "c", lim.budget)], ["c"])  # type: ignore[list-item]
        b.configure([("client", "c", lim.budget)], ["c"])  # type: ignore[list-item]
        first = await attempt(a.limiter, "r0", lim, "0.2")
        await a.limiter.settle(first, Decimal("0.2"), 10)
        in_flight = await attempt(b.limiter, "r1", lim, "0.2")  # held across the outage
        await a.tick()
        await b.tick()
        assert a.limiter.replicas == 2
        redis_server.stop()
        started = time.monotonic()
        await a.tick()
        await b.tick()
        assert time.monotonic() - started < 2.5  # each call bounded by its timeout
        assert a.limiter.mode == "local" and a.limiter.degraded and not b.limiter.up
        # Left when Redis went: 1 - 0.2 spent - 0.2 held = 0.6; each replica's share is 0.3.
        spent = {"a": Decimal(0), "b": Decimal(0)}
        for name, keeper in (("a", a), ("b", b)):
            for n in range(10):
                ticket = await attempt(keeper.limiter, f"{name}{n}", lim, "0.1")
                if isinstance(ticket, Refused):
                    break
                await keeper.limiter.settle(ticket, Decimal("0.1"), 1)
                spent[name] += Decimal("0.1")
        assert spent == {"a": Decimal("0.3"), "b": Decimal("0.3")}
        await b.limiter.settle(in_flight, Decimal("0.15"), 5)  # settled while Redis is away
        redis_server.start()  # empty: nothing was saved
        await a.tick()
        await b.tick()
        assert a.limiter.up and b.limiter.up and not a.limiter.degraded
        key = first.holds["client"].key
        await a.refresh()
        spent_now, reserved = a.limiter.known[key]
        # What Redis lost is back (0.2), with the outage's spend (0.6) and the held request's (0.15).
        assert usd(spent_now) == Decimal("0.95") and reserved == 0
        refused = await attempt(a.limiter, "late", lim, "0.1")
        assert isinstance(refused, Refused) and refused.limit == "budget"


async def _month_spent(tmp_path: Path) -> SharedLedger:
    """A shared ledger, started, holding 14 USD of client `c` in December 2026 before the 4th's
    noon (3 on the 2nd, 11 on the 4th)."""
    ledger = SharedLedger(open_store(str(tmp_path / "usage.db"), tmp_path), tmp_path / "spool")
    await ledger.start()
    for day, cost in ((2, 3), (4, 11)):
        ledger.submit(record(ts=datetime(2026, 12, day, 9, tzinfo=UTC), client="c", cost_usd=Decimal(cost)))
    await ledger.flush()
    return ledger


async def test_a_budget_given_a_longer_period_keeps_what_was_spent_on_every_replica(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """docs/reference.md §13.2: "what was already spent in the period stays spent", with Redis too.
    Two replicas apply the commit that makes a day's budget a month's at once (a request is
    counted in the new period before either ticks): the ledger's 14 USD of the month before the
    change are added to Redis once, not twice and not forgotten; a replica started later agrees."""
    clock = Clock()  # 2026-12-04T12:00
    ledger = await _month_spent(tmp_path)
    day = [("client", "c", Budget(usd=Decimal(100), period="day"))]
    month = [("client", "c", Budget(usd=Decimal(100), period="month"))]
    monthly = limits(budget={"usd": "100", "period": "month"})
    try:
        async with (
            replica(redis_server.url, clock, source=ledger, budgets=day) as a,
            replica(redis_server.url, clock, source=ledger, budgets=day) as b,
        ):
            clock.advance(1)
            a.configure(month, ["c"])
            b.configure(month, ["c"])
            clock.advance(0.3)
            ticket = await attempt(a.limiter, "r1", monthly, "2")
            await a.limiter.settle(ticket, Decimal(1), 10)
            ledger.submit(record(ts=datetime.fromtimestamp(clock.now, UTC), client="c", cost_usd=Decimal(1)))
            await asyncio.gather(a.tick(), b.tick())
            await asyncio.gather(a.tick(), b.tick())
            key = budget_key("client", "c", a.limiter.window("month", a.limiter.now_ms()))
            assert a.limiter.known[key] == b.limiter.known[key] == (15_000_000_000, 0)
            async with replica(redis_server.url, clock, source=ledger, budgets=month) as c:
                await asyncio.gather(a.tick(), b.tick(), c.tick())
                assert a.limiter.known[key] == c.limiter.known[key] == (15_000_000_000, 0)
            # Back to a day's budget, and after 2 USD of the day, to a month's again: the month's
            # period is marked seeded; it is not added again (32), nor kept at 15.
            clock.advance(1)
            for kept in (a, b):
                kept.configure(day, ["c"])
                await kept.tick()
            ticket = await attempt(a.limiter, "r2", limits(budget={"usd": "100", "period": "day"}), "2")
            await a.limiter.settle(ticket, Decimal(2), 10)
            ledger.submit(record(ts=datetime.fromtimestamp(clock.now, UTC), client="c", cost_usd=Decimal(2)))
            clock.advance(1)
            for kept in (a, b):
                kept.configure(month, ["c"])
            await asyncio.gather(a.tick(), b.tick())
            assert a.limiter.known[key] == b.limiter.known[key] == (17_000_000_000, 0)
    finally:
        await ledger.stop()


async def test_a_request_in_flight_across_a_change_of_period_counts_toward_the_new_budget(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """docs/reference.md §13.2: "what was already spent in the period stays spent". A request admitted
    under the day's budget, still in flight when the commit makes it a month's, has no record in
    the ledger when the month's spend before the change is read, and its cost is settled under
    the day's key: it counts toward the month's all the same, on every replica (its reservation,
    as its cost is not known when the month's counter is seeded: over, never under)."""
    clock = Clock()  # 2026-12-04T12:00
    ledger = await _month_spent(tmp_path)
    day = [("client", "c", Budget(usd=Decimal(100), period="day"))]
    month = [("client", "c", Budget(usd=Decimal(100), period="month"))]
    daily = limits(budget={"usd": "100", "period": "day"})
    try:
        async with (
            replica(redis_server.url, clock, source=ledger, budgets=day) as a,
            replica(redis_server.url, clock, source=ledger, budgets=day) as b,
        ):
            arrived = datetime.fromtimestamp(clock.now, UTC)
            flying = [
                (a, await attempt(a.limiter, "r1", daily, "2")),
                (b, await attempt(b.limiter, "r2", daily, "3")),
            ]
            clock.advance(1)
            for kept in (a, b):
                kept.configure(month, ["c"])
            await asyncio.gather(a.tick(), b.tick())
            for n, (kept, ticket) in enumerate(flying):
                await kept.limiter.settle(ticket, Decimal(1), 10)
                ledger.submit(record(id=f"late-{n}", ts=arrived, client="c", cost_usd=Decimal(1)))
            await asyncio.gather(a.tick(), b.tick())
            key = budget_key("client", "c", a.limiter.window("month", a.limiter.now_ms()))
            assert a.limiter.known[key] == b.limiter.known[key] == (19_000_000_000, 0)  # 14 + 2 + 3
            async with replica(redis_server.url, clock, source=ledger, budgets=month) as c:
                await c.tick()
                assert c.limiter.known[key] == (19_000_000_000, 0)  # the ledger's 16 is less
    finally:
        await ledger.stop()


async def test_requests_on_two_replicas_as_a_change_of_period_lands_do_not_pass_the_budget(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """docs/reference.md §13.2: "spent never exceeds a budget, whatever the concurrency", and "what
    was already spent in the period stays spent". Forty requests of 1 USD on two replicas, sent
    as the commit that makes a day's budget of 20 USD a month's lands (14 USD spent in the month
    before it): a request counted toward the month's budget waits for what was spent before the
    change, so six are admitted, not twenty (34 USD of a budget of 20)."""
    clock = Clock()  # 2026-12-04T12:00
    ledger = await _month_spent(tmp_path)
    day = [("client", "c", Budget(usd=Decimal(20), period="day"))]
    month = [("client", "c", Budget(usd=Decimal(20), period="month"))]
    monthly = limits(budget={"usd": "20", "period": "month"})
    try:
        async with (
            replica(redis_server.url, clock, source=ledger, budgets=day) as a,
            replica(redis_server.url, clock, source=ledger, budgets=day) as b,
        ):
            clock.advance(1)
            for kept in (a, b):
                kept.configure(month, ["c"])
            owners = [(a, b)[n % 2].limiter for n in range(40)]
            results = await asyncio.gather(*(attempt(o, f"r{n}", monthly, "1") for n, o in enumerate(owners)))
            admitted = [(o, r) for o, r in zip(owners, results, strict=True) if not isinstance(r, Refused)]
            await asyncio.gather(*(o.settle(t, Decimal(1), 10) for o, t in admitted))
            await asyncio.gather(a.tick(), b.tick())
            key = budget_key("client", "c", a.limiter.window("month", a.limiter.now_ms()))
            assert a.limiter.known[key] == (20_000_000_000, 0) and len(admitted) == 6
    finally:
        await ledger.stop()


async def test_a_budget_given_a_longer_period_keeps_what_every_replica_spent_in_its_own_ledger(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """docs/reference.md §13.2: "what was already spent in the period stays spent". Each replica with
    a SQLite ledger of its own (docs/reference.md §13.4: only PostgreSQL is shared): what each
    recorded of the month before the day's budget became a month's is in no other's, so each
    adds its own (14 and 5 USD), not only the first to apply the change."""
    clock = Clock()  # 2026-12-04T12:00
    ledgers = []
    for name, spent in (("a", ((2, 3), (4, 11))), ("b", ((3, 5),))):
        ledger = Ledger(open_store(str(tmp_path / name / "usage.db"), tmp_path), tmp_path / name / "spool")
        await ledger.start()
        for day, cost in spent:
            ledger.submit(
                record(ts=datetime(2026, 12, day, 9, tzinfo=UTC), client="c", cost_usd=Decimal(cost))
            )
        await ledger.flush()
        ledgers.append(ledger)
    day = [("client", "c", Budget(usd=Decimal(100), period="day"))]
    month = [("client", "c", Budget(usd=Decimal(100), period="month"))]
    try:
        async with (
            replica(redis_server.url, clock, source=ledgers[0], budgets=day) as a,
            replica(redis_server.url, clock, source=ledgers[1], budgets=day) as b,
        ):
            clock.advance(1)
            for kept in (a, b):
                kept.configure(month, ["c"])
            await asyncio.gather(a.tick(), b.tick())
            await asyncio.gather(a.tick(), b.tick())
            key = budget_key("client", "c", a.limiter.window("month", a.limiter.now_ms()))
            assert a.limiter.known[key] == b.limiter.known[key] == (19_000_000_000, 0)
            # Back to a day's budget, 2 USD spent on `b`, and to a month's again: each adds what
            # it spent while the month's was not counted, not all it spent in the month again.
            clock.advance(1)
            for kept in (a, b):
                kept.configure(day, ["c"])
                await kept.tick()
            ticket = await attempt(b.limiter, "r2", limits(budget={"usd": "100", "period": "day"}), "2")
            await b.limiter.settle(ticket, Decimal(2), 10)
            ledgers[1].submit(
                record(ts=datetime.fromtimestamp(clock.now, UTC), client="c", cost_usd=Decimal(2))
            )
            clock.advance(1)
            for kept in (a, b):
                kept.configure(month, ["c"])
            await asyncio.gather(a.tick(), b.tick())
            await asyncio.gather(a.tick(), b.tick())
            assert a.limiter.known[key] == b.limiter.known[key] == (21_000_000_000, 0)
    finally:
        for ledger in ledgers:
            await ledger.stop()


async def test_refuse_mode_refuses_limited_clients_while_redis_is_away(redis_server: RedisServer) -> None:
    clock = Clock()
    async with replica(redis_server.url, clock, without_redis="refuse") as a:
        redis_server.stop()
        await a.tick()
        assert a.limiter.mode == "refuse"
        refused = await attempt(a.limiter, "r", limits(rpm=5), "0")
        assert isinstance(refused, Refused) and refused.limit == "unavailable"
        ticket, _ = await a.limiter.admit("free", "other", None, Decimal(0))  # unlimited: served
        await a.limiter.settle(ticket, Decimal(0), 0)


# -- servers that misbehave ------------------------------------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_redis(handler: Handler) -> AsyncIterator[str]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await handler(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        for writer in writers:
            writer.close()


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)  # takes the connection, reads nothing, answers nothing


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(65536):
        writer.write(b"$5\r\nhello\r\n")  # any command: a string that is not the script's JSON
        await writer.drain()


async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(65536):
        writer.write(b"$1500000000\r\n" + b"x" * 65536)
        await writer.drain()


@pytest.mark.parametrize("handler", [hang, garbage, huge])
async def test_a_redis_that_hangs_or_answers_garbage_costs_a_request_at_most_its_timeout(
    handler: Handler,
) -> None:
    async with fake_redis(handler) as url:
        limiter = Limiter(remote=Remote(url), clock=Clock())
        keeper = Keeper(limiter)
        started = time.monotonic()
        await keeper.load()  # Redis does not answer the script: the limiter starts on its own counts
        assert time.monotonic() - started < 1.0
        assert not limiter.up and limiter.mode == "local"
        started = time.monotonic()
        ticket = await attempt(limiter, "r", limits(rpm=1), "0")
        await limiter.settle(ticket, Decimal(0), 0)
        assert time.monotonic() - started < 0.1  # the fallback asks nothing of Redis
        assert isinstance(await attempt(limiter, "s", limits(rpm=1), "0"), Refused)
        assert limiter.remote is not None
        await limiter.remote.aclose()


async def test_a_redis_call_that_fails_midway_falls_back_within_that_call(redis_server: RedisServer) -> None:
    clock = Clock()
    async with replica(redis_server.url, clock) as a:
        assert a.limiter.up
        redis_server.stop()
        started = time.monotonic()
        ticket = await attempt(a.limiter, "r", limits(rpm=5), "0")  # counted locally at once
        assert not isinstance(ticket, Refused) and not a.limiter.up
        assert time.monotonic() - started < 1.0
        await a.limiter.settle(ticket, Decimal(0), 3)


async def test_the_script_is_loaded_again_after_redis_forgets_it(redis_server: RedisServer) -> None:
    remote = Remote(redis_server.url)
    try:
        await remote.call("read", int(time.time() * 1000), "e", {"keys": []})
        client = redis.Redis.from_url(redis_server.url)
        await client.script_flush()
        await client.aclose()
        answer = await remote.call("read", int(time.time() * 1000), "e", {"keys": []})
        assert answer["replicas"] == 0
        with pytest.raises(Unavailable):
            await remote.call("nonsense", 0, "e", {"fresh": 1, "ttl": 1000})
    finally:
        await remote.aclose()


async def test_a_request_cancelled_while_redis_holds_for_it_leaks_nothing(redis_server: RedisServer) -> None:
    """A client that leaves while its admission, a provider's reservation or its settlement is
    on its way to Redis (a cancelled request) must not leave a reservation or a slot behind:
    a live replica's epoch never expires, so nothing else would ever give them back."""
    clock = Clock()
    lim = limits(max_parallel=1, budget={"usd": "1", "period": "day"})
    budget = lim.budget
    assert budget is not None
    async with replica(redis_server.url, clock) as a:
        a.configure([("client", "c", budget), ("provider", "p", budget)], ["c"])
        admitting = asyncio.ensure_future(a.limiter.admit("r1", "c", lim, Decimal("0.5")))
        await asyncio.sleep(0)  # sent, not answered
        admitting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await admitting

        async def admitted() -> Any:  # its slot comes back once Redis answered the admission
            try:
                return (await a.limiter.admit("r2", "c", lim, Decimal("0.5")))[0]
            except Refused as refused:
                assert refused.limit == "max_parallel"
                return False

        ticket = await eventually(admitted)
        reserving = asyncio.ensure_future(a.limiter.reserve(ticket, "p", budget, Decimal("0.5")))
        await asyncio.sleep(0)
        reserving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reserving
        settling = asyncio.ensure_future(a.limiter.settle(ticket, Decimal("0.5"), 1))
        await asyncio.sleep(0)
        settling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await settling

        async def settled() -> bool:
            await a.refresh()
            known = a.limiter.known
            keys = {k.split(":")[0]: v for k, v in known.items()}
            return keys == {"client": (500_000_000, 0), "provider": (500_000_000, 0)}

        await eventually(settled)
        third, _ = await a.limiter.admit("r3", "c", lim, Decimal("0.1"))  # max_parallel 1: free again
        await a.limiter.settle(third, Decimal(0), 0)


@pytest.mark.parametrize(
    "reply",
    [
        b'{"refused": "nonsense", "retry_ms": 5}',
        b'{"requests": -1, "tokens": "0", "par": 0}',
        b'{"requests": 1, "tokens": "1e9", "par": 0, "cb": {"spent": "1e9", "reserved": "0"}}',
        b"[]",
        b'{"requests": true, "tokens": "0", "par": 0}',
    ],
)
async def test_a_redis_answering_well_formed_lies_is_taken_as_away(reply: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            writer.write(b"$%d\r\n%s\r\n" % (len(reply), reply))
            await writer.drain()

    async with fake_redis(answer) as url:
        limiter = Limiter(remote=Remote(url), clock=Clock())
        limiter.up, limiter.fresh = True, False  # as if it had answered well until now
        lim = limits(rpm=5, budget={"usd": "1", "period": "day"})
        ticket = await attempt(limiter, "r", lim, "0.1")
        assert not isinstance(ticket, Refused) and not limiter.up  # counted here instead
        await limiter.settle(ticket, Decimal("0.1"), 1)
        assert limiter.remote is not None
        await limiter.remote.aclose()


@pytest.mark.parametrize("on_redis", [False, True])
async def test_absurd_limits_in_a_clients_file_hold_without_overflow(
    redis_server: RedisServer, on_redis: bool
) -> None:
    clock = Clock()
    top = 10**12
    lim = limits(rpm=top, tpm=top, max_parallel=top, budget={"usd": str(top), "period": "total"})
    tiny = limits(budget={"usd": "0.000000000001", "period": "total"})
    context = (
        replica(redis_server.url, clock) if on_redis else contextlib.nullcontext(Keeper(Limiter(clock=clock)))
    )
    async with context as kept:
        limiter = kept.limiter
        ticket = await attempt(limiter, "big", lim, str(10**9))
        assert not isinstance(ticket, Refused)
        await limiter.settle(ticket, Decimal(10**9), 10**12 - 1)
        again = await attempt(limiter, "again", lim, "1")
        assert not isinstance(again, Refused)  # 1e9 spent (budgets count up to 4.6e9), a token short of tpm
        await limiter.settle(again, Decimal(0), 1)
        third = await attempt(limiter, "third", lim, "1")
        assert isinstance(third, Refused) and third.limit == "tpm"
        refused = await attempt(limiter, "tiny", tiny, "0.000001")  # lowered below what is spent
        assert isinstance(refused, Refused) and refused.limit == "budget"


async def test_concurrent_checks_share_round_trips(redis_server: RedisServer) -> None:
    clock = Clock()
    async with replica(redis_server.url, clock) as a:
        client = redis.Redis.from_url(redis_server.url)
        await client.config_resetstat()
        results = await asyncio.gather(
            *(attempt(a.limiter, f"r{n}", limits(rpm=1000), "0") for n in range(64))
        )
        assert not any(isinstance(r, Refused) for r in results)
        stats = await client.info("commandstats")
        await client.aclose()
        assert stats["cmdstat_evalsha"]["calls"] <= 4  # not one a request


async def _all_four_refuse_in_order(limiter: Limiter) -> None:
    """A client that every limit would refuse is refused by the first in the order of
    docs/reference.md §13.2; lifting that one shows the next, and no refusal counts toward any limit."""
    budget = {"usd": "1", "period": "day"}
    loose = limits(budget=budget)
    before, _ = await limiter.admit("p", "c", loose, Decimal("0.5"))
    await limiter.settle(before, Decimal("0.95"), 20)  # 1 request, 20 tokens, 0.95 USD in the window
    busy, _ = await limiter.admit("a", "c", loose, Decimal(0))  # in flight
    strict = {"max_parallel": 1, "rpm": 2, "tpm": 10, "budget": budget}
    named = []
    for lifted in ({}, {"max_parallel": 5}, {"rpm": 50}, {"tpm": 1000}):
        strict.update(lifted)
        refused = await attempt(limiter, f"x{len(named)}", limits(**strict), "0.5")
        assert isinstance(refused, Refused)
        named.append(refused.limit)
    assert named == ["max_parallel", "rpm", "tpm", "budget"]
    await limiter.settle(busy, Decimal(0), 0)
    # no refusal counted, the budget's own included: 0.05 USD is left, and a request it covers is
    # taken, the third of the window (p, a, then this one), its tokens the first 20
    final = limits(**strict)
    fits, _ = await limiter.admit("y", "c", final, Decimal("0.05"))
    remaining = fits.use.remaining(final)
    assert remaining["x-switchboard-remaining-requests"] == "47"
    assert remaining["x-switchboard-remaining-tokens"] == "980"
    assert Decimal(remaining["x-switchboard-budget-remaining-usd"]) == 0  # 0.95 spent, 0.05 held
    await limiter.settle(fits, Decimal("0.05"), 1)


async def test_limits_are_checked_in_order_here() -> None:
    await _all_four_refuse_in_order(Limiter(clock=Clock()))


async def test_limits_are_checked_in_order_on_redis(redis_server: RedisServer) -> None:
    async with replica(redis_server.url, Clock()) as a:
        assert a.limiter.mode == "redis"
        await _all_four_refuse_in_order(a.limiter)


async def test_an_admission_that_waited_for_a_reconcile_goes_to_redis_once_it_is_back(
    redis_server: RedisServer,
) -> None:
    """A request admitted while a reconcile holds the lock waits for it; when the reconcile put
    the limiter back on Redis, the request is counted there (its slot, its hold, its charge), not
    in this replica's counters, which the reconcile has just handed over and nothing sends again."""
    clock = Clock()
    lim = limits(rpm=1000, max_parallel=1, budget={"usd": "1", "period": "day"})
    async with replica(redis_server.url, clock) as a, replica(redis_server.url, clock) as b:
        a.configure([("client", "c", lim.budget)], ["c"])  # type: ignore[list-item]
        b.configure([("client", "c", lim.budget)], ["c"])  # type: ignore[list-item]
        redis_server.stop()
        await a.tick()
        assert a.limiter.degraded
        redis_server.start()  # empty: the other replica's lease is gone, it reconciles too
        await b.tick()
        await b.tick()
        assert b.limiter.up
        reconciling = asyncio.ensure_future(a.reconcile())
        await asyncio.sleep(0)  # it holds the lock, on its way to Redis
        assert a.limiter.lock.locked()
        ticket = await attempt(a.limiter, "mid", lim, "0.4")
        assert await reconciling and a.limiter.up
        assert not isinstance(ticket, Refused)
        # the slot is Redis's: the other replica sees it in flight (max_parallel 1)
        refused = await attempt(b.limiter, "other", lim, "0.1")
        assert isinstance(refused, Refused) and refused.limit == "max_parallel"
        await a.limiter.settle(ticket, Decimal("0.4"), 10)
        await b.refresh()
        key = ticket.holds["client"].key
        assert b.limiter.known[key] == (400_000_000, 0)  # charged where every replica sees it


async def test_a_settlement_that_waited_for_a_reconcile_gives_redis_back_its_slot_and_hold(
    redis_server: RedisServer,
) -> None:
    """A request admitted while Redis was away, settled while a reconcile holds the lock: the
    reconcile hands its slot and hold to Redis (under this replica's live epoch, which never
    expires), so the settlement must free them there, not in this replica's counters."""
    clock = Clock()
    lim = limits(rpm=1000, max_parallel=1, budget={"usd": "1", "period": "day"})
    async with replica(redis_server.url, clock) as a, replica(redis_server.url, clock) as b:
        a.configure([("client", "c", lim.budget)], ["c"])  # type: ignore[list-item]
        b.configure([("client", "c", lim.budget)], ["c"])  # type: ignore[list-item]
        redis_server.stop()
        await a.tick()
        assert a.limiter.degraded
        ticket = await attempt(a.limiter, "outage", lim, "0.4")  # held here while Redis is away
        assert not isinstance(ticket, Refused)
        redis_server.start()  # empty: the other replica's lease is gone, it reconciles too
        await b.tick()
        await b.tick()
        assert b.limiter.up
        reconciling = asyncio.ensure_future(a.reconcile())
        await asyncio.sleep(0)  # it holds the lock, on its way to Redis
        assert a.limiter.lock.locked()
        await a.limiter.settle(ticket, Decimal("0.4"), 10)
        assert await reconciling and a.limiter.up
        await b.refresh()
        key = ticket.holds["client"].key
        assert b.limiter.known[key] == (400_000_000, 0)  # charged, and its hold given back
        other = await attempt(b.limiter, "other", lim, "0.1")  # its slot is free again
        assert not isinstance(other, Refused)
        await b.limiter.settle(other, Decimal("0.1"), 1)


async def test_a_provider_reservation_that_waited_for_a_reconcile_is_held_in_redis(
    redis_server: RedisServer,
) -> None:
    """A fallback provider's reservation made while a reconcile holds the lock, which put the
    limiter back on Redis: held and charged in Redis, where every replica sees the provider's
    budget, not in this replica's counters."""
    clock = Clock()
    lim = limits(rpm=1000)
    budget = limits(budget={"usd": "1", "period": "day"}).budget
    assert budget is not None
    async with replica(redis_server.url, clock) as a, replica(redis_server.url, clock) as b:
        a.configure([("provider", "p", budget)], ["c"])
        b.configure([("provider", "p", budget)], ["c"])
        redis_server.stop()
        await a.tick()
        assert a.limiter.degraded
        ticket = await attempt(a.limiter, "outage", lim, "0")
        assert not isinstance(ticket, Refused)
        redis_server.start()  # empty: the other replica's lease is gone, it reconciles too
        await b.tick()
        await b.tick()
        assert b.limiter.up
        reconciling = asyncio.ensure_future(a.reconcile())
        await asyncio.sleep(0)  # it holds the lock, on its way to Redis
        assert a.limiter.lock.locked()
        assert await a.limiter.reserve(ticket, "p", budget, Decimal("0.4"))
        assert await reconciling and a.limiter.up
        assert ticket.holds["p"].epoch == a.limiter.epoch
        await a.limiter.settle(ticket, Decimal("0.4"), 10)
        await b.refresh()
        assert b.limiter.known[ticket.holds["p"].key] == (400_000_000, 0)


class SteppingClock(Clock):
    """A clock that moves on `step` seconds at each reading once told to (time passing while
    a call to Redis fails)."""

    step = 0.0

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now


async def test_a_settlement_that_falls_back_is_told_its_use_as_the_clock_reads_then(
    redis_server: RedisServer,
) -> None:
    """Redis goes away under a settlement: it is settled in this replica's counts, and the use
    it answers (the remaining-* headers) is counted when it is settled, not when it began; but
    for its requests, which say what remained once this request was counted (docs/reference.md
    §13): the first was still in the window then."""
    clock = SteppingClock()
    lim = limits(rpm=5)
    async with replica(redis_server.url, clock, lease_ms=300_000) as a:
        first = await attempt(a.limiter, "r0", lim, "0")
        await a.limiter.settle(first, Decimal(0), 0)
        clock.advance(59.5)
        second = await attempt(a.limiter, "r1", lim, "0")
        assert a.limiter.up
        redis_server.stop()
        clock.step = 1.0  # the call to Redis takes a while to fail: the first request leaves
        use = await a.limiter.settle(second, Decimal(0), 0)
        assert not a.limiter.up
        assert use is not None and use.requests == 2 and use.in_flight == 0
        assert use.remaining(lim)["x-switchboard-remaining-requests"] == "3"
        assert a.limiter.peek("c", lim).requests == 1  # the first has left the window since


async def test_a_provider_hold_given_back_while_a_reconcile_hands_it_to_redis_is_released_there(
    redis_server: RedisServer,
) -> None:
    """A provider's hold taken while Redis was away and given back (the attempt failed) while a
    reconcile holds the lock: the reconcile tells Redis it is reserved, under this replica's
    live epoch, so it must be given back in Redis, or the provider's budget keeps it forever."""
    clock = Clock()
    lim = limits(rpm=1000)
    budget = limits(budget={"usd": "1", "period": "day"}).budget
    assert budget is not None
    async with replica(redis_server.url, clock) as a, replica(redis_server.url, clock) as b:
        a.configure([("provider", "p", budget)], ["c"])
        b.configure([("provider", "p", budget)], ["c"])
        redis_server.stop()
        await a.tick()
        assert a.limiter.degraded
        ticket, taken = await a.limiter.admit("r", "c", lim, Decimal(0), ("p", budget, Decimal("0.4")))
        assert taken is True
        key = ticket.holds["p"].key
        redis_server.start()  # empty: the other replica's lease is gone, it reconciles too
        await b.tick()
        await b.tick()
        assert b.limiter.up
        reconciling = asyncio.ensure_future(a.reconcile())
        await asyncio.sleep(0)  # it holds the lock, on its way to Redis
        assert a.limiter.lock.locked()
        await a.limiter.release(ticket, "p")
        assert await reconciling and a.limiter.up
        await a.limiter.settle(ticket, Decimal(0), 0)
        await b.refresh()
        assert b.limiter.known[key] == (0, 0)


async def test_a_provider_hold_given_back_by_a_request_that_leaves_during_a_reconcile_is_released(
    redis_server: RedisServer,
) -> None:
    """As above, with the request cancelled while its hold waits for the reconcile: the hold
    is given back all the same (in Redis), and the request's settlement waits for that."""
    clock = Clock()
    budget = limits(budget={"usd": "1", "period": "day"}).budget
    assert budget is not None
    async with replica(redis_server.url, clock) as a, replica(redis_server.url, clock) as b:
        a.configure([("provider", "p", budget)], ["c"])
        b.configure([("provider", "p", budget)], ["c"])
        redis_server.stop()
        await a.tick()
        ticket, taken = await a.limiter.admit(
            "r", "c", limits(rpm=1000), Decimal(0), ("p", budget, Decimal("0.4"))
        )
        assert taken is True
        key = ticket.holds["p"].key
        redis_server.start()
        await b.tick()
        await b.tick()
        reconciling = asyncio.ensure_future(a.reconcile())
        await asyncio.sleep(0)
        assert a.limiter.lock.locked()
        releasing = asyncio.ensure_future(a.limiter.release(ticket, "p"))
        await asyncio.sleep(0)
        releasing.cancel()  # the client left
        with contextlib.suppress(asyncio.CancelledError):
            await releasing
        assert await reconciling and a.limiter.up
        await a.limiter.settle(ticket, Decimal(0), 0)
        await b.refresh()
        assert b.limiter.known[key] == (0, 0)

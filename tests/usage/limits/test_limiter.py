"""The limiter on its own counters (no Redis): order of checks, windows, budgets that hold
under concurrency, settling once, periods rolling over on an injected clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest

from service.config.metering import Budget, Limits
from service.usage.limits.amounts import amount_units, charge_units, usd, usd_text
from service.usage.limits.limiter import Limiter
from service.usage.limits.remote import Remote
from service.usage.limits.tickets import Refused
from service.usage.record import money, to_usd


class Clock:
    """Wall-clock seconds that tests move."""

    def __init__(self, start: str = "2026-12-04T12:00:00") -> None:
        self.now = datetime.fromisoformat(start).replace(tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limits(**fields: Any) -> Limits:
    return Limits.model_validate(fields)


async def admit(limiter: Limiter, n: int, lim: Limits | None, cost: str = "0") -> Any:
    ticket, _ = await limiter.admit(f"r{n}", "c", lim, Decimal(cost))
    return ticket


async def test_rpm_counts_down_to_zero_then_refuses_with_when_the_window_frees() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    lim = limits(rpm=5)
    remaining = []
    for n in range(5):
        ticket = await admit(limiter, n, lim)
        remaining.append(ticket.use.remaining(lim)["x-switchboard-remaining-requests"])
        await limiter.settle(ticket, Decimal(0), 0)
        clock.advance(1)
    assert remaining == ["4", "3", "2", "1", "0"]
    with pytest.raises(Refused) as refused:
        await admit(limiter, 9, lim)
    assert refused.value.limit == "rpm"
    assert refused.value.retry_ms == 55_000  # the first request leaves the window 60 s after it came
    assert refused.value.use.remaining(lim)["x-switchboard-remaining-requests"] == "0"
    clock.advance(55)
    await admit(limiter, 10, lim)


async def test_checks_run_in_order_and_a_refused_request_consumes_nothing() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    lim = limits(rpm=2, max_parallel=1, tpm=100, budget={"usd": "1", "period": "day"})
    first = await admit(limiter, 1, lim, "0.5")
    with pytest.raises(Refused) as refused:  # max_parallel before rpm, tpm, budget
        await admit(limiter, 2, lim, "5")
    assert refused.value.limit == "max_parallel"
    await limiter.settle(first, Decimal("0.25"), 150)
    with pytest.raises(Refused) as refused:  # now the tokens of the last 60 s have reached tpm
        await admit(limiter, 3, lim, "5")
    assert refused.value.limit == "tpm"
    counts = limiter.counters.counts("c", limiter.now_ms())
    assert (counts.requests, counts.in_flight) == (1, 0)  # the refused ones counted nowhere
    assert (
        limiter.spent_here(limiter.hold("client", "c", lim.budget, Decimal(0), limiter.now_ms()).key)[0]
        == 250_000_000
    )  # type: ignore[arg-type]


async def test_a_budget_refuses_what_it_cannot_cover_and_says_when_the_period_ends() -> None:
    clock = Clock("2026-12-04T23:59:59.900")
    limiter = Limiter(clock=clock)
    told: list[tuple[str, str, Any]] = []
    limiter.on_exhausted = lambda kind, subject, window: told.append((kind, subject, window.end_text))
    lim = limits(budget={"usd": "1", "period": "day"})
    ticket = await admit(limiter, 1, lim, "0.6")
    with pytest.raises(Refused) as refused:
        await admit(limiter, 2, lim, "0.6")  # 0.6 spent or held + 0.6 > 1
    assert refused.value.limit == "budget" and refused.value.window is not None
    assert refused.value.window.end_text == "2026-12-05T00:00:00Z"
    with pytest.raises(Refused):
        await admit(limiter, 3, lim, "0.6")
    assert told == [("client", "c", "2026-12-05T00:00:00Z")]  # once per subject and period
    await limiter.settle(ticket, Decimal("0.9"), 10)
    clock.advance(0.1)  # 00:00:00.0: a new day, nothing spent in it
    await admit(limiter, 4, lim, "0.6")


async def test_an_admissions_use_is_the_clients_use_counted_at_that_moment() -> None:
    """What an admission answers (a stream's remaining-* headers) is what `local_use` counts at
    the same moment: the window trimmed, the request itself in it and in flight, its budget's
    reservation held; a settlement's too, once it is counted."""
    clock = Clock()
    limiter = Limiter(clock=clock)
    lim = limits(rpm=100, tpm=10_000, max_parallel=10, budget={"usd": "5", "period": "day"})
    first = await admit(limiter, 1, lim, "1")
    await limiter.settle(first, Decimal("0.5"), 40)
    clock.advance(30)
    second = await admit(limiter, 2, lim, "1")
    clock.advance(31)  # the first request and its tokens have left the window; the second not
    third = await admit(limiter, 3, lim, "2")
    hold = third.holds["client"]
    assert third.use == limiter.local_use("c", hold)
    assert (third.use.requests, third.use.tokens, third.use.in_flight) == (2, 0, 2)
    assert (third.use.spent, third.use.reserved) == (500_000_000, 3_000_000_000)
    assert third.use.remaining(lim)["x-switchboard-budget-remaining-usd"] == "1.5"
    await limiter.settle(second, Decimal("0.25"), 7)
    assert second.use == limiter.local_use("c", hold)
    assert (second.use.requests, second.use.tokens, second.use.in_flight) == (2, 7, 1)
    assert (second.use.spent, second.use.reserved) == (750_000_000, 2_000_000_000)


async def test_a_hundred_concurrent_requests_against_a_budget_that_covers_ten() -> None:
    limiter = Limiter(clock=Clock())
    lim = limits(budget={"usd": "1", "period": "total"})
    admitted = []

    async def one(n: int) -> None:
        try:
            ticket = await admit(limiter, n, lim, "0.1")
        except Refused:
            return
        admitted.append(ticket)
        await asyncio.sleep(0)
        await limiter.settle(ticket, Decimal("0.1"), 5)

    await asyncio.gather(*(one(n) for n in range(100)))
    key = next(iter(limiter.counters.spent))
    assert len(admitted) == 10 and usd(limiter.spent_here(key)[0]) == Decimal(1)


async def test_settling_twice_charges_once_and_an_answer_without_usage_is_charged_its_hold() -> None:
    limiter = Limiter(clock=Clock())
    lim = limits(budget={"usd": "10", "period": "month"})
    ticket = await admit(limiter, 1, lim, "2")
    await limiter.settle(ticket, Decimal("0.5"), 1)
    await limiter.settle(ticket, Decimal("0.5"), 1)
    key = ticket.holds["client"].key
    assert limiter.spent_here(key) == (500_000_000, 0)


async def test_a_provider_budget_holds_apart_from_the_client() -> None:
    limiter = Limiter(clock=Clock())
    budget = Budget(usd=Decimal("1"), period="day")
    first, taken = await limiter.admit("a", "c", None, Decimal(0), ("p", budget, Decimal("0.8")))
    assert taken is True
    second, taken = await limiter.admit("b", "c", None, Decimal(0), ("p", budget, Decimal("0.8")))
    assert taken is False and "p" not in second.holds
    await limiter.release(first, "p")  # its attempt failed: nothing charged
    assert await limiter.reserve(second, "p", budget, Decimal("0.8")) is True
    await limiter.settle(second, Decimal("0.3"), 0)
    assert limiter.spent_here(second.holds["p"].key) == (300_000_000, 0)


async def test_what_was_spent_before_the_start_counts() -> None:
    limiter = Limiter(clock=Clock())
    lim = limits(budget={"usd": "1", "period": "day"})
    key = limiter.hold("client", "c", lim.budget, Decimal(0), limiter.now_ms()).key  # type: ignore[arg-type]
    limiter.seed[key] = 900_000_000
    with pytest.raises(Refused):
        await admit(limiter, 1, lim, "0.2")
    await admit(limiter, 2, lim, "0.1")


async def test_what_is_kept_of_past_periods_is_dropped() -> None:
    clock = Clock("2026-12-04T23:59:00")
    limiter = Limiter(clock=clock)
    lim = limits(budget={"usd": "10", "period": "day"})
    for n in range(3):
        ticket = await admit(limiter, n, lim, "1")
        await limiter.settle(ticket, Decimal(1), 1)
        clock.advance(86_400)
    current = limiter.hold("client", "c", lim.budget, Decimal(0), limiter.now_ms()).key  # type: ignore[arg-type]
    assert len(limiter.counters.spent) == 3
    limiter.forget({current})
    assert set(limiter.counters.spent) <= {current}


def test_a_charge_is_the_same_exact_nano_dollars_however_often_and_in_whatever_order_asked() -> None:
    """Charges are remembered (issue 22): what is remembered is what the decimal arithmetic gives,
    for equal amounts written with any exponent, past as many amounts as are remembered."""
    amounts = [Decimal(n).scaleb(-exp) for n in range(0, 3000, 7) for exp in (0, 9, 10, 13)]
    amounts += [Decimal("0.10"), Decimal("0.1"), Decimal("1E-10"), Decimal("-1"), Decimal(2**80)]
    expected = [
        0 if a <= 0 else min(int((a * 10**9).to_integral_value(rounding=ROUND_CEILING)), 2**62)
        for a in amounts
    ]
    for _ in range(3):
        assert [charge_units(a) for a in amounts] == expected
        assert [charge_units(a) for a in reversed(amounts)] == expected[::-1]


def test_nano_dollars_are_written_as_the_decimal_amount_is() -> None:
    """The remaining-* header and `/limits` write nano-dollars in whole-number arithmetic (issue
    22): the same text as the exact decimal amount gives, whatever the number."""
    units = [0, 1, 9, 10, 999_999_999, 10**9, 10**9 + 1, 5 * 10**9, 1_500_000_000, 2**62 - 1, 2**62]
    units += [-1, -(10**9)]
    units += [n * 10**exp + extra for n in range(1, 2000, 37) for exp in range(0, 13, 4) for extra in (0, 1)]
    assert [usd_text(n) for n in units] == [money(usd(n)) for n in units]


def test_a_budget_changed_in_its_period_holds_at_its_new_limit_at_once() -> None:
    limiter = Limiter(clock=lambda: 1_764_900_000.0)
    now = limiter.now_ms()
    first = limiter.hold("client", "c", Budget(usd=Decimal(5), period="month"), Decimal("0.5"), now)
    same = limiter.hold("client", "c", Budget(usd=Decimal(5), period="month"), Decimal("0.5"), now)
    raised = limiter.hold("client", "c", Budget(usd=Decimal(7), period="month"), Decimal("0.5"), now)
    other = limiter.hold("provider", "c", Budget(usd=Decimal(9), period="day"), Decimal("0.5"), now)
    assert (first.limit, same.limit, raised.limit, other.limit) == (
        5 * 10**9,
        5 * 10**9,
        7 * 10**9,
        9 * 10**9,
    )
    assert first.key == raised.key == "client:c:month:2025-12" and other.key.startswith("provider:c:day:")
    assert first.amount == raised.amount == 5 * 10**8


# -- nano-dollars from the gateway's atto-dollars (issue 22) ----------------------------------------


def test_atto_dollars_are_charged_in_nano_dollars_rounded_up_as_decimals_are() -> None:
    """`amount_units` rounds an `int` of atto-dollars up, in whole numbers, to what
    `charge_units` makes of the same amount in USD: a budget never counts less than was spent."""
    attos = [0, 1, 999_999_999, 10**9, 10**9 + 1, 750_000_000_000, 10**18, 10**18 + 1, -5, 2**100]
    attos += [n * 10**exp + extra for n in range(1, 3000, 41) for exp in (0, 5, 9, 14) for extra in (0, 1)]
    for atto in attos:
        assert amount_units(atto) == charge_units(to_usd(atto))
        assert amount_units(atto) * 10**9 >= min(atto, 2**62 * 10**9)
    assert amount_units(Decimal("1E-10")) == 1 and amount_units(Decimal("0.5")) == 500_000_000


async def test_the_units_forms_count_what_the_usd_forms_count() -> None:
    """`admit_units`, `reserve_units`, `settle_units` and `hold_units` take nano-dollars; `admit`,
    `reserve`, `settle` and `hold` (USD) are them, rounded up: the same counters either way."""
    budget = Budget(usd=Decimal("1"), period="day")
    lim = limits(budget={"usd": "1", "period": "day"})
    by_usd, by_units = Limiter(clock=Clock()), Limiter(clock=Clock())
    ticket_a, taken_a = await by_usd.admit(
        "a", "c", lim, Decimal("0.3000000001"), ("p", budget, Decimal("0.2"))
    )
    ticket_b, taken_b = await by_units.admit_units("a", "c", lim, 300_000_001, ("p", budget, 200_000_000))
    assert taken_a is taken_b is True
    assert await by_usd.reserve(ticket_a, "q", budget, Decimal("0.7")) is True
    assert await by_units.reserve_units(ticket_b, "q", budget, 700_000_000) is True
    await by_usd.settle(ticket_a, Decimal("0.00000000011"), 3)
    await by_units.settle_units(ticket_b, 1, 3)
    for limiter in (by_usd, by_units):
        now = limiter.now_ms()
        keys = [
            limiter.hold_units(kind, who, budget, 0, now).key
            for kind, who in (("client", "c"), ("provider", "p"), ("provider", "q"))
        ]
        assert [limiter.spent_here(key) for key in keys] == [(1, 0), (1, 0), (1, 0)]
    held = by_units.hold("client", "c", budget, Decimal("1E-12"), by_units.now_ms())
    assert held.amount == 1 and held.limit == 10**9


async def test_a_budget_is_exact_under_many_concurrent_requests_in_units() -> None:
    """Two hundred requests at once, each holding 10,000,001 nano-dollars against one dollar: 99
    fit; each settled to an odd cost in atto-dollars, the budget counts their nano-dollars
    rounded up, exactly, and nothing stays reserved."""
    limiter = Limiter(clock=Clock())
    lim = limits(budget={"usd": "1", "period": "total"})
    cost = 5 * 10**15 + 3  # atto-dollars: 5,000,001 nano-dollars once rounded up
    admitted = []

    async def one(n: int) -> None:
        try:
            ticket, _ = await limiter.admit_units(f"r{n}", "c", lim, amount_units(10**16 + 1))
        except Refused:
            return
        admitted.append(ticket)
        await asyncio.sleep(0)
        await limiter.settle_units(ticket, amount_units(cost), 5)

    await asyncio.gather(*(one(n) for n in range(200)))
    key = next(iter(limiter.counters.spent))
    assert len(admitted) == 99
    assert limiter.spent_here(key) == (99 * 5_000_001, 0)
    assert usd_text(limiter.spent_here(key)[0]) == "0.495000099"


async def test_an_admission_that_waited_for_a_reconcile_is_told_its_use_when_it_is_admitted() -> None:
    """Redis configured and away: an admission waits while a reconcile holds the lock, and is
    counted at the time it came; the use it is told (its remaining-* headers) is the use when
    it is admitted, as the clock reads then: a request that left the 60 s window meanwhile no
    longer counts."""
    clock = Clock()
    limiter = Limiter(remote=Remote("redis://127.0.0.1:9/0"), clock=clock)  # never reached
    lim = limits(rpm=5)
    first = await admit(limiter, 0, lim)
    await limiter.settle(first, Decimal(0), 0)
    clock.advance(59.5)
    async with limiter.lock:  # a reconcile, on its way to a Redis that does not answer
        waiting = asyncio.ensure_future(admit(limiter, 1, lim))
        await asyncio.sleep(0)
        assert not waiting.done()
        clock.advance(1)  # the first request leaves the window meanwhile
    ticket = await waiting
    assert ticket.use.requests == 1
    assert ticket.use.remaining(lim)["x-switchboard-remaining-requests"] == "4"
    assert limiter.local_use("c", None).requests == 1
    await limiter.settle(ticket, Decimal(0), 0)
    assert limiter.remote is not None
    await limiter.remote.aclose()

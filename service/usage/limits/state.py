"""A limiter's state (`Limiter`'s base): its counters, what Redis last answered, the requests
in flight, this replica's epoch; and what is read of it without counting anything: the
current window of a period, a budget's hold in it, and the budgets that refused (each reported
once per period).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from service.config.metering import Budget, Period
from service.usage.limits.amounts import charge_units, limit_units
from service.usage.limits.counters import Counters
from service.usage.limits.remote import Remote
from service.usage.limits.tickets import Hold, Ticket, budget_key
from service.usage.periods import Window, window

WithoutRedis = Literal["local", "refuse"]
Clock = Callable[[], float]
"""Wall-clock seconds (time.time); tests pass their own to cross a period's end."""
LEASE_MS = 15_000
"""How long an epoch's lease lasts unrenewed: what a dead replica held is released after it."""


class LimiterState:
    """What a `Limiter` holds, in Redis or in this process, and what it reads of it."""

    def __init__(
        self,
        *,
        remote: Remote | None = None,
        without_redis: WithoutRedis = "local",
        clock: Clock = time.time,
        lease_ms: int = LEASE_MS,
    ) -> None:
        self.remote = remote
        self.without_redis = without_redis
        self.clock = clock
        self.lease_ms = lease_ms
        self.counters = Counters()
        self.providers = Counters()
        """Each provider's requests and tokens through this replica (what `/limits` shows)."""
        self.up = False
        """Redis is in use now."""
        self.epoch = _new_epoch()
        self.fresh = True
        """`epoch` has no lease in Redis yet."""
        self.old: str | None = None
        """The epoch in use before Redis went away: what it holds is reconciled."""
        self.replicas = 1
        """Live replicas last seen in Redis (this one included)."""
        self.known: dict[str, tuple[int, int]] = {}
        """Budget key -> (spent, reserved) as Redis last answered."""
        self.seed: dict[str, int] = {}
        """Budget key -> spent before this process counted (ledger, snapshot)."""
        self.shares: dict[str, tuple[int, int]] = {}
        """Budget key -> (limit, share) this replica may spend while Redis is away."""
        self.pending_old: dict[str, int] = {}
        """Budget key -> costs of holds of `old` settled while Redis is away."""
        self.unsynced_requests: dict[str, list[tuple[float, str]]] = {}
        self.unsynced_tokens: dict[str, list[tuple[float, str, int]]] = {}
        self.tickets: dict[str, Ticket] = {}
        """Admitted requests not settled yet, by id."""
        self.unknown: dict[str, asyncio.Event] = {}
        """Budget keys a change of the files just gave a budget, while what was spent in their
        period before it is read (`Keeper.configure`): a request counted toward one waits."""
        self.lock = asyncio.Lock()
        """Held while reconciling: local changes wait for it (a moment, on a Redis that answers)."""
        self.on_exhausted: Callable[[str, str, Window], None] | None = None
        """Told `(kind, subject, window)` the first time a budget refuses in a period."""
        self._reported: set[tuple[str, str, str | None]] = set()
        """(kind, subject, period_end) of the budgets whose `budget.exhausted` is in the log."""
        self._windows: dict[Period, tuple[Window, float]] = {}
        """Period -> its current window and the millisecond it ends (inf: never)."""
        self._keys: dict[tuple[str, str], tuple[Window, str, int, Budget]] = {}
        """(kind, subject) -> its current window, key and limit, and the budget they are of: made
        once per period and version of the budget (its object, not its hash, is compared)."""
        self._background: set[asyncio.Task[Any]] = set()

    # -- state ---------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """`redis` while Redis is in use, else `local` or `refuse` (`/readyz`'s `limits`)."""
        if self.remote is not None and self.up:
            return "redis"
        return "local" if self.remote is None else self.without_redis

    @property
    def degraded(self) -> bool:
        """Redis is configured but not in use now."""
        return self.remote is not None and not self.up

    def now_ms(self) -> float:
        return self.clock() * 1000

    def window(self, period: Period, now_ms: float) -> Window:
        """The current window of `period` (cached until it ends)."""
        found = self._windows.get(period)
        if found is None or now_ms >= found[1]:
            current = window(period, _datetime(now_ms))
            end = current.end
            found = self._windows[period] = (current, math.inf if end is None else end.timestamp() * 1000)
        return found[0]

    def hold(self, kind: str, subject: str, budget: Budget, cost: Decimal, now_ms: float) -> Hold:
        """A reservation of `cost` (USD) against `subject`'s `budget`, not taken yet."""
        return self.hold_units(kind, subject, budget, charge_units(cost), now_ms)

    def hold_units(self, kind: str, subject: str, budget: Budget, units: int, now_ms: float) -> Hold:
        """A reservation of `units` nano-dollars against `subject`'s `budget`, not taken yet."""
        current = self.window(budget.period, now_ms)
        named = (kind, subject)
        found = self._keys.get(named)
        if found is None or found[0] is not current or found[3] is not budget:
            if len(self._keys) > 100_000:
                self._keys.clear()
            found = self._keys[named] = (
                current,
                budget_key(kind, subject, current),
                limit_units(budget.usd),
                budget,
            )
        return Hold(found[1], subject, found[2], units, current)

    # -- refusals ------------------------------------------------------------------------------

    def _refused(self, limit: str, ticket: Ticket, hold: Hold | None) -> None:
        if limit == "budget" and hold is not None:
            self.exhausted("client", ticket.client, hold)

    def _refused_provider(self, hold: Hold) -> None:
        self.exhausted("provider", hold.subject, hold)

    def forget(self, current: set[str]) -> None:
        """Drop what is known of budget keys no longer `current` (past periods, removed budgets)
        and held by no request in flight: the maps stay as small as the configuration."""
        held = {h.key for t in self.tickets.values() for h in t.holds.values()}
        if self.remote is None:  # its counts are the only ones: a past period's are no longer read
            for counts in (self.counters.spent, self.counters.reserved):
                for key in [k for k in counts if k not in current and k not in held]:
                    del counts[key]
        keep = current | held | set(self.counters.spent) | set(self.counters.reserved) | set(self.pending_old)
        tables: tuple[dict[str, Any], ...] = (self.known, self.seed, self.shares)
        for table in tables:
            for key in [k for k in table if k not in keep]:
                del table[key]

    def exhausted(self, kind: str, subject: str, hold: Hold) -> None:
        """Report a budget that refused, once per subject and period in this replica's log
        (what the log already holds is marked at start: `reported`)."""
        if not self.reported(kind, subject, hold.window.end_text):
            return
        if self.on_exhausted is not None:
            self.on_exhausted(kind, subject, hold.window)

    def reported(self, kind: str, subject: str, period_end: str | None) -> bool:
        """Mark the `budget.exhausted` of `subject`'s period ending `period_end` (None: `total`)
        as written; False when it was already."""
        key = (kind, subject, period_end)
        if key in self._reported:
            return False
        if len(self._reported) > 100_000:  # past periods' marks: kept only while they matter
            now = _datetime(self.now_ms()).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._reported = {k for k in self._reported if k[2] is None or k[2] > now}
        self._reported.add(key)
        return True


def _new_epoch() -> str:
    return secrets.token_hex(8)


def _datetime(now_ms: float) -> datetime:
    return datetime.fromtimestamp(now_ms / 1000, UTC)

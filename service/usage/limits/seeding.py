"""What budgets spent before this process counted them (`Keeper`'s base): read at start and,
for a budget new in the files, at once (the ledger, else the local snapshot plus the spool),
into `Limiter.seed`; with Redis, given to Redis (`seed`). The keeper's module docstring says
how each case is counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from service.config.metering import Budget
from service.usage.limits.amounts import charge_units
from service.usage.limits.in_redis import _expiry
from service.usage.limits.limiter import Limiter
from service.usage.limits.remote import Unavailable
from service.usage.limits.spent import Snapshot, SpentFile, SpentSource, SpoolSource
from service.usage.limits.tickets import Hold, budget_key
from service.usage.periods import Window

# The keeper's logger, as before the seeding was a module of its own: what operators filter on.
log = logging.getLogger("service.usage.limits.keeper")

SYNC_S = 1.0
SNAPSHOT_S = 5.0
SOURCE_TIMEOUT_S = 10.0
"""The longest the ledger may take to say what one budget spent, at start."""
Gauge = Callable[[str, str, Decimal], None]
"""Told `(kind, subject, spent_usd)` for each budget, every second."""


class Seeder:
    """Reads what a `Limiter`'s budgets spent before it counted them, and gives it to Redis."""

    def __init__(
        self,
        limiter: Limiter,
        *,
        source: SpentSource | None = None,
        file: SpentFile | None = None,
        gauge: Gauge | None = None,
        interval_s: float = SYNC_S,
        snapshot_s: float = SNAPSHOT_S,
    ) -> None:
        self.limiter = limiter
        self.source = source
        self.file = file
        self.gauge = gauge
        self.interval_s = interval_s
        self.snapshot_s = snapshot_s
        self.budgets: tuple[tuple[str, str, Budget], ...] = ()
        """(kind, subject, budget) of every budget in the configuration."""
        self.counted_since: dict[tuple[str, str, str], float] = {}
        """(kind, subject, period) -> since when (the limiter's milliseconds) the configuration
        has had that budget: what this process counted of it began then."""
        self.clients: tuple[str, ...] = ()
        """Clients with limits: their counters are in Redis."""
        self.left: dict[tuple[str, str, str], float] = {}
        """(kind, subject, period) -> when the configuration took that budget away (or gave it
        another period): what this replica counted of it until then is in Redis."""
        self.unseeded: dict[str, tuple[int | None, int, Window, int]] = {}
        """With Redis: budget key -> (what it spent before the change, for a budget that came
        mid-run; what it spent in its period; its window; what this replica's requests in flight
        hold of it under another key), not yet given to Redis (`seed`)."""
        self._loaded_ms: float | None = None
        """When `load` began: a budget the configuration got after it came mid-run."""
        self.ready = asyncio.Event()
        self._seeding = asyncio.Lock()
        """Held while budgets' spent is read and given to Redis (a tick, or a change of the files)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._snapshot: Snapshot | None = None
        self._written: dict[str, tuple[int, int]] | None = None
        self._last_write = 0.0

    def configure(self, budgets: Iterable[tuple[str, str, Budget]], clients: Iterable[str]) -> None:
        """The configuration's budgets and limited clients (on each change of the files)."""
        self.budgets = tuple(budgets)
        self.clients = tuple(clients)
        now, before = self.limiter.now_ms(), self.counted_since
        self.counted_since = {
            (kind, subject, b.period): before.get((kind, subject, b.period), now)
            for kind, subject, b in self.budgets
        }
        for gone in before.keys() - self.counted_since.keys():
            self.left[gone] = now
        if self._loaded_ms is not None:  # a change of the files: its new budgets are read at once
            self._learn([(k, s, b) for k, s, b in self.budgets if (k, s, b.period) not in before], now)

    def _learn(self, came: list[tuple[str, str, Budget]], now: float) -> None:
        """Read what budgets new in the files spent in their period before the change, now, not
        at the next tick: a request counted toward one waits for it (`Limiter.unknown`), so that
        none is admitted against a counter without it (docs/reference.md §13.2)."""
        limiter = self.limiter
        keys = []
        for kind, subject, budget in came:
            key = budget_key(kind, subject, limiter.window(budget.period, now))
            if key not in limiter.seed and key not in limiter.unknown:
                limiter.unknown[key] = asyncio.Event()
                keys.append(key)
        if keys:
            task = asyncio.get_running_loop().create_task(self._seed_now(keys))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _seed_now(self, keys: list[str]) -> None:
        limiter = self.limiter
        try:
            async with self._seeding:
                await self.seed_missing()
                if limiter.remote is not None and limiter.up:
                    await self._seed_remote()
        except Exception:  # the requests go on all the same: the next tick tries again
            log.exception("limits: what the budgets new in the files spent cannot be read")
        finally:
            for key in keys:
                event = limiter.unknown.pop(key, None)
                if event is not None:
                    event.set()

    async def seed_missing(self) -> None:
        """Load the spent of every budget whose current period has none loaded yet."""
        limiter = self.limiter
        now = limiter.now_ms()
        for kind, subject, budget in self.budgets:
            current = limiter.window(budget.period, now)
            key = budget_key(kind, subject, current)
            if key in limiter.seed:
                continue
            since = self.counted_since.get((kind, subject, budget.period), now)
            held = self._held_elsewhere(kind, subject, key, current)  # before the ledger is read
            left = self.left.pop((kind, subject, budget.period), None)
            if limiter.remote is not None and self._came_mid_run(since, current):
                await self._seed_mid_run(kind, subject, key, current, since, held, left)
                continue
            spent = await self._seed(kind, subject, key, current, since)
            limiter.seed[key] = spent + held
            if limiter.remote is not None:  # Redis keeps the larger, and knows it is seeded
                self.unseeded[key] = (None, spent, current, held)

    def _held_elsewhere(self, kind: str, subject: str, key: str, current: Window) -> int:
        """What this replica's requests in flight that arrived in `current` hold of `subject`'s
        budget under another key: admitted before a change of the files gave the budget its
        period, they count toward it too, though no record of them is in the ledger yet (nor
        will their cost be counted under `key`). Their reservations, as what they will cost is
        not known yet: over, never under."""
        start = current.start.timestamp() * 1000
        held = 0
        for ticket in self.limiter.tickets.values():
            if (
                ticket.settled
                or ticket.admitted_ms < start
                or (kind == "client" and ticket.client != subject)
            ):
                continue
            hold = ticket.holds.get("client" if kind == "client" else subject)
            if hold is not None and hold.key != key:
                held += hold.amount
        return held

    async def _seed(self, kind: str, subject: str, key: str, current: Window, since: float) -> int:
        """What a budget spent in its period before this process counted it (since `since`)."""
        counters = self.limiter.counters
        if key not in counters.spent and key not in counters.reserved:
            return await self._spent_before(kind, subject, key, current)
        if since <= current.start.timestamp() * 1000:
            return 0  # a period that began while this process counted it
        # A budget (or a period) new in the configuration, already counted here since it came:
        # what was spent in its period before that stays spent (reference §13).
        until = datetime.fromtimestamp(since / 1000, UTC)
        return await self._spent_before(kind, subject, key, current, until)

    def _came_mid_run(self, since: float, current: Window) -> bool:
        """The configuration got a budget at `since`, after `load` began, in its current period."""
        loaded = self._loaded_ms
        return loaded is not None and since > loaded and since > current.start.timestamp() * 1000

    async def _seed_mid_run(
        self,
        kind: str,
        subject: str,
        key: str,
        current: Window,
        since: float,
        held: int,
        left: float | None,
    ) -> None:
        """Read what a budget that came mid-run (at `since`) spent in its period, before then and
        in all, for Redis (`_seed_remote`), with what this replica's requests in flight `held` of
        it; this replica holds to it meanwhile if Redis is away. With a ledger of this replica's
        own, one that this replica counted in Redis until it `left` (the files took it away, or
        gave it another period) adds only what it spent since: the rest is in Redis."""
        until = datetime.fromtimestamp(since / 1000, UTC)
        before = await self._spent_before(kind, subject, key, current, until)
        whole = await self._spent_before(kind, subject, key, current)
        self.limiter.seed[key] = before + held
        added = before
        if left is not None and left > current.start.timestamp() * 1000 and not self._shared():
            start = datetime.fromtimestamp(left / 1000, UTC)
            added = await self._spent_before(kind, subject, key, current, until, start)
        self.unseeded[key] = (added, max(before, whole), current, held)

    def _shared(self) -> bool:
        """Whether the ledger holds every replica's records (PostgreSQL), or only this one's."""
        return bool(getattr(self.source, "shared", True))

    async def _seed_remote(self) -> None:
        """Give Redis what budgets newly loaded spent (`seed`): added once for one that came
        mid-run, a floor for any other; each is then marked seeded there."""
        limiter = self.limiter
        current = {key for key, _ in self._keys()}
        for key in [k for k in self.unseeded if k not in current]:
            del self.unseeded[key]  # its period ended, or the budget went again
        if not self.unseeded:
            return
        keys = list(self.unseeded)
        # A ledger of this replica's own (SQLite) holds none of the others' records: what each
        # spent before the change is in its own, and each adds it (docs/reference.md §13.4).
        each = 0 if self._shared() else 1
        entries = [
            {
                "k": key,
                "before": "" if before is None else str(before),
                "each": each,
                "since": str(whole),
                "held": str(held),
                "exp": _expiry(Hold(key, "", 0, 0, window_)),
            }
            for key, (before, whole, window_, held) in self.unseeded.items()
        ]
        try:
            answer = await limiter.call("seed", limiter.now_ms(), {"keys": entries})
            states = _listed(answer.get("keys"))
            if len(states) != len(keys):
                raise Unavailable("Redis answered something the script does not answer")
            for key, state in zip(keys, states, strict=True):
                limiter._known(key, state)
                del self.unseeded[key]
        except Unavailable as exc:
            limiter.lose(str(exc))

    async def _spent_before(
        self,
        kind: str,
        subject: str,
        key: str,
        current: Window,
        until: datetime | None = None,
        start: datetime | None = None,
    ) -> int:
        source, snapshot = self.source, self._snapshot
        found: int | None = None
        if source is not None:
            try:
                async with asyncio.timeout(SOURCE_TIMEOUT_S):
                    since = current.start if start is None else start
                    amount = await source.spent(kind, subject, since, until)  # type: ignore[arg-type]
                    found = charge_units(amount)
            except Exception as exc:  # the ledger is down or off: the snapshot and the spool then
                log.info(
                    "limits: the ledger cannot say what %s %s spent (%s)", kind, subject, type(exc).__name__
                )
        if snapshot is not None and key in snapshot.budgets:
            spent, reserved = snapshot.budgets[key]
            since_snapshot = spent + reserved  # a reservation of a process that died: charged in full
            if found is None:
                since_snapshot += await self._spooled(kind, subject, snapshot.at)
            return max(found or 0, since_snapshot)
        if found is None:
            return await self._spooled(kind, subject, current.start if start is None else start)
        return found

    async def _spooled(self, kind: str, subject: str, since: datetime) -> int:
        source = self.source
        if not isinstance(source, SpoolSource):
            return 0
        try:
            async with asyncio.timeout(SOURCE_TIMEOUT_S):
                return charge_units(await source.spooled(kind, subject, since))
        except Exception as exc:
            log.warning(
                "limits: the spool cannot say what %s %s spent (%s)", kind, subject, type(exc).__name__
            )
            return 0

    def _keys(self) -> list[tuple[str, Window]]:
        now = self.limiter.now_ms()
        found = []
        for kind, subject, budget in self.budgets:
            current = self.limiter.window(budget.period, now)
            found.append((budget_key(kind, subject, current), current))
        return found


def _listed(value: Any) -> list[Any]:
    """A list the script answered (cjson writes an empty one as `{}`)."""
    if isinstance(value, list):
        return value
    if value == {}:
        return []
    raise Unavailable("Redis answered something the script does not answer")

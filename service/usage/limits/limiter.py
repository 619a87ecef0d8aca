"""The limits and budgets of docs/reference.md §13, enforced: `Limiter.admit` before a request goes, `reserve`
before each provider with a budget, `settle` when it ends. Each takes money in whole
nano-dollars as the counters hold it (`admit_units`, `reserve_units`, `settle_units`: the
gateway's atto-dollars, rounded up by `amounts.amount_units`), or in USD (`admit`, `reserve`,
`settle`: a `Decimal`, rounded up by `amounts.charge_units`); a budget never counts less than
what was spent.

**Reserve, then settle.** A request is admitted with an upper bound of its cost reserved
against each budget it counts toward (its client's; each candidate provider's before it is
tried); when it ends the reservation is replaced by the real cost. Checks and changes are one
atomic step, so whatever the concurrency, spent plus reserved never passes a budget. A
client's limits are checked in the order `max_parallel`, `rpm`, `tpm`, budget; the first that
refuses names the answer and nothing at all is counted.

**Where the counters live.** Without `SWITCHBOARD_REDIS_URL`, in this process (`Counters`),
with what the ledger (or the local snapshot) says was spent before the start (`seed`). With
Redis, in Redis, changed by one script call per check (`Remote`), so every replica enforces
one limit; this process's own counts are kept beside them all the same. When Redis cannot be
reached (a call fails or times out, the 1 s sync fails) the limiter falls back at once:
`local` enforces every rate from its own counts, and lets each budget be spent here only up to
this replica's share of what was left when Redis went away (what was left / the replicas last
seen), so budgets still hold; `refuse` refuses limited clients (503). The sync tries Redis
again every second and, once it answers, reconciles (`recovery.reconcile`): what was counted
meanwhile goes to Redis, and the limiter is back on it.

Nothing here blocks: a local check is a few dictionary and deque operations; a Redis check is
one round trip within `Remote.timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Coroutine
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar

from service.config.metering import Budget, Limits, Period
from service.usage.limits.amounts import charge_units, limit_units
from service.usage.limits.counters import Counters, Refusal
from service.usage.limits.remote import Remote, Unavailable
from service.usage.limits.tickets import Hold, Refused, Ticket, Use, budget_key
from service.usage.periods import Window, window

log = logging.getLogger(__name__)
T = TypeVar("T")

WithoutRedis = Literal["local", "refuse"]
Clock = Callable[[], float]
"""Wall-clock seconds (time.time); tests pass their own to cross a period's end."""
LEASE_MS = 15_000
"""How long an epoch's lease lasts unrenewed: what a dead replica held is released after it."""
EXPIRE_GRACE_MS = 40 * 86_400_000
"""A period's counters stay in Redis this long after it ends."""
MAX_UNSYNCED = 100_000
"""Window entries kept for Redis while it is away, per client (older ones leave the window anyway)."""


class Limiter:
    """Client limits and budgets of client and provider, in Redis or in this process."""

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

    # -- admitting -----------------------------------------------------------------------------

    async def admit(
        self,
        request_id: str,
        client: str,
        limits: Limits | None,
        client_cost: Decimal,
        provider: tuple[str, Budget, Decimal] | None = None,
    ) -> tuple[Ticket, bool | None]:
        """`admit_units` with costs in USD (each rounded up to the next nano-dollar)."""
        units = None if provider is None else (provider[0], provider[1], charge_units(provider[2]))
        return await self.admit_units(request_id, client, limits, charge_units(client_cost), units)

    async def admit_units(
        self,
        request_id: str,
        client: str,
        limits: Limits | None,
        client_units: int,
        provider: tuple[str, Budget, int] | None = None,
        now: float | None = None,
    ) -> tuple[Ticket, bool | None]:
        """Admit a request of `client`, reserving `client_units` nano-dollars against its budget
        and, when given, `provider`'s against that provider's budget; `now`: the clock's
        milliseconds, when the caller read it already.

        Returns the ticket and whether the provider's budget took it (None: none given).
        Raises `Refused` when one of the client's limits refuses (nothing is counted then).
        """
        if now is None:
            now = self.now_ms()
        ticket = Ticket(request_id, client, limits, now, counted=limits is not None)
        client_hold = None
        if limits is not None and limits.budget is not None:
            client_hold = self.hold_units("client", client, limits.budget, client_units, now)
        provider_hold = None
        if provider is not None:
            provider_hold = self.hold_units("provider", provider[0], provider[1], provider[2], now)
        if limits is not None and self.remote is not None and not self.up and self.without_redis == "refuse":
            raise Refused("unavailable", 1000, None, Use())
        # on Redis, a reconcile or a budget's spend before a change: the clock moved on since `now`
        waited = bool(self.unknown) and await self._learned(client_hold, provider_hold)
        while True:
            if self.up and (limits is not None or provider_hold is not None):
                waited = True
                admitting = asyncio.ensure_future(self._admit_remote(ticket, client_hold, provider_hold, now))
                try:
                    taken = await asyncio.shield(admitting)
                except asyncio.CancelledError:  # the client left: what Redis took is given back
                    self._later(self._orphaned(ticket, admitting))
                    raise
                except Unavailable as exc:
                    self.lose(str(exc))
                else:
                    self.tickets[ticket.id] = ticket
                    return ticket, taken
            if self.remote is None or not self.lock.locked():  # only a reconcile with Redis takes it
                break
            async with self.lock:
                pass
            waited = True
            if not self.up:  # else the reconcile put this replica back on Redis: counted there
                break
        taken = self._admit_local(ticket, client_hold, provider_hold, now, waited)
        self.tickets[ticket.id] = ticket
        return ticket, taken

    async def _admit_remote(
        self, ticket: Ticket, client_hold: Hold | None, provider_hold: Hold | None, now: float
    ) -> bool | None:
        args: dict[str, Any] = {}
        limits = ticket.limits
        if limits is not None:
            part: dict[str, Any] = {"n": ticket.client, "id": ticket.id}
            for name, value in (("rpm", limits.rpm), ("tpm", limits.tpm), ("par", limits.max_parallel)):
                if value is not None:
                    part[name] = value
            args["c"] = part
        if client_hold is not None:
            args["cb"] = _budget_args(client_hold)
        if provider_hold is not None:
            args["pb"] = _budget_args(provider_hold)
        answer = await self.call("acquire", now, args)
        use = None
        if limits is not None:
            use = Use(_int(answer, "requests"), _int(answer, "tokens"), _int(answer, "par"))
            if client_hold is not None:
                use.spent, use.reserved = self._known(client_hold.key, answer.get("cb"))
                use.window, use.limit = client_hold.window, client_hold.limit
            refused = answer.get("refused")
            if refused is not None:
                if refused not in ("max_parallel", "rpm", "tpm", "budget"):
                    raise Unavailable("Redis answered something the script does not answer")
                limit = refused
                self._refused(limit, ticket, client_hold)
                raise Refused(
                    limit, _int(answer, "retry_ms"), client_hold.window if client_hold else None, use
                )
        self.counters.admit(ticket.client, now)
        ticket.slot_epoch = self.epoch if limits is not None else None
        ticket.use = use
        if client_hold is not None:
            client_hold.epoch = self.epoch
            ticket.holds["client"] = client_hold
        if provider_hold is None:
            return None
        self._known(provider_hold.key, answer.get("pb"))
        if answer.get("pb_ok") is not True:
            self._refused_provider(provider_hold)
            return False
        provider_hold.epoch = self.epoch
        ticket.holds[provider_hold.subject] = provider_hold
        return True

    def _admit_local(
        self,
        ticket: Ticket,
        client_hold: Hold | None,
        provider_hold: Hold | None,
        now: float,
        waited: bool = False,
    ) -> bool | None:
        """Admit `ticket` in this replica's counts at `now`; `waited`: the clock moved on since
        (its use is then counted as the clock reads, as a refusal's is)."""
        limits = ticket.limits
        counters = self.counters
        if limits is not None:
            refusal = counters.refusal(ticket.client, now, limits.rpm, limits.tpm, limits.max_parallel)
            if (
                refusal is None
                and client_hold is not None
                and not counters.hold(client_hold.key, self.cap(client_hold), client_hold.amount)
            ):  # held from here on when it fits
                refusal = Refusal("budget", 0)
            if refusal is not None:
                self._refused(refusal.limit, ticket, client_hold)
                window_ = client_hold.window if client_hold is not None else None
                raise Refused(
                    refusal.limit, refusal.retry_ms, window_, self.local_use(ticket.client, client_hold)
                )
        counted = counters.admit(ticket.client, now)
        if limits is not None and self.remote is not None:
            _append(self.unsynced_requests, ticket.client, (now, ticket.id))
        if client_hold is not None:
            ticket.holds["client"] = client_hold
        if limits is not None and waited:
            ticket.use = self.local_use(ticket.client, client_hold)
        elif limits is not None:  # its window was trimmed to `now` by `refusal` already
            use = ticket.use = Use(len(counted.requests), counted.token_sum, counted.in_flight)
            if client_hold is not None:
                use.spent, use.reserved = self.spent_here(client_hold.key)
                use.window, use.limit = client_hold.window, client_hold.limit
        if provider_hold is None:
            return None
        return self._reserve_local(ticket, provider_hold)

    def _reserve_local(self, ticket: Ticket, hold: Hold) -> bool:
        if not self.counters.hold(hold.key, self.cap(hold), hold.amount):
            self._refused_provider(hold)
            return False
        ticket.holds[hold.subject] = hold
        return True

    async def reserve(self, ticket: Ticket, provider_id: str, budget: Budget, cost: Decimal) -> bool:
        """`reserve_units` with a cost in USD (rounded up to the next nano-dollar)."""
        return await self.reserve_units(ticket, provider_id, budget, charge_units(cost))

    async def reserve_units(self, ticket: Ticket, provider_id: str, budget: Budget, units: int) -> bool:
        """Reserve `units` nano-dollars against `provider_id`'s budget for `ticket` (a candidate
        after the first); False when the budget cannot cover it (the provider is skipped)."""
        now = self.now_ms()
        hold = self.hold_units("provider", provider_id, budget, units, now)
        if self.unknown and await self._learned(hold):
            now = self.now_ms()
        while True:
            if self.up:
                try:
                    return await self._guarded(ticket, self._reserve_remote(ticket, hold, now))
                except Unavailable as exc:
                    self.lose(str(exc))
            if not self.lock.locked():
                break
            async with self.lock:
                pass
            if not self.up:  # else the reconcile put this replica back on Redis: held there
                break
        return self._reserve_local(ticket, hold)

    async def _learned(self, *holds: Hold | None) -> bool:
        """Wait until what each hold's budget spent before a change of the files is counted
        (docs/reference.md §13.2: "what was already spent in the period stays spent"); whether
        it waited."""
        waited = False
        for hold in holds:
            event = self.unknown.get(hold.key) if hold is not None else None
            if event is not None:
                await event.wait()
                waited = True
        return waited

    async def _reserve_remote(self, ticket: Ticket, hold: Hold, now: float) -> bool:
        answer = await self.call("acquire", now, {"pb": _budget_args(hold)})
        self._known(hold.key, answer.get("pb"))
        if answer.get("pb_ok") is not True:
            self._refused_provider(hold)
            return False
        hold.epoch = self.epoch
        ticket.holds[hold.subject] = hold
        return True

    async def release(self, ticket: Ticket, provider_id: str) -> None:
        """Give back `provider_id`'s hold uncharged: the attempt failed, nothing was relayed."""
        hold = ticket.holds.pop(provider_id, None)
        if hold is None or hold.off:
            return
        if hold.epoch is None and self.lock.locked():  # a reconcile may be handing it to Redis
            try:  # given back where it is once the reconcile is done, even if the client leaves
                await self._guarded(ticket, self._release_reconciled(hold))
            except Unavailable as exc:
                self.lose(str(exc))
            return
        giving = self._give_back(hold)
        if giving is not None:
            try:
                await self._guarded(ticket, giving)
            except Unavailable as exc:
                self.lose(str(exc))

    async def _release_reconciled(self, hold: Hold) -> None:
        """`release` of a local hold a reconcile was handing to Redis: in Redis when it took it."""
        async with self.lock:
            pass
        if not hold.off and (giving := self._give_back(hold)) is not None:
            await giving

    def _give_back(self, hold: Hold) -> Coroutine[Any, Any, dict[str, Any]] | None:
        """Give `hold` back where it is: in this replica's counts at once, or the call that gives
        it back in Redis. None also for a hold of an epoch Redis lost: reconciling drops the
        epoch's reservations, and this one is no longer the ticket's, so nothing of it is
        counted again."""
        if hold.epoch is None:
            self.counters.release(hold.key, hold.amount)
        elif self.up and hold.epoch == self.epoch:
            return self.call("release", self.now_ms(), {"k": hold.key, "amount": str(hold.amount)})
        return None

    # -- settling ------------------------------------------------------------------------------

    async def settle(self, ticket: Ticket, cost: Decimal, tokens: int) -> Use | None:
        """`settle_units` with a cost in USD (rounded up to the next nano-dollar)."""
        return await self.settle_units(ticket, charge_units(cost), tokens)

    async def settle_units(
        self, ticket: Ticket, units: int, tokens: int, now: float | None = None
    ) -> Use | None:
        """The request ended: free its slot, count its `tokens`, charge `units` nano-dollars to
        each budget it holds (once: a second call does nothing). Returns the client's use after it.
        `now`: the clock's milliseconds, when the caller read it already.

        What must go to Redis runs to its end even if the request is cancelled meanwhile (the
        client left): a live replica's reservation would otherwise never be given back."""
        if ticket.settled:
            return ticket.use
        ticket.settled = True
        self.tickets.pop(ticket.id, None)
        if not ticket.pending and (
            self.remote is None  # no Redis: nothing to wait for, no reconcile holding the lock
            or (not (self.up and self._remote_parts(ticket)) and not self.lock.locked())
        ):
            self._settle_here(ticket, units, tokens, now)  # nothing to wait for: no task is made
            return ticket.use
        settling = asyncio.ensure_future(self._settle(ticket, units, tokens))
        self._background.add(settling)
        settling.add_done_callback(self._background.discard)
        return await asyncio.shield(settling)

    def _remote_parts(self, ticket: Ticket) -> bool:
        epoch = self.epoch
        if ticket.counted and ticket.slot_epoch == epoch:
            return True
        return any(not h.off and h.epoch == epoch for h in ticket.holds.values())

    def _settle_here(self, ticket: Ticket, actual: int, tokens: int, now: float | None = None) -> None:
        if now is None:
            now = self.now_ms()
        self.counters.finish(ticket.client, now, tokens)
        if ticket.unsent:
            self._uncount(ticket)
        if ticket.holds or ticket.counted:
            self._settle_local(ticket, actual, tokens, now)

    async def _settle(self, ticket: Ticket, actual: int, tokens: int) -> Use | None:
        if ticket.pending:  # what a cancelled request still had on its way to Redis, first
            for outcome in await asyncio.gather(*ticket.pending, return_exceptions=True):
                if isinstance(outcome, Unavailable):
                    self.lose(str(outcome))
        while True:
            now = self.now_ms()
            epoch = self.epoch
            remote = [
                h for h in ticket.holds.values() if not h.off and h.epoch is not None and h.epoch == epoch
            ]
            slot = ticket.counted and ticket.slot_epoch is not None and ticket.slot_epoch == epoch
            if self.up and (remote or slot):
                self.counters.finish(ticket.client, now, tokens)
                if ticket.unsent:
                    self._uncount(ticket)
                try:
                    await self._settle_remote(ticket, remote, slot, actual, tokens, now)
                except Unavailable as exc:
                    self.lose(str(exc))
                    self._settle_local(ticket, actual, tokens, now, waited=True)
                else:
                    self._settle_local(ticket, actual, tokens, now, done=set(map(id, remote)), slot_done=True)
                return ticket.use
            if not self.lock.locked():
                break
            async with self.lock:  # a reconcile: what it hands to Redis is settled there (above)
                pass
        self._settle_here(ticket, actual, tokens)
        return ticket.use

    def _uncount(self, ticket: Ticket) -> None:
        """Take `ticket`'s request, which went nowhere, out of its client's window here."""
        if ticket.counted:
            self.counters.uncount(ticket.client, ticket.admitted_ms)
            unsynced = self.unsynced_requests.get(ticket.client)
            if unsynced:
                unsynced[:] = [entry for entry in unsynced if entry[1] != ticket.id]

    async def _settle_remote(
        self, ticket: Ticket, holds: list[Hold], slot: bool, actual: int, tokens: int, now: float
    ) -> None:
        args: dict[str, Any] = {
            "b": [{"k": h.key, "r": str(h.amount), "c": str(actual), "exp": _expiry(h)} for h in holds]
        }
        if slot:
            args["c"] = {"n": ticket.client, "id": ticket.id, "tok": str(max(0, tokens))}
            if ticket.unsent:
                args["c"]["u"] = 1
        answer = await self.call("settle", now, args)
        states = answer.get("b")
        states = states if isinstance(states, list) else []
        for hold, state in zip(holds, states, strict=False):
            spent, reserved = self._known(hold.key, state)
            if ticket.use is not None and hold is ticket.holds.get("client"):
                ticket.use.spent, ticket.use.reserved = spent, reserved
        if slot and ticket.use is not None:
            ticket.use.requests = _int(answer, "requests")
            ticket.use.tokens = _int(answer, "tokens")
            ticket.use.in_flight = _int(answer, "par")

    def _settle_local(
        self,
        ticket: Ticket,
        actual: int,
        tokens: int,
        now: float,
        *,
        done: AbstractSet[int] = frozenset(),
        slot_done: bool = False,
        waited: bool = False,
    ) -> None:
        """Settle in this replica's counts what Redis does not hold of `ticket`, ended at `now`;
        `waited`: the clock moved on since (on Redis): its use is counted as the clock reads."""
        counters = self.counters
        for hold in ticket.holds.values():
            if hold.off or (done and id(hold) in done):
                continue
            if hold.epoch is None:
                counters.settle(hold.key, hold.amount, actual)
            elif actual > 0:  # held in Redis before it went away: reconciled when it is back
                self.pending_old[hold.key] = self.pending_old.get(hold.key, 0) + actual
        if ticket.counted and self.remote is not None and not slot_done and tokens > 0:
            _append(self.unsynced_tokens, ticket.client, (now, ticket.id, tokens))
        if ticket.counted and not slot_done:
            ticket.use = self.local_use(ticket.client, ticket.holds.get("client"), None if waited else now)

    # -- a request cancelled on its way -----------------------------------------------------------

    async def _guarded(self, ticket: Ticket, operation: Coroutine[Any, Any, T]) -> T:
        """Run `operation` to its end even when the request is cancelled meanwhile (its client
        left): what Redis took is then the ticket's, and its settlement waits for it first."""
        task = asyncio.ensure_future(operation)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            ticket.pending.append(task)
            raise

    async def _orphaned(self, ticket: Ticket, admitting: asyncio.Future[bool | None]) -> None:
        """An admission whose request was cancelled while Redis took it: settled at no cost."""
        try:
            await admitting
        except (Refused, Unavailable):
            return  # nothing was taken (or it is Redis' to expire)
        self.tickets[ticket.id] = ticket
        await self.settle_units(ticket, 0, 0)

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- what is used --------------------------------------------------------------------------

    def cap(self, hold: Hold) -> int:
        """What this replica may hold of `hold`'s budget in its own counters: all that is left
        without Redis; while Redis is away, its share of what was left when it went."""
        if self.remote is None:
            return hold.limit - self.seed.get(hold.key, 0)
        share = self.shares.get(hold.key)
        if share is None or share[0] != hold.limit:
            spent, reserved = self.known.get(hold.key, (self.seed.get(hold.key, 0), 0))
            share = (hold.limit, max(0, hold.limit - spent - reserved) // max(1, self.replicas))
            self.shares[hold.key] = share
        return share[1]

    def spent_here(self, key: str) -> tuple[int, int]:
        """A budget's (spent, reserved) as this replica knows it without asking Redis."""
        counters = self.counters
        if self.remote is None:
            return self.seed.get(key, 0) + counters.spent.get(key, 0), counters.reserved.get(key, 0)
        spent, reserved = self.known.get(key, (self.seed.get(key, 0), 0))
        if self.up:
            return spent, reserved
        return spent + counters.spent.get(key, 0) + self.pending_old.get(
            key, 0
        ), reserved + counters.reserved.get(key, 0)

    def peek(self, client: str, limits: Limits) -> Use:
        """`client`'s use as this replica last knew it, counting nothing (the remaining-* of an
        answer to a request that was never admitted: no candidate could take it)."""
        hold = None
        if limits.budget is not None:
            hold = self.hold_units("client", client, limits.budget, 0, self.now_ms())
        return self.local_use(client, hold)

    def local_use(self, client: str, hold: Hold | None, now: float | None = None) -> Use:
        """`client`'s use as this replica counts it at `now` (milliseconds; None: the clock's)."""
        counts = self.counters.counts(client, self.now_ms() if now is None else now)
        use = Use(counts.requests, counts.tokens, counts.in_flight)
        if hold is not None:
            use.spent, use.reserved = self.spent_here(hold.key)
            use.window, use.limit = hold.window, hold.limit
        return use

    # -- Redis ---------------------------------------------------------------------------------

    async def call(self, op: str, now: float, args: dict[str, Any]) -> dict[str, Any]:
        """One script call with this replica's epoch; `Unavailable` when its lease was lost."""
        assert self.remote is not None  # noqa: S101 - only called when up
        args["ttl"] = self.lease_ms
        if self.fresh:
            args["fresh"] = 1
        answer = await self.remote.call(op, int(now), self.epoch, args)
        if answer.get("lost") is True:
            raise Unavailable("this replica's lease in Redis ran out")
        self.fresh = False
        return answer

    def lose(self, reason: str) -> None:
        """Redis cannot be used: fall back now (the sync reconciles when it answers again)."""
        if not self.up:
            return
        log.warning(
            "limits: Redis unavailable (%s); limits are held %s until it is back",
            reason,
            "from this replica's counts" if self.without_redis == "local" else "by refusing limited clients",
        )
        self.up = False
        if not self.fresh:
            self.old = self.epoch
        self.epoch, self.fresh = _new_epoch(), True
        self.shares.clear()

    def _known(self, key: str, state: Any) -> tuple[int, int]:
        if isinstance(state, dict):
            spent, reserved = _digits(state.get("spent")), _digits(state.get("reserved"))
            if spent is not None and reserved is not None:
                self.known[key] = (spent, reserved)
                return spent, reserved
        raise Unavailable("Redis answered something the script does not answer")

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


def _budget_args(hold: Hold) -> dict[str, Any]:
    return {"k": hold.key, "limit": hold.limit, "amount": str(hold.amount), "exp": _expiry(hold)}


def _expiry(hold: Hold) -> int:
    end = hold.window.end
    return 0 if end is None else int(end.timestamp() * 1000) + EXPIRE_GRACE_MS


def _int(answer: dict[str, Any], name: str) -> int:
    value = answer.get(name)
    if isinstance(value, bool):
        raise Unavailable("Redis answered something the script does not answer")
    if isinstance(value, int | float) and 0 <= value < 2**63:
        return int(value)
    digits = _digits(value)
    if digits is None:
        raise Unavailable("Redis answered something the script does not answer")
    return digits


def _digits(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None


def _append(table: dict[str, list[Any]], client: str, entry: Any) -> None:
    entries = table.get(client)
    if entries is None:
        entries = table[client] = []
    entries.append(entry)
    if len(entries) > MAX_UNSYNCED:
        del entries[: len(entries) - MAX_UNSYNCED]


def _datetime(now_ms: float) -> datetime:
    return datetime.fromtimestamp(now_ms / 1000, UTC)

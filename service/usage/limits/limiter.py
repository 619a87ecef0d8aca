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
again every second and, once it answers, reconciles (`keeper.Keeper.reconcile`): what was counted
meanwhile goes to Redis, and the limiter is back on it.

Nothing here blocks: a local check is a few dictionary and deque operations; a Redis check is
one round trip within `Remote.timeout_s`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from decimal import Decimal
from typing import Any, TypeVar

from service.config.metering import Budget, Limits
from service.usage.limits.amounts import charge_units
from service.usage.limits.in_process import InProcess
from service.usage.limits.in_redis import InRedis
from service.usage.limits.remote import Unavailable
from service.usage.limits.tickets import Hold, Refused, Ticket, Use

T = TypeVar("T")


class Limiter(InRedis, InProcess):
    """Client limits and budgets of client and provider, in Redis or in this process."""

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

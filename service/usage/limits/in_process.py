"""The limits held in this process's own counts (`Limiter`'s base): all of them without Redis;
with Redis, beside it, and while it is away the fallback (`local`), each budget spent here
only up to this replica's share of what was left (`cap`). What is counted while Redis is away
is kept for the reconcile that gives it to Redis (`unsynced_*`, `pending_old`).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

from service.config.metering import Limits
from service.usage.limits.counters import Refusal
from service.usage.limits.state import LimiterState
from service.usage.limits.tickets import Hold, Refused, Ticket, Use

MAX_UNSYNCED = 100_000
"""Window entries kept for Redis while it is away, per client (older ones leave the window anyway)."""


class InProcess(LimiterState):
    """Admit, reserve and settle in this replica's counts; what they say is used."""

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

    def _uncount(self, ticket: Ticket) -> None:
        """Take `ticket`'s request, which went nowhere, out of its client's window here."""
        if ticket.counted:
            self.counters.uncount(ticket.client, ticket.admitted_ms)
            unsynced = self.unsynced_requests.get(ticket.client)
            if unsynced:
                unsynced[:] = [entry for entry in unsynced if entry[1] != ticket.id]

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
            counted = ticket.use
            client_hold = ticket.holds.get("client")
            use = ticket.use = self.local_use(ticket.client, client_hold, None if waited else now)
            if counted is not None and not ticket.unsent:
                use.requests = counted.requests  # what remained once it was counted (`Ticket.use`)

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


def _append(table: dict[str, list[Any]], client: str, entry: Any) -> None:
    entries = table.get(client)
    if entries is None:
        entries = table[client] = []
    entries.append(entry)
    if len(entries) > MAX_UNSYNCED:
        del entries[: len(entries) - MAX_UNSYNCED]

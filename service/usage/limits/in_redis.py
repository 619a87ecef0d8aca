"""The limits held in Redis (`Limiter`'s base): one script call per check (`Remote`), under
this replica's epoch and its lease; what Redis answers is checked, and anything the script
never answers is `Unavailable` (the limiter falls back at once: `lose`).
"""

from __future__ import annotations

import logging
from typing import Any

from service.usage.limits.remote import Unavailable
from service.usage.limits.state import LimiterState, _new_epoch
from service.usage.limits.tickets import Hold, Refused, Ticket, Use

# The limiter's logger, as before its Redis side was a module of its own: what operators filter on.
log = logging.getLogger("service.usage.limits.limiter")

EXPIRE_GRACE_MS = 40 * 86_400_000
"""A period's counters stay in Redis this long after it ends."""


class InRedis(LimiterState):
    """Admit, reserve and settle in Redis; the script's calls, and losing Redis."""

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
        return self._provider_held(ticket, provider_hold, answer)

    async def _reserve_remote(self, ticket: Ticket, hold: Hold, now: float) -> bool:
        answer = await self.call("acquire", now, {"pb": _budget_args(hold)})
        return self._provider_held(ticket, hold, answer)

    def _provider_held(self, ticket: Ticket, hold: Hold, answer: dict[str, Any]) -> bool:
        """Whether Redis's `answer` reserved the provider's budget `hold`: then the ticket holds
        it under this epoch; else the provider is refused (reported once a period)."""
        self._known(hold.key, answer.get("pb"))
        if answer.get("pb_ok") is not True:
            self._refused_provider(hold)
            return False
        hold.epoch = self.epoch
        ticket.holds[hold.subject] = hold
        return True

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
            if ticket.unsent:  # taken out of the window again: it counts toward nothing
                ticket.use.requests = _int(answer, "requests")
            ticket.use.tokens = _int(answer, "tokens")
            ticket.use.in_flight = _int(answer, "par")

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

"""What the limiter hands out and answers: a request's `Ticket`, the `Hold`s it has on budgets,
a subject's `Use`, and `Refused`.

A ticket is made when a client's request is admitted and settled exactly once when it ends
(`Limiter.settle`): its slot freed, its tokens counted, each hold replaced by the cost. A hold
lives where it was taken: in Redis under an epoch, or in this replica's counters (`epoch`
None); `off` marks one whose epoch lost its lease, so it was charged in full already.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from service.config.metering import Budget, Limits
from service.usage.limits.amounts import limit_units, usd_text
from service.usage.periods import Window

UNLIMITED = "unlimited"
"""A remaining-* header's value for a limit the client does not have."""


@dataclass(slots=True)
class Hold:
    """A reservation against one budget in one period."""

    key: str
    """`client:NAME:PERIOD` or `provider:ID:PERIOD` (PERIOD: `day:2026-12-04`, `total`...)."""
    subject: str
    """The client's name or the provider's id."""
    limit: int
    amount: int
    window: Window
    epoch: str | None = None
    off: bool = False


@dataclass(slots=True)
class Use:
    """A subject's use now: what `/limits` lists and the remaining-* headers are made of."""

    requests: int = 0
    tokens: int = 0
    in_flight: int = 0
    spent: int | None = None
    """Nano-dollars spent in the budget's period (None: no budget)."""
    reserved: int | None = None
    window: Window | None = None
    limit: int | None = None
    """The budget in nano-dollars (None: no budget)."""

    def answer(self) -> dict[str, object]:
        """As `/limits` and `whoami` show it (`used`)."""
        return {
            "requests_60s": self.requests,
            "tokens_60s": self.tokens,
            "in_flight": self.in_flight,
            "budget_spent_usd": None if self.spent is None else usd_text(self.spent),
            "budget_reserved_usd": None if self.reserved is None else usd_text(self.reserved),
            "period_end": None if self.window is None else self.window.end_text,
        }

    def remaining(self, limits: Limits) -> dict[str, str]:
        """The remaining-* headers for a client with `limits` (docs/reference.md §13), never negative.

        Both counts are sent to every client with limits; one without that limit (no `rpm`, no
        `tpm`) is told `unlimited`: a number would be a limit it does not have."""
        headers = {
            "x-switchboard-remaining-requests": UNLIMITED
            if limits.rpm is None
            else str(max(0, limits.rpm - self.requests)),
            "x-switchboard-remaining-tokens": UNLIMITED
            if limits.tpm is None
            else str(max(0, limits.tpm - self.tokens)),
        }
        if limits.budget is not None and self.spent is not None:
            limit = self.limit if self.limit is not None else limit_units(limits.budget.usd)
            left = max(0, limit - self.spent - (self.reserved or 0))
            headers["x-switchboard-budget-remaining-usd"] = usd_text(left)
        return headers


@dataclass(slots=True)
class Ticket:
    """One admitted request: where its slot is, and its holds."""

    id: str
    client: str
    limits: Limits | None
    admitted_ms: float
    counted: bool = False
    """The client's request is counted (it has limits): a slot to free, a window entry."""
    slot_epoch: str | None = None
    """The Redis epoch its slot is in (None: this replica's counters only)."""
    holds: dict[str, Hold] = field(default_factory=dict)
    """By subject: `client`, or a provider's id."""
    use: Use | None = None
    """The client's use once counted (and settled): the remaining-* headers. Its `requests` stay
    what they were when this request was counted (docs/reference.md §13: what remains after this
    request was counted), so that requests in flight at once are told 4, 3, 2, 1, 0 of an rpm of
    5, not each the window as it stands when it ends; but for one that went nowhere (`unsent`),
    which counts toward nothing."""
    settled: bool = False
    unsent: bool = False
    """It went nowhere (no candidate could take it): its settlement takes it out of the client's
    window, so it counts toward no limit."""
    pending: list[asyncio.Future[Any]] = field(default_factory=list)
    """Redis calls of a cancelled request still running: the settlement waits for them."""


class Refused(Exception):
    """A client's limit refuses the request (nothing was counted)."""

    def __init__(self, limit: str, retry_ms: int, window: Window | None, use: Use) -> None:
        super().__init__(limit)
        self.limit = limit
        """`max_parallel`, `rpm`, `tpm`, `budget`, or `unavailable` (refuse mode without Redis)."""
        self.retry_ms = retry_ms
        self.window = window
        self.use = use


def budget_key(kind: str, subject: str, window: Window) -> str:
    """The key of `subject`'s budget in `window`."""
    return f"{kind}:{subject}:{window.key}"


def budget_of(limits: Limits | None) -> Budget | None:
    return limits.budget if limits is not None else None

"""One call's account (docs/reference.md §13), what `metering.Metered` builds on: the bound of
its cost at each candidate, its settlement with the limiter, the error of a refusal, its record.

The bound: the prompt bounded by the body's size in bytes, the completion by `max_tokens`,
`max_completion_tokens` or `max_output_tokens` times `n`, else the model's output limit, else
`SWITCHBOARD_DEFAULT_MAX_TOKENS`; a vendor whose price is unknown is left out (reason
`unpriced`) when the request counts toward a budget.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from service.config.metering import Limits
from service.config.models import ApiKey, Provider
from service.errors import BudgetExceeded, HTTPError, LimitsUnavailable, RateLimited
from service.gateway.call import Call
from service.gateway.health import Health
from service.metrics import Metrics
from service.usage.encoding import fields
from service.usage.limits.amounts import amount_units
from service.usage.limits.limiter import Limiter
from service.usage.limits.tickets import Refused, Ticket, Use
from service.usage.pricing import Pricing, Rate
from service.usage.record import Amount, Tokens
from service.usage.tokens import MAX_TOKENS, normalise, queries_asked
from service.usage.values import from_micros

log = logging.getLogger("service.gateway.metering")  # its lines as before the split (account.py)

REQUEST_ID = "x-request-id"
COST = "x-switchboard-cost-usd"
MAX_CHOICES = 128

_NO_TOKENS = Tokens()


class Shared(Protocol):
    """What a call's metering uses of the `metering.Meter` every call shares (a protocol: that
    module imports this one)."""

    limiter: Limiter
    pricing: Pricing
    metrics: Metrics
    health: Health
    replica: str
    default_max_tokens: int
    label: Callable[[Provider, Call], str]
    write: Callable[[list[Any]], None]

    @property
    def ids(self) -> Callable[[], str]:
        """A new request id each call."""
        ...

    def later(self, settle: Any) -> None: ...


class Account:
    """One call's account: what it may cost where, its ticket, its settlement and its record
    (`metering.Metered` adds what the relay calls)."""

    __slots__ = (
        "at",
        "bounds",
        "call",
        "candidates",
        "completions",
        "done",
        "headers",
        "id",
        "limits",
        "meter",
        "prompt",
        "provider",
        "rates",
        "refused",
        "sent",
        "sent_at",
        "skipped",
        "started",
        "ticket",
        "ts_us",
    )

    def __init__(
        self, meter: Shared, call: Call, limits: Limits | None, candidates: Sequence[Provider]
    ) -> None:
        self.meter = meter
        self.call = call
        self.limits = limits
        self.id = meter.ids()
        self.started = time.perf_counter()
        self.at = meter.limiter.clock()
        """When it came, wall-clock seconds: its record's `ts` and its admission's time."""
        self.ts_us = _micros(self.at)
        """When it came, in microseconds since 1970 UTC (its record's `ts`)."""
        self.headers: dict[str, str] = {REQUEST_ID: self.id}
        """What every answer to the call carries: its id, and the remaining-* of a limited client."""
        self.rates: dict[str, Rate] = {}
        self.bounds: dict[str, Amount] = {}
        """Provider id -> an upper bound of the request's cost there (made when first needed)."""
        self.skipped: list[dict[str, str]] = []
        self.refused: set[str] = set()
        self.ticket: Ticket | None = None
        self.provider: Provider | None = None
        """The provider being tried, or that answered."""
        self.sent: str | None = None
        """The provider the request was last sent to."""
        self.sent_at = 0.0
        self.done = False
        self.prompt = len(call.body)
        """The bound of its prompt tokens: the client's body in bytes (before any translation)."""
        budgeted = limits is not None and limits.budget is not None
        purpose, model = call.purpose, call.model
        chat = purpose == "chat"
        wanted = _completion(call.data, purpose) if chat else 0
        choices = _choices(call.data)
        self.completions: dict[str, int] = {}
        """Provider id -> the completion tokens bounded there (all choices)."""
        eligible = []
        for provider in candidates:
            rate = meter.pricing.rate(provider, model)
            if (
                (budgeted or provider.budget is not None)
                and (type(provider) is ApiKey or isinstance(provider, ApiKey))  # an ABC's check is slow
                and not rate.known(purpose)
            ):
                self.skipped.append({"provider": provider.id, "reason": "unpriced"})
                continue
            completion = 0
            if chat:
                completion = wanted if wanted is not None else rate.max_output or meter.default_max_tokens
                if rate.max_output is not None:
                    completion = min(completion, rate.max_output)
            self.rates[provider.id] = rate
            self.completions[provider.id] = completion * choices
            eligible.append(provider)
        self.candidates = eligible

    def bound(self, provider: Provider) -> Amount:
        """An upper bound of the request's cost at `provider`: every byte of the body an input
        token of its dearest class, and the completion bound an output token each."""
        found = self.bounds.get(provider.id)
        if found is None:
            rate = self.rates.get(provider.id)
            if rate is None:
                return 0
            queries = queries_asked(self.call.data) if self.call.purpose == "reranking" else 0
            found = self.bounds[provider.id] = rate.bound_amount(
                self.prompt, self.completions[provider.id], queries
            )
        return found

    def used(self, rate: Rate) -> Tokens | None:
        """The answer's usage as tokens (None: it said none). A rerank's that says only the queries
        it billed says nothing a rate without a per-query price can cost: none, to be charged
        its reservation, not nothing."""
        usage = self.call.usage
        tokens = normalise(usage)
        if (
            tokens is not None
            and rate.per_query is None
            and usage is not None
            and set(usage) == {"search_units"}
        ):
            return None
        return tokens

    def _estimated_tokens(self, provider: Provider) -> int:
        """The tokens a request without usage is counted for: its bounds."""
        return min(self.prompt + self.completions.get(provider.id, 0), MAX_TOKENS)

    async def _settle(self, cost: Amount, tokens: int, now: float | None = None) -> Use | None:
        ticket = self.ticket
        if ticket is None:
            return None
        try:
            return await self.meter.limiter.settle_units(ticket, amount_units(cost), tokens, now)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not fail the answer; the lease ends what it held
            log.exception("limits: settling %s failed", self.id)
            return None

    def _headers_on(self, error: HTTPError, use: Use | None) -> None:
        error.added.update(self.headers)
        error.added[COST] = "0"
        if self.limits is not None:
            if use is None:  # never admitted (no candidate): what was known, nothing counted
                use = self.meter.limiter.peek(self.call.client, self.limits)
            error.added.update(use.remaining(self.limits))
        if self.skipped and "skipped" not in error.extra:
            error.extra["skipped"] = self.skipped

    def _refusal(self, refusal: Refused) -> HTTPError:
        call, limits = self.call, self.limits
        self.done = True
        error: HTTPError
        if refusal.limit == "unavailable":
            error = LimitsUnavailable(
                "the limits cannot be checked now "
                "(Redis is unavailable, and SWITCHBOARD_LIMITS_WITHOUT_REDIS=refuse)"
            )
        elif refusal.limit == "budget":
            window = refusal.window
            end = window.end_text if window is not None else None
            started_at = from_micros(self.ts_us)
            seconds = window.seconds_left(started_at) if window is not None else None
            error = BudgetExceeded(
                f"client {call.client!r} has no budget left for this request in its period",
                retry_after_ms=None if seconds is None else int(seconds * 1000 + 0.999),
                period_end=end,
            )
        else:
            error = RateLimited(
                f"client {call.client!r} is over its {refusal.limit} limit",
                retry_after_ms=refusal.retry_ms,
                limit=refusal.limit,
            )
        error.added.update(self.headers)
        error.added[COST] = "0"
        if limits is not None:
            error.added.update(refusal.use.remaining(limits))
        self.meter.metrics.limited.labels(call.client, refusal.limit).inc()
        self._record(self.id, error.status, None, 0, None, 0, False, False, limited=True)
        return error

    def _record(
        self,
        record_id: str,
        status: int,
        provider: Provider | None,
        attempts: int,
        tokens: Tokens | None,
        cost: Amount,
        priced: bool,
        estimated: bool,
        written: str | None = None,
        *,
        limited: bool = False,
        timed: bool = True,
    ) -> None:
        """Hand the call's record to the sink; `timed`: the provider's first byte came (its `ttfb_ms`);
        `written`: the cost's text in the line (`values.cost_text`), when made already."""
        call, meter = self.call, self.meter
        now = time.perf_counter()
        counted = tokens or _NO_TOKENS
        ttfb = None
        if timed and provider is not None and self.sent_at:
            ttfb = round((self.sent_at - self.started + call.first_byte_s) * 1000, 3)
        try:
            meter.write(
                fields(
                    record_id,
                    self.ts_us,
                    call.client,
                    call.purpose,
                    call.model,
                    provider.id if provider is not None else None,
                    provider.upstream_model(call.model) if provider is not None and call.model else None,
                    status,
                    call.stream,
                    attempts,
                    round((now - self.started) * 1000, 3),
                    ttfb,
                    counted.input + counted.cached_input + counted.cache_write,
                    counted.cached_input,
                    counted.cache_write,
                    counted.output,
                    counted.reasoning,
                    cost,
                    priced,
                    estimated,
                    meter.replica,
                    limited,
                    written,
                )
            )
        except Exception:  # the sink must not fail the request (it should never raise)
            log.exception("usage: the record of %s could not be handed over", record_id)


def _micros(seconds: float) -> int:
    """Wall-clock `seconds` in whole microseconds, as `datetime.fromtimestamp` rounds them (half
    to even), with no datetime made."""
    fraction, whole = math.modf(seconds)
    return int(whole) * 1_000_000 + round(fraction * 1e6)


def _completion(data: dict[str, Any], purpose: str) -> int | None:
    """The completion tokens a chat request asks for at most, if it says."""
    most = None
    for name in _COMPLETION_FIELDS:
        value = data.get(name)
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value > 0
            and (most is None or value > most)
        ):
            most = value
    return min(most, MAX_TOKENS) if most is not None else None


_COMPLETION_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _choices(data: dict[str, Any]) -> int:
    """How many completions are asked for (`n`), each up to the completion bound."""
    n = data.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return min(n, MAX_CHOICES)
    return 1

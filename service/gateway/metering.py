"""Each request through the gateway, metered (docs/reference.md §13): limited, priced, settled, recorded.

`Meter.start(call, snapshot, candidates)` is the one hook every protocol passes through, in
the relay, once the candidates are known (after authentication, parsing and the model
lookup). It gives the call its `x-request-id`, works out an upper bound of its cost at each
candidate (the prompt bounded by the body's size in bytes, the completion by `max_tokens`,
`max_completion_tokens` or `max_output_tokens` times `n`, else the model's output limit, else
`SWITCHBOARD_DEFAULT_MAX_TOKENS`), leaves out the vendors whose price is unknown when the
request counts toward a budget (reason `unpriced`), and admits it against the client's
limits (`Refused` becomes a 429, or a 503 in `refuse` mode). The `Metered` it returns is what
the attempt loop asks before each candidate (`take`: the provider's budget, else reason
`budget`), tells of a failed attempt (`give_back`), and ends with `served` or `failed`:
the reservation settled to the cost, the headers set, one `Record` handed to the sink.

Whatever ends a request settles it exactly once: a cancelled one (the client went away) in a
task of its own, charged its reservation if an upstream had it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from service.config.metering import Limits
from service.config.models import ApiKey, Provider
from service.config.snapshot import PerSnapshot, Snapshot
from service.errors import BudgetExceeded, HTTPError, LimitsUnavailable, RateLimited
from service.gateway.call import Call, model_label
from service.gateway.health import Health
from service.metrics import Metrics
from service.usage.encoding import MAX_COST_ATTO, cost_text, fields, from_micros, record_of
from service.usage.limits.amounts import amount_units
from service.usage.limits.limiter import Limiter
from service.usage.limits.tickets import Refused, Ticket, Use
from service.usage.pricing import UNPRICED, Pricing, Rate
from service.usage.record import ATTO_PER_USD, Amount, Record, RecordSink, Tokens, amount_text
from service.usage.tokens import MAX_TOKENS, normalise

log = logging.getLogger(__name__)

REQUEST_ID = "x-request-id"
COST = "x-switchboard-cost-usd"
CLIENT_LEFT = 499
"""A record's status when the client went away before any answer (nginx's code for it)."""
MAX_CHOICES = 128


class RequestIds:
    """Request ids: 32 hex digits, 128 bits of the OS's randomness each, read `batch` at a time.

    One `os.urandom` per request is a system call, in which the event loop lets go of the GIL
    (and the ledger's thread may keep it for a while); one per `batch` requests is not felt."""

    def __init__(self, batch: int = 256) -> None:
        self.batch = batch
        self._pool = ""
        self._at = 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(16 * self.batch).hex(), 0
        self._at = at + 32
        return self._pool[at : at + 32]


class NullSink:
    """Where records go when no ledger is wired: nowhere (`SWITCHBOARD_USAGE_DB=off` does the same)."""

    def submit(self, record: Record) -> None:
        return None

    def write(self, values: list[Any]) -> None:
        return None


_NO_TOKENS = Tokens()


class Meter:
    """What every call's metering shares: the limiter, prices, the sink, the metrics."""

    def __init__(
        self,
        limiter: Limiter,
        pricing: Pricing,
        metrics: Metrics,
        health: Health,
        *,
        replica: str,
        default_max_tokens: int = 4096,
        sink: RecordSink | None = None,
        label: Callable[[Provider, Call], str] | None = None,
    ) -> None:
        self.limiter = limiter
        self.pricing = pricing
        self.metrics = metrics
        self.health = health
        self.replica = replica
        self.default_max_tokens = default_max_tokens
        self.sink = sink or NullSink()
        self.label = label or (lambda provider, call: model_label(provider, call.model))
        """The model label of a call's cost metric (the relay's bounded one)."""
        self.limits = PerSnapshot(_client_limits)
        self.ids = RequestIds()
        self._settling: set[asyncio.Task[None]] = set()

    @property
    def sink(self) -> RecordSink:
        """Where each record goes: given as its line's values (`encoding.fields`) to a sink
        that takes them (`write`, as the ledger does: no `Record` is made), else as a `Record`."""
        return self._sink

    @sink.setter
    def sink(self, sink: RecordSink) -> None:
        self._sink = sink
        write = getattr(sink, "write", None)
        self.write: Callable[[list[Any]], None] = (
            write if callable(write) else lambda values: sink.submit(record_of(values))
        )

    def remaining(self, client: str, limits: Limits) -> dict[str, str]:
        """The remaining-* headers of `client`, with `limits`, as known now (nothing counted): for
        an answer refused before its limits were asked."""
        return self.limiter.peek(client, limits).remaining(limits)

    async def start(self, call: Call, snapshot: Snapshot, candidates: Sequence[Provider]) -> Metered:
        """Meter `call` from here on: admitted against its client's limits, or refused (raised)."""
        metered = Metered(self, call, self.limits.of(snapshot).get(call.client), candidates)
        await metered.admit()
        return metered

    def later(self, settle: Any) -> None:
        """Run `settle` in a task of its own (the request's task is being cancelled)."""
        task = asyncio.ensure_future(settle)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def drain(self) -> None:
        """Wait for settlements still running (at a stop)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)


class Metered:
    """One call's metering, from its admission to its record."""

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
        self, meter: Meter, call: Call, limits: Limits | None, candidates: Sequence[Provider]
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

    # -- before and between attempts -------------------------------------------------------------

    async def admit(self) -> None:
        """Admit the call against its client's limits (and its first candidate's budget); a
        call with no candidate left is not admitted: it goes nowhere, and counts toward nothing."""
        meter, call, candidates = self.meter, self.call, self.candidates
        if not candidates:
            return
        first = candidates[0]
        provider = None
        units = None  # the first candidate's bound, in nano-dollars
        if first.budget is not None:
            units = amount_units(self.bound(first))
            provider = (first.id, first.budget, units)
        client_units = 0
        if self.limits is not None and self.limits.budget is not None:
            if len(candidates) > 1:
                client_units = max(amount_units(self.bound(p)) for p in candidates)
            else:
                client_units = units if units is not None else amount_units(self.bound(first))
        try:
            self.ticket, taken = await meter.limiter.admit_units(
                self.id, call.client, self.limits, client_units, provider, self.at * 1000
            )
        except Refused as refusal:
            raise self._refusal(refusal) from None
        if taken is False:
            self._out_of_budget(first)
        elif taken is True:
            meter.health.release(first.id)
        if call.stream and self.limits is not None and self.ticket.use is not None:
            # a stream's headers go before its end: what remains once it was counted. A whole
            # answer's are set once it is settled (and an error's from the settlement too).
            self.headers.update(self.ticket.use.remaining(self.limits))

    async def take(self, provider: Provider) -> bool:
        """Whether `provider` may be tried now: its budget covers the request (reserved here)."""
        ticket = self.ticket
        assert ticket is not None  # noqa: S101 - admitted
        pid = provider.id
        if pid in self.refused:
            return False
        if provider.budget is not None and pid not in ticket.holds:
            units = amount_units(self.bound(provider))
            if not await self.meter.limiter.reserve_units(ticket, pid, provider.budget, units):
                self._out_of_budget(provider)
                return False
            self.meter.health.release(pid)
        self.provider = provider
        return True

    def sending(self, provider: Provider) -> None:
        """The request is on its way to `provider` (what a client that leaves now is charged for)."""
        self.sent = provider.id
        self.sent_at = time.perf_counter()
        call = self.call
        call.delivered, call.upstream_status = False, None
        call.usage = None  # an attempt's own: one that failed after its answer was read leaves none
        self.meter.limiter.providers.admit(provider.id, self.meter.limiter.now_ms())

    async def give_back(self, provider: Provider) -> None:
        """`provider`'s attempt failed before anything was relayed: its hold goes back uncharged."""
        limiter = self.meter.limiter
        limiter.providers.finish(provider.id, limiter.now_ms(), 0)
        self.sent = None
        if self.ticket is not None:
            await limiter.release(self.ticket, provider.id)

    def _out_of_budget(self, provider: Provider) -> None:
        self.refused.add(provider.id)
        self.skipped.append({"provider": provider.id, "reason": "budget"})
        budget = provider.budget
        if budget is not None:
            window = self.meter.limiter.window(budget.period, self.meter.limiter.now_ms())
            self.meter.health.hold(provider.id, "budget", window.end.timestamp() if window.end else None)

    # -- the end ---------------------------------------------------------------------------------

    async def served(
        self, provider: Provider, response: web.StreamResponse, attempts: int, label: str | None = None
    ) -> None:
        """`provider` answered (a stream: its end, or break): settle, set the headers, record.
        `label`: the model label of the answer's metrics, when made already (for its tokens)."""
        if self.done:
            return
        self.done = True
        call = self.call
        status, headers = response.status, response.headers  # properties: read once
        rate = self.rates.get(provider.id, UNPRICED)
        tokens = normalise(call.usage)
        estimated = False
        cost: Amount
        if tokens is not None:
            cost, priced = rate.amount(tokens, 1 if call.purpose == "reranking" else 0)
        elif status >= 400:
            cost, priced = 0, rate.any  # the upstream refused it: not billed
        else:
            cost, priced, estimated = self.bound(provider), rate.any, True
        counted = tokens.total if tokens is not None else self._estimated_tokens(provider) if estimated else 0
        counted = min(counted, MAX_TOKENS)
        limiter = self.meter.limiter
        now = limiter.now_ms()
        limiter.providers.finish(provider.id, now, counted)
        record_id = headers.get(REQUEST_ID) or self.id
        written = cost_text(cost)  # the line's text of the cost: the header's too, within its bounds
        try:
            use = await self._settle(cost, counted, now)
        except asyncio.CancelledError:  # the client left as it ended: recorded all the same
            self._record(record_id, status, provider, attempts, tokens, cost, priced, estimated, written)
            raise
        if not response.prepared:  # a whole answer: what it cost, and what remains once settled
            headers[COST] = written if type(cost) is int and 0 <= cost <= MAX_COST_ATTO else amount_text(cost)
            if use is not None and self.limits is not None:
                headers.update(use.remaining(self.limits))
        self._record(record_id, status, provider, attempts, tokens, cost, priced, estimated, written)
        if cost:
            if label is None:
                label = self.meter.label(provider, call)
            self.meter.metrics.cost_usd.labels(call.client, provider.id, label).inc(_atto(cost))

    async def failed(self, error: HTTPError, attempts: int) -> None:
        """No provider answered (502, 503) or the call failed on the way: nothing is charged.
        The record names the last provider tried (None when none was)."""
        if self.done:
            return
        self.done = True
        record = error.status not in (400, 401, 403, 404, 413, 415)  # else the client's own error
        tried = self.provider
        if attempts == 0 and self.sent is None and self.ticket is not None:
            self.ticket.unsent = True  # it went nowhere (503 `no_candidate`): counted toward no limit
        try:
            use = await self._settle(0, 0)
        except asyncio.CancelledError:
            if record:
                self._record(self.id, error.status, tried, attempts, None, 0, False, False, timed=False)
            raise
        self._headers_on(error, use)
        if not record:
            return  # no record (docs/reference.md §13)
        self._record(self.id, error.status, tried, attempts, None, 0, False, False, timed=False)

    def abandoned(self, attempts: int) -> None:
        """The request's task is cancelled (the client left): settle and record in a task of its own.

        Charged the reservation (`estimated`) once the upstream had the request: a byte of the
        answer was relayed, or the whole request was written to the upstream and it has not
        refused it (no status yet, or a 2xx). A request still on its way (connecting, its body
        being written) or that the upstream refused could not be billed: it costs 0. One whose
        upstream's whole answer was read, usage and all (a stream whose client left during its
        last write), is charged that usage: what the vendor billed."""
        if self.done:
            return
        self.done = True
        call = self.call
        tried = self.provider  # the record names the last provider tried, as a failure's does
        provider = tried if self.sent is not None else None
        rate = self.rates.get(tried.id, UNPRICED) if tried is not None else UNPRICED
        tokens = normalise(call.usage) if provider is not None else None
        priced = rate.any
        cost: Amount
        if tokens is not None:
            cost, priced = rate.amount(tokens, 1 if call.purpose == "reranking" else 0)
            charged, counted = False, min(tokens.total, MAX_TOKENS)
        else:
            answered = call.upstream_status
            charged = provider is not None and (
                call.prepared is not None or (call.delivered and (answered is None or answered < 300))
            )
            cost = (
                self.bound(provider) if charged and provider is not None and provider.id in self.rates else 0
            )
            counted = self._estimated_tokens(provider) if charged and provider is not None else 0
        if provider is not None:  # its count of requests in flight ends here too
            limiter = self.meter.limiter
            limiter.providers.finish(provider.id, limiter.now_ms(), counted)

        async def settle() -> None:
            try:
                await self._settle(cost, counted)
            finally:
                status, record_id = CLIENT_LEFT, self.id
                prepared = self.call.prepared
                if prepared is not None:  # a stream cut: the status and the id the client was sent
                    status, record_id = prepared.status, prepared.headers.get(REQUEST_ID) or self.id
                self._record(
                    record_id,
                    status,
                    tried,
                    attempts,
                    tokens,
                    cost,
                    priced,
                    charged,
                    timed=prepared is not None,
                )

        self.meter.later(settle())

    def bound(self, provider: Provider) -> Amount:
        """An upper bound of the request's cost at `provider`: every byte of the body an input
        token of its dearest class, and the completion bound an output token each."""
        found = self.bounds.get(provider.id)
        if found is None:
            rate = self.rates.get(provider.id)
            if rate is None:
                return 0
            queries = 1 if self.call.purpose == "reranking" else 0
            found = self.bounds[provider.id] = rate.bound_amount(
                self.prompt, self.completions[provider.id], queries
            )
        return found

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
        `written`: the cost's text in the line (`encoding.cost_text`), when made already."""
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


def _atto(amount: Amount) -> int:
    """Whole atto-dollars, as the cost metric adds them (exactly): an amount priced finer than an
    atto-dollar (a Decimal) to the nearest."""
    if isinstance(amount, int):
        return amount
    return int((amount * ATTO_PER_USD).to_integral_value())


def _micros(seconds: float) -> int:
    """Wall-clock `seconds` in whole microseconds, as `datetime.fromtimestamp` rounds them (half
    to even), with no datetime made."""
    fraction, whole = math.modf(seconds)
    return int(whole) * 1_000_000 + round(fraction * 1e6)


def _client_limits(snapshot: Snapshot) -> dict[str, Limits]:
    clients = snapshot.clients.clients if snapshot.clients is not None else []
    return {c.name: c.limits for c in clients if c.limits is not None}


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

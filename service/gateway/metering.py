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
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from service.config.metering import Limits
from service.config.models import Provider
from service.config.snapshot import PerSnapshot, Snapshot
from service.errors import HTTPError
from service.gateway.account import COST, REQUEST_ID, Account
from service.gateway.call import Call, model_label
from service.gateway.health import Health
from service.metrics import Metrics
from service.usage.encoding import record_of
from service.usage.limits.amounts import amount_units
from service.usage.limits.limiter import Limiter
from service.usage.limits.tickets import Refused
from service.usage.pricing import UNPRICED, Pricing
from service.usage.record import ATTO_PER_USD, Amount, Record, RecordSink, amount_text
from service.usage.tokens import MAX_TOKENS, queries
from service.usage.values import MAX_COST_ATTO, cost_text

CLIENT_LEFT = 499
"""A record's status when the client went away before any answer (nginx's code for it)."""


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


class Metered(Account):
    """One call's metering, from its admission to its record."""

    __slots__ = ()

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
        tokens = self.used(rate)
        estimated = False
        cost: Amount
        if tokens is not None:
            cost, priced = rate.amount(tokens, queries(call.usage) if call.purpose == "reranking" else 0)
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
        # a client's error answered before any attempt is not recorded; one answered after its
        # attempts (a request no candidate's litellm could translate: 400) is, as its 502 was
        record = attempts > 0 or error.status not in (400, 401, 403, 404, 413, 415)
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
        tokens = self.used(rate) if provider is not None else None
        priced = rate.any
        cost: Amount
        if tokens is not None:
            cost, priced = rate.amount(tokens, queries(call.usage) if call.purpose == "reranking" else 0)
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


def _atto(amount: Amount) -> int:
    """Whole atto-dollars, as the cost metric adds them (exactly): an amount priced finer than an
    atto-dollar (a Decimal) to the nearest."""
    if isinstance(amount, int):
        return amount
    return int((amount * ATTO_PER_USD).to_integral_value())


def _client_limits(snapshot: Snapshot) -> dict[str, Limits]:
    clients = snapshot.clients.clients if snapshot.clients is not None else []
    return {c.name: c.limits for c in clients if c.limits is not None}

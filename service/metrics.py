"""Prometheus metrics, one registry per app (so tests can run several apps in one process).

Labels never carry secrets, and never raw client input without a bound: a provider that
declares its models labels tokens with the model requested when it is one of them; one that
declares none, with the model its answers name, up to 100 per provider; anything else is
`other`.

The counters and histograms every relayed request touches are `LoopCounter`s and
`LoopHistogram`s (`service.loop_metrics`): their series are plain objects that the event-loop
thread alone adds to, with no lock and no float work beyond the addition (prometheus_client's
take a lock per call). They are collected into the same registry and expose exactly what a
prometheus_client `Counter` or `Histogram` of the same name, help and labels would.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.samples import Sample

from service.loop_metrics import Count, LoopCounter, LoopHistogram, Timing

__all__ = [
    "CONTENT_TYPE",
    "Cuts",
    "Metrics",
    "Traffic",
]

log = logging.getLogger(__name__)

ERROR_OUTCOMES = frozenset({"failed", "broken"})
"""Upstream attempts that count as the provider's errors (a 4xx passed on is the client's)."""

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """Every metric Switchboard exports."""

    def __init__(self) -> None:
        self.started_at = datetime.now(UTC)
        """When the counters started: every count is since then."""
        self.before_render: list[Callable[[], None]] = []
        """What sets gauges read at a scrape, not kept on the request's path (the budgets' spent)."""
        r = self.registry = CollectorRegistry()
        self.info = Gauge(
            "switchboard_info",
            "1, labelled with this replica, its version, and the installed litellm's (whose prices it uses).",
            ["replica", "version", "litellm"],
            registry=r,
        )
        # configuration
        self.reloads = Counter("switchboard_reloads", "Reload batches, by result.", ["result"], registry=r)
        self.reload_seconds = Histogram(
            "switchboard_reload_seconds", "Time to rescan, load and apply a batch.", registry=r
        )
        self.generation = Gauge(
            "switchboard_config_generation", "Generation of the current snapshot.", registry=r
        )
        self.providers = Gauge("switchboard_providers", "Providers in the current snapshot.", registry=r)
        self.files_refused = Gauge("switchboard_files_refused", "Files refused now.", registry=r)
        self.pulls = Counter(
            "switchboard_pulls", "Pulls of SWITCHBOARD_GIT_PULL, by result.", ["result"], registry=r
        )
        self.sync_failures = Counter(
            "switchboard_sync_failures", "Pulls that could not be applied (see /readyz `sync`).", registry=r
        )
        self.webhooks = Counter(
            "switchboard_webhooks", "Git webhook notifications, by result.", ["result"], registry=r
        )
        self.fanout_connected = Gauge(
            "switchboard_fanout_connected", "1 while the Redis fan-out is connected.", registry=r
        )
        self.events = Counter(
            "switchboard_events", "Events appended to the log, by type.", ["type"], registry=r
        )
        # HTTP (these and the gateway's, below, are touched by every request: loop-local)
        self.requests = LoopCounter(
            "switchboard_http_requests",
            "HTTP requests, by route and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = LoopHistogram(
            "switchboard_http_request_seconds",
            "HTTP request latency.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # added to only by a connection that cuts (its timers and callbacks: the loop thread)
        self.http_cut = LoopCounter(
            "switchboard_http_cut",
            "Connections the HTTP servers cut or refused, by reason: receive_timeout (answered 408), "
            "send_timeout (a client that took nothing of its answer, let go of), "
            "malformed (a request the parser refused, answered 400).",
            ["reason"],
            registry=r,
        )
        self.cuts = Cuts(self.http_cut)
        """Its series, for the servers' connections (`service.http.stalls`, `service.http.fast`)."""
        # gateway
        self.upstream_requests = LoopCounter(
            "switchboard_upstream_requests",
            "Upstream attempts, by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.upstream_seconds = LoopHistogram(
            "switchboard_upstream_seconds",
            "Upstream latency to the response headers.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = LoopCounter(
            "switchboard_fallbacks",
            "Requests served by a candidate after the first.",
            ["purpose"],
            registry=r,
        )
        self.tokens = LoopCounter(
            "switchboard_tokens",
            "Tokens reported by upstreams in `usage`.",
            ["provider", "model", "client", "kind"],
            registry=r,
        )
        # usage (docs/reference.md §13)
        self.cost_usd = LoopCounter(
            "switchboard_cost_usd",
            "USD spent through the gateway (what each request cost, or was charged when it said nothing).",
            ["client", "provider", "model"],
            unit=10**18,  # whole atto-dollars added, exactly (the usage layer's unit); USD shown
            registry=r,
        )
        self.limited = LoopCounter(
            "switchboard_limited",
            "Requests refused by a client's limit: rpm, tpm, max_parallel, budget, unavailable.",
            ["client", "limit"],
            registry=r,
        )
        self.budget_spent = Gauge(
            "switchboard_budget_spent_usd",
            "What each budget has spent in its current period (kind: client or provider).",
            ["kind", "subject"],
            registry=r,
        )
        self.provider_healthy = Gauge(
            "switchboard_provider_healthy", "1 healthy, 0 unhealthy, -1 unknown.", ["provider"], registry=r
        )
        self._answered: dict[tuple[str, str, int], tuple[Count, Timing]] = {}
        self._upstream: dict[tuple[str, str], tuple[Count, Timing]] = {}

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP answer and its time: one lookup per request, of the pair of series of
        its route, method and status, made on first use and kept."""
        if method not in _METHODS:  # WebDAV's and the rest: one series for all
            method = "OTHER"
        key = (route, method, status)
        pair = self._answered.get(key)
        if pair is None:
            pair = self._answered[key] = (
                self.requests.labels(route, method, str(status)),
                self.request_seconds.labels(route),
            )
        pair[0].inc()
        pair[1].observe(seconds)

    def answered_upstream(self, provider: str, outcome: str) -> tuple[Count, Timing]:
        """The series of an upstream attempt that answered (`outcome` ok, client_error or broken):
        its count, and its provider's time to the first byte."""
        key = (provider, outcome)
        pair = self._upstream.get(key)
        if pair is None:
            pair = self._upstream[key] = (
                self.upstream_requests.labels(provider, outcome),
                self.upstream_seconds.labels(provider),
            )
        return pair

    def render(self) -> bytes:
        """The text exposition format, after each of `before_render` has set what it shows."""
        for show in self.before_render:
            try:
                show()
            except Exception:  # a bug: the scrape shows what it has, never a 500 for /metrics
                log.exception("metrics: a gauge read at the scrape failed; it shows its last value")
        return generate_latest(self.registry)

    def traffic(self) -> dict[str, Traffic]:
        """Each provider's traffic since the start, from the gateway's own counters.

        Reads the metrics as Prometheus would (`collect`), so the numbers are those that
        `/metrics` shows; only providers that saw a request are in it.
        """
        found: defaultdict[str, Traffic] = defaultdict(Traffic)
        for sample in _samples(self.upstream_requests, "_total"):
            traffic = found[sample.labels["provider"]]
            traffic.requests += int(sample.value)
            if sample.labels["outcome"] in ERROR_OUTCOMES:
                traffic.errors += int(sample.value)
        for sample in _samples(self.upstream_seconds, "_sum"):
            found[sample.labels["provider"]].latency_s += sample.value
        for sample in _samples(self.upstream_seconds, "_count"):
            found[sample.labels["provider"]].answered += int(sample.value)
        for sample in _samples(self.tokens, "_total"):
            traffic = found[sample.labels["provider"]]
            if sample.labels["kind"] == "prompt":
                traffic.prompt_tokens += int(sample.value)
            else:
                traffic.completion_tokens += int(sample.value)
        return dict(found)


class Cuts:
    """The series of `switchboard_http_cut_total`, one a reason, made at the start (each shown
    from 0): what a server's connection adds one to when it cuts one, and only then.

    The reason is the server's, never anything the client sent: the labels stay bounded. Without
    a counter, they count nowhere (a connection made only to check what it does)."""

    __slots__ = ("malformed", "receive_timeout", "send_timeout")

    def __init__(self, counter: LoopCounter | None = None) -> None:
        def series(reason: str) -> Count:
            return Count() if counter is None else counter.labels(reason)

        self.receive_timeout = series("receive_timeout")
        """A request that did not come within `SWITCHBOARD_RECEIVE_TIMEOUT_S`, answered 408."""
        self.send_timeout = series("send_timeout")
        """A client that took nothing of its answer for `SWITCHBOARD_SEND_TIMEOUT_S`, let go of."""
        self.malformed = series("malformed")
        """A request aiohttp's parser refused, answered 400 (`service.http.malformed`)."""


@dataclass(slots=True)
class Traffic:
    """One provider's upstream traffic since the start: attempts, errors, time to first byte, tokens."""

    requests: int = 0
    """Attempts sent to it, whatever came of them."""
    errors: int = 0
    """Attempts that failed (connection, timeout, 408/429/5xx, its key refused) or broke mid-answer."""
    latency_s: float = 0.0
    """The sum of the answered attempts' times to the first byte."""
    answered: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def latency_ms(self) -> float | None:
        """The mean time to the first byte of an answered attempt; None before any."""
        return round(self.latency_s / self.answered * 1000, 3) if self.answered else None


def _samples(metric: LoopCounter | LoopHistogram, suffix: str) -> list[Sample]:
    return [s for family in metric.collect() for s in family.samples if s.name.endswith(suffix)]

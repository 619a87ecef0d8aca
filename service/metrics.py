"""Prometheus metrics, one registry per app (so tests can run several apps in one process).

Labels never carry secrets, and never raw client input without a bound: a provider that
declares its models labels tokens with the model requested when it is one of them; one that
declares none, with the model its answers name, up to 100 per provider; anything else is
`other`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.samples import Sample

__all__ = ["CONTENT_TYPE", "Metrics", "Traffic"]

ERROR_OUTCOMES = frozenset({"failed", "broken"})
"""Upstream attempts that count as the provider's errors (a 4xx passed on is the client's)."""

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """Every metric Switchboard exports."""

    def __init__(self) -> None:
        self.started_at = datetime.now(UTC)
        """When the counters started: every count is since then."""
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
        # HTTP
        self.requests = Counter(
            "switchboard_http_requests",
            "HTTP requests, by route and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "switchboard_http_request_seconds",
            "HTTP request latency.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # gateway
        self.upstream_requests = Counter(
            "switchboard_upstream_requests",
            "Upstream attempts, by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "switchboard_upstream_seconds",
            "Upstream latency to the response headers.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "switchboard_fallbacks",
            "Requests served by a candidate after the first.",
            ["purpose"],
            registry=r,
        )
        self.tokens = Counter(
            "switchboard_tokens",
            "Tokens reported by upstreams in `usage`.",
            ["provider", "model", "client", "kind"],
            registry=r,
        )
        # usage (docs/reference.md §13)
        self.cost_usd = Counter(
            "switchboard_cost_usd",
            "USD spent through the gateway (what each request cost, or was charged when it said nothing).",
            ["client", "provider", "model"],
            registry=r,
        )
        self.limited = Counter(
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
        self._answered: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[str, Any] = {}

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP answer and its time. The label children are looked up once per label
        set and kept: `labels()` takes a lock and checks its arguments, on every request."""
        if method not in _METHODS:  # WebDAV's and the rest: one series for all
            method = "OTHER"
        key = (route, method, status)
        counter = self._answered.get(key)
        if counter is None:
            counter = self._answered[key] = self.requests.labels(route, method, str(status))
        counter.inc()
        timer = self._timed.get(route)
        if timer is None:
            timer = self._timed[route] = self.request_seconds.labels(route)
        timer.observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
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


def _samples(metric: Counter | Histogram, suffix: str) -> list[Sample]:
    return [s for family in metric.collect() for s in family.samples if s.name.endswith(suffix)]

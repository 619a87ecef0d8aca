"""Prometheus metrics, one registry per app (so tests can run several apps in one process).

Labels never carry secrets, and never raw client input without a bound: a provider that
declares its models labels tokens with the model requested when it is one of them; one that
declares none, with the model its answers name, up to 100 per provider; anything else is
`other`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every metric Switchboard exports."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.info = Gauge(
            "switchboard_info",
            "1, labelled with this replica and its version.",
            ["replica", "version"],
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
        self.provider_healthy = Gauge(
            "switchboard_provider_healthy", "1 healthy, 0 unhealthy, -1 unknown.", ["provider"], registry=r
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

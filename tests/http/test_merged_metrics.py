"""`/metrics` of `serve --workers N` (docs/reference.md §3.2): the leader's exposition merged with
its followers', read and written by prometheus_client itself."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.http.merged_metrics import merged
from service.metrics import Metrics


def _values(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_traffic_is_summed_by_series_and_the_state_is_the_leaders() -> None:
    leader, follower = Metrics(), Metrics()
    leader.answered("chat", "POST", 200, 0.01)
    follower.answered("chat", "POST", 200, 0.02)
    follower.answered("chat", "POST", 429, 0.001)
    leader.generation.set(7)
    follower.generation.set(7)
    leader.provider_healthy.labels("a").set(1)
    follower.provider_healthy.labels("a").set(1)
    leader.reloads.labels("applied").inc()
    follower.reloads.labels("applied").inc(3)  # the follower's own loads of the same files
    leader.events.labels("service.started").inc()
    follower.events.labels("service.started").inc()

    values = _values(merged(leader.render(), [follower.render()]))

    requests = "switchboard_http_requests_total"
    assert values[(requests, (("method", "POST"), ("route", "chat"), ("status", "200")))] == 2
    assert values[(requests, (("method", "POST"), ("route", "chat"), ("status", "429")))] == 1
    assert values[("switchboard_http_request_seconds_count", (("route", "chat"),))] == 3
    assert values[("switchboard_config_generation", ())] == 7
    assert values[("switchboard_provider_healthy", (("provider", "a"),))] == 1
    assert values[("switchboard_reloads_total", (("result", "applied"),))] == 1
    assert values[("switchboard_events_total", (("type", "service.started"),))] == 1


def test_without_followers_the_exposition_says_the_same() -> None:
    leader = Metrics()
    leader.answered("chat", "POST", 200, 0.01)
    assert _values(merged(leader.render(), [])) == _values(leader.render())

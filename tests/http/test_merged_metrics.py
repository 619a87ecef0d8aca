"""`/metrics` of `serve --workers N` (docs/reference.md §3.2): the leader's exposition merged with
its followers', read and written by prometheus_client itself."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.http.merged_metrics import Scrapes, merged
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


def _requests(text: bytes) -> float:
    return _values(text)[
        ("switchboard_http_requests_total", (("method", "POST"), ("route", "chat"), ("status", "200")))
    ]


def test_a_follower_restarted_or_left_out_never_takes_its_counts_back() -> None:
    """Prometheus reads a counter that goes down as a reset (and the whole value as new counts):
    the merged counters of the workers only ever go up, as one process's do."""
    leader, follower = Metrics(), Metrics()
    for _ in range(3):
        leader.answered("chat", "POST", 200, 0.01)
    for _ in range(5):
        follower.answered("chat", "POST", 200, 0.01)
    scrapes = Scrapes()
    assert _requests(scrapes.merged(leader.render(), {1: (100, follower.render())})) == 8
    assert _requests(scrapes.merged(leader.render(), {1: None})) == 8  # too slow this time
    again = Metrics()  # the follower killed, started again (another process): counting from 0
    again.answered("chat", "POST", 200, 0.01)
    assert _requests(scrapes.merged(leader.render(), {1: (101, again.render())})) == 9
    assert _requests(scrapes.merged(leader.render(), {1: (101, again.render())})) == 9
    third = Metrics()
    assert _requests(scrapes.merged(leader.render(), {1: (102, third.render())})) == 9
    leader.answered("chat", "POST", 200, 0.01)
    assert _requests(scrapes.merged(leader.render(), {1: None})) == 10

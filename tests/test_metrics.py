"""The loop-local metrics: what they expose is what prometheus_client's own would, fed the same."""

from __future__ import annotations

import gc
import math
import sys
import threading
import time
from collections.abc import Iterator

import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries

from service.loop_metrics import LoopCounter, LoopHistogram
from service.metrics import Metrics

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
HOSTILE = 'a "quoted"\nnew line \\ back\\slash {x="}"} é'
"""A label value with everything the text format must escape, and a brace that must not end it."""


def _text(registry: CollectorRegistry) -> str:
    """The exposition, with each `_created` value (the time a series was made) masked."""
    lines = []
    for line in generate_latest(registry).decode().splitlines():
        if not line.startswith("#") and line.split("{")[0].split(" ")[0].endswith("_created"):
            line = line.rsplit(" ", 1)[0] + " <created>"
        lines.append(line)
    return "\n".join(lines)


def _parsed(registry: CollectorRegistry) -> list[tuple[str, str, str, list[tuple[str, dict[str, str], str]]]]:
    """The exposition read back by prometheus_client's parser (values as repr, so NaN equals NaN)."""
    return [
        (
            family.name,
            family.type,
            family.documentation,
            [
                (s.name, s.labels, "<created>" if s.name.endswith("_created") else repr(s.value))
                for s in family.samples
            ],
        )
        for family in text_string_to_metric_families(generate_latest(registry).decode())
    ]


def _same(ours: CollectorRegistry, theirs: CollectorRegistry) -> None:
    assert _text(ours) == _text(theirs)
    assert _parsed(ours) == _parsed(theirs)


@pytest.fixture
def registries() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(), CollectorRegistry()


@pytest.fixture
def created_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """prometheus_client's switch of the `_created` series, put back as it was after the test."""
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", prometheus_client.metrics._use_created)
    yield


COUNTS = [1, 3, 0, 2.5, 1e-9, 1234567, 10**12, 0.1, 0.2]


def test_a_counter_exposes_what_a_prometheus_counter_does(
    registries: tuple[CollectorRegistry, CollectorRegistry],
) -> None:
    ours, theirs = registries
    loop = LoopCounter("sb_things", "Things, by kind.", ["kind", "who"], registry=ours)
    real = Counter("sb_things", "Things, by kind.", ["kind", "who"], registry=theirs)
    for i, n in enumerate(COUNTS):
        labels = ("a" if i % 2 else "b", "x" if i % 3 else "y")
        loop.labels(*labels).inc(n)
        real.labels(*labels).inc(n)
    loop.labels("a", "x").inc()
    real.labels("a", "x").inc()
    _same(ours, theirs)
    assert "sb_things_total" in _text(ours) and "sb_things_created" in _text(ours)


def test_a_histogram_exposes_what_a_prometheus_histogram_does(
    registries: tuple[CollectorRegistry, CollectorRegistry],
) -> None:
    ours, theirs = registries
    loop = LoopHistogram("sb_seconds", "Time taken.", ["route"], buckets=BUCKETS, registry=ours)
    real = Histogram("sb_seconds", "Time taken.", ["route"], buckets=BUCKETS, registry=theirs)
    values = [
        *BUCKETS,
        0,
        0.0004,
        0.0007,
        0.1 + 0.2,
        59.999,
        60.0001,
        1e9,
        math.inf,
        *[b * 1.5 for b in BUCKETS],
    ]
    for i, value in enumerate(values):
        route = "/v1/chat/completions" if i % 2 else "/v1/embeddings"
        loop.labels(route).observe(value)
        real.labels(route).observe(value)
    loop.labels("/idle")  # a series made and never observed: all zero, as theirs
    real.labels("/idle")
    _same(ours, theirs)


def test_a_value_equal_to_a_bound_counts_in_that_bucket() -> None:
    registry = CollectorRegistry()
    timing = LoopHistogram("sb_edges", "Edges.", buckets=(0.1, 1, 10), registry=registry).labels()
    for value in (0.1, 1, 1.0000001, 10, 11):
        timing.observe(value)
    buckets = {
        s.labels["le"]: s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if s.name == "sb_edges_bucket"
    }
    assert buckets == {"0.1": 1, "1.0": 2, "10.0": 4, "+Inf": 5}  # `le`: less than or equal
    assert timing.buckets == [1, 1, 2, 1]  # each bucket alone; the exposition's are cumulative


def test_nan_counts_in_no_bucket_and_makes_the_sum_nan_as_prometheus_client_does(
    registries: tuple[CollectorRegistry, CollectorRegistry],
) -> None:
    ours, theirs = registries
    loop = LoopHistogram("sb_nan", "NaN.", buckets=(1, 2), registry=ours).labels()
    real = Histogram("sb_nan", "NaN.", buckets=(1, 2), registry=theirs)
    for value in (0.5, math.nan, 3):
        loop.observe(value)
        real.observe(value)
    _same(ours, theirs)
    assert loop.buckets == [1, 0, 1] and math.isnan(loop.total)
    assert "sb_nan_count 2.0" in _text(ours) and "sb_nan_sum NaN" in _text(ours)


def test_label_values_are_escaped_as_prometheus_client_escapes_them(
    registries: tuple[CollectorRegistry, CollectorRegistry],
) -> None:
    ours, theirs = registries
    LoopCounter("sb_odd", "Odd labels.", ["value"], registry=ours).labels(HOSTILE).inc(2)
    Counter("sb_odd", "Odd labels.", ["value"], registry=theirs).labels(HOSTILE).inc(2)
    LoopHistogram("sb_odd_seconds", "Odd.", ["value"], buckets=(1,), registry=ours).labels(HOSTILE).observe(1)
    Histogram("sb_odd_seconds", "Odd.", ["value"], buckets=(1,), registry=theirs).labels(HOSTILE).observe(1)
    _same(ours, theirs)
    text = _text(ours)
    assert 'sb_odd_total{value="a \\"quoted\\"\\nnew line \\\\ back\\\\slash {x=\\"}\\"} é"} 2.0' in text
    assert "\nnew line" not in text  # the newline is escaped: no line of the exposition is cut
    samples = [s for f in text_string_to_metric_families(generate_latest(ours).decode()) for s in f.samples]
    assert {s.labels.get("value") for s in samples} == {HOSTILE}


def test_metrics_without_labels_show_their_one_series_from_the_start(
    registries: tuple[CollectorRegistry, CollectorRegistry],
) -> None:
    ours, theirs = registries
    LoopCounter("sb_plain", "Plain.", registry=ours)
    LoopHistogram("sb_plain_seconds", "Plain.", registry=ours)  # prometheus_client's default buckets
    Counter("sb_plain", "Plain.", registry=theirs)
    Histogram("sb_plain_seconds", "Plain.", registry=theirs)
    _same(ours, theirs)
    assert "sb_plain_total 0.0" in _text(ours)


def test_a_name_given_with_total_is_the_counters_family_without_it(
    registries: tuple[CollectorRegistry, CollectorRegistry],
) -> None:
    ours, theirs = registries
    LoopCounter("sb_named_total", "Named.", ["a"], registry=ours).labels("1").inc()
    Counter("sb_named_total", "Named.", ["a"], registry=theirs).labels("1").inc()
    _same(ours, theirs)


def test_the_created_series_follow_prometheus_clients_switch(
    registries: tuple[CollectorRegistry, CollectorRegistry], created_restored: None
) -> None:
    ours, theirs = registries
    before = time.time()
    counter = LoopCounter("sb_when", "When.", ["a"], registry=ours)
    histogram = LoopHistogram("sb_when_seconds", "When.", ["a"], buckets=(1,), registry=ours)
    counter.labels("x").inc()
    histogram.labels("x").observe(0.5)
    Counter("sb_when", "When.", ["a"], registry=theirs).labels("x").inc()
    Histogram("sb_when_seconds", "When.", ["a"], buckets=(1,), registry=theirs).labels("x").observe(0.5)
    created = [s.value for f in ours.collect() for s in f.samples if s.name.endswith("_created")]
    assert len(created) == 2 and all(before <= t <= time.time() for t in created)
    prometheus_client.metrics.disable_created_metrics()  # PROMETHEUS_DISABLE_CREATED_SERIES does the same
    _same(ours, theirs)
    assert "_created" not in generate_latest(ours).decode()
    prometheus_client.metrics.enable_created_metrics()
    _same(ours, theirs)
    assert "sb_when_created" in generate_latest(ours).decode()


def test_a_series_is_made_once_and_kept() -> None:
    counter = LoopCounter("sb_kept", "Kept.", ["a", "b"], registry=CollectorRegistry())
    assert counter.labels("1", "2") is counter.labels("1", "2")
    assert counter.labels("1", "2") is not counter.labels("2", "1")
    with pytest.raises(ValueError, match="label values"):
        counter.labels("1")


def test_the_registry_refuses_a_name_taken_twice() -> None:
    registry = CollectorRegistry()
    Counter("sb_taken", "Taken.", registry=registry)
    with pytest.raises(DuplicateTimeseries):
        LoopCounter("sb_taken", "Taken.", registry=registry)
    LoopHistogram("sb_taken_seconds", "Taken.", registry=registry)
    with pytest.raises(DuplicateTimeseries):
        Histogram("sb_taken_seconds", "Taken.", registry=registry)


def test_a_counter_with_a_unit_sums_whole_units_exactly_and_shows_the_sum_once_divided() -> None:
    """The cost counter adds atto-dollars: a million requests of $0.0000001 sum to exactly $0.1,
    where a float sum of 1e-7 a million times drifts (0.09999999999832...)."""
    registry = CollectorRegistry()
    cost = LoopCounter("sb_cost_usd", "Cost.", ["client"], unit=10**18, registry=registry)
    series = cost.labels("c")
    drifting = 0.0
    for _ in range(1_000_000):
        series.inc(100_000_000_000)  # $0.0000001 in atto-dollars
        drifting += 1e-7
    assert series.value == 10**17 and drifting != 0.1
    assert 'sb_cost_usd_total{client="c"} 0.1\n' in generate_latest(registry).decode()
    with pytest.raises(ValueError, match="unit"):
        LoopCounter("sb_bad_unit", "Bad.", unit=0, registry=registry)


@pytest.mark.parametrize(
    ("buckets", "labels", "error"),
    [((1, 0.5), (), "ascending"), ((), (), "at least one"), ((1,), ("le",), "`le`")],
)
def test_a_histogram_refuses_what_prometheus_client_refuses(
    buckets: tuple[float, ...], labels: tuple[str, ...], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        LoopHistogram("sb_bad", "Bad.", labels, buckets=buckets, registry=CollectorRegistry())


class _Finalized:
    def __init__(self) -> None:
        self.cycle = self  # freed by a collection of garbage alone

    def __del__(self) -> None:
        """Python code that a collection of garbage runs, in whichever thread it happens."""


def test_collecting_in_another_thread_while_the_loop_thread_adds_series() -> None:
    """`Metrics.traffic` runs in a worker thread: the series the loop thread adds meanwhile
    neither break it nor get lost (even when a collection of garbage runs Python code in the
    middle of the reader's copy: copying the dict's items raised here, now and then)."""
    metrics = Metrics()
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                metrics.traffic()
        except BaseException as error:  # reported by the test, below
            errors.append(error)

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    gc.set_threshold(50)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(3000):
            _Finalized()
            count, timing = metrics.answered_upstream(f"p{i}", "ok")
            count.inc()
            timing.observe(0.001)
            metrics.tokens.labels(f"p{i}", "m", "c", "prompt").inc(2)
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    assert errors == []
    traffic = metrics.traffic()
    assert len(traffic) == 3000 and all(t.requests == 1 and t.prompt_tokens == 2 for t in traffic.values())


def test_the_gateway_series_are_loop_local_and_answered_keeps_one_pair() -> None:
    metrics = Metrics()
    for name in ("requests", "upstream_requests", "fallbacks", "tokens", "cost_usd", "limited"):
        assert isinstance(getattr(metrics, name), LoopCounter), name
    for name in ("request_seconds", "upstream_seconds"):
        assert isinstance(getattr(metrics, name), LoopHistogram), name
    metrics.answered("/v1/models", "GET", 200, 0.002)
    metrics.answered("/v1/models", "GET", 200, 0.004)
    metrics.answered("/v1/models", "PROPFIND", 405, 0.001)  # an unknown method: one series for all
    text = metrics.render().decode()
    assert 'switchboard_http_requests_total{method="GET",route="/v1/models",status="200"} 2.0' in text
    assert 'switchboard_http_requests_total{method="OTHER",route="/v1/models",status="405"} 1.0' in text
    assert 'switchboard_http_request_seconds_bucket{le="0.005",route="/v1/models"} 3.0' in text
    assert 'switchboard_http_request_seconds_count{route="/v1/models"} 3.0' in text
    assert metrics.answered_upstream("a", "ok") is metrics.answered_upstream("a", "ok")


def test_the_cuts_are_shown_from_the_start_one_series_a_reason() -> None:
    """`switchboard_http_cut_total`: its three reasons at 0 before any cut (so that a rate of
    them is there from the first scrape), and each `Cuts` series adds to its own."""
    metrics = Metrics()
    assert isinstance(metrics.http_cut, LoopCounter)

    def shown() -> dict[str, float]:
        text = metrics.render().decode()
        return {
            s.labels["reason"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "switchboard_http_cut_total"
        }

    assert shown() == {"receive_timeout": 0, "send_timeout": 0, "malformed": 0}
    metrics.cuts.send_timeout.inc()
    metrics.cuts.malformed.inc()
    metrics.cuts.malformed.inc()
    assert shown() == {"receive_timeout": 0, "send_timeout": 1, "malformed": 2}
    assert metrics.http_cut.labels("malformed") is metrics.cuts.malformed


def test_a_gauge_that_cannot_be_read_at_a_scrape_does_not_fail_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`before_render` sets gauges at each scrape (the budgets' spent): one that raises is logged
    and the others are shown as they were, never a 500 for `/metrics`."""
    metrics = Metrics()
    shown: list[int] = []

    def broken() -> None:
        raise RuntimeError("a bug")

    metrics.before_render += [broken, lambda: shown.append(1)]
    text = metrics.render()
    assert b"switchboard_info" in text and shown == [1]
    assert any("a bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)

"""Loop-local metrics: counters and histograms whose series the event-loop thread alone adds to.

A `LoopCounter`'s series is a `Count`, a `LoopHistogram`'s a `Timing`: plain objects, with no
lock and no float work beyond the addition (prometheus_client's take a lock per call). They are
collected into a prometheus_client registry and expose exactly what a prometheus_client
`Counter` or `Histogram` of the same name, help and labels would.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import ClassVar, Generic, TypeVar

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import metrics as _client
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

__all__ = ["Count", "LoopCounter", "LoopHistogram", "Timing"]

_S = TypeVar("_S", "Count", "Timing")
"""A series of a loop-local metric."""


class Count:
    """One series of a `LoopCounter`: a number that only goes up.

    `inc` adds without a lock or a check: only the event-loop thread calls it, and its callers
    pass counts and costs, never a negative number (prometheus_client would raise one).
    """

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value: float = 0
        """Kept an int while only ints are added (exact past 2**53, where a float is not)."""
        self.created = time.time()

    def inc(self, n: float = 1) -> None:
        """Add `n` (≥ 0)."""
        self.value += n


class Timing:
    """One series of a `LoopHistogram`: how many observations fell in each bucket, and their sum.

    A value equal to a bucket's upper bound counts in that bucket (`le`). A NaN counts in no
    bucket (nor in `_count`) and makes the sum NaN, as prometheus_client does.
    """

    __slots__ = ("bounds", "buckets", "created", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        """The buckets' upper bounds, ascending, the last +Inf."""
        self.buckets = [0] * len(bounds)
        """The observations of each bucket alone (the exposition's are cumulative)."""
        self.total = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        """Count `value` in the first bucket whose bound it does not exceed, and add it to the sum."""
        self.total += value
        if value == value:  # not NaN, which bisect would put in the first bucket
            self.buckets[bisect_left(self.bounds, value)] += 1


class _Loop(Generic[_S]):
    """A metric whose series live in loop-thread-only storage: plain objects, found by their
    label values in a dict, which the event-loop thread alone creates and adds to.

    It is a collector of its registry: `collect` (at a scrape, or `Metrics.traffic` in a worker
    thread) reads the series from a list that only grows, which a thread can walk while the
    loop appends to it (walking the dict, or copying its items, would raise or could be
    interleaved with an insertion: a collection of garbage in between runs Python code).
    """

    type: ClassVar[str]

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _S] = {}
        self._series: list[tuple[tuple[str, ...], _S]] = []
        """The same series, in the order they were made: what `collect` reads."""
        Metric(name, documentation, self.type)  # checks the name as prometheus_client does
        if not self.labelnames:  # the one series, shown from the start
            self._add(())
        registry.register(self)

    def labels(self, *values: str) -> _S:
        """The series of these label values, made on first use and kept."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: {len(values)} label values for {self.labelnames}")
            child = self._add(values)
        return child

    def describe(self) -> list[Metric]:
        """The family, without samples: the registry reserves its names from it."""
        return [Metric(self.name, self.documentation, self.type)]

    def collect(self) -> list[Metric]:
        """The family and its samples, as prometheus_client's own metric would give them."""
        family = Metric(self.name, self.documentation, self.type)
        created = _client._use_created  # read now: `disable_created_metrics()` may have changed it
        for values, child in self._series:
            self._samples(family, dict(zip(self.labelnames, values, strict=True)), child, created)
        return [family]

    def _add(self, values: tuple[str, ...]) -> _S:
        child = self._children[values] = self._child()
        self._series.append((values, child))
        return child

    def _child(self) -> _S:
        raise NotImplementedError

    def _samples(self, family: Metric, labels: dict[str, str], child: _S, created: bool) -> None:
        raise NotImplementedError


class LoopCounter(_Loop[Count]):
    """A counter of the event-loop thread: `labels(...)` gives a `Count` to keep and `inc`.

    With a `unit`, its series add whole numbers of that fraction (`unit=10**18`: atto-dollars),
    so that a sum of many small amounts stays exact; a scrape shows the sum divided by `unit`.
    """

    type = "counter"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        unit: int = 1,
        registry: CollectorRegistry,
    ) -> None:
        if unit < 1:
            raise ValueError(f"{name}: unit must be a whole number of at least 1")
        self.unit = unit
        # prometheus_client's name of a counter's family leaves `_total` to its sample.
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry=registry)

    def _child(self) -> Count:
        return Count()

    def _samples(self, family: Metric, labels: dict[str, str], child: Count, created: bool) -> None:
        value = child.value if self.unit == 1 else child.value / self.unit  # int / int: rounded once
        family.add_sample(self.name + "_total", labels, value)
        if created:
            family.add_sample(self.name + "_created", labels, child.created)


class LoopHistogram(_Loop[Timing]):
    """A histogram of the event-loop thread: `labels(...)` gives a `Timing` to keep and `observe`."""

    type = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float] = Histogram.DEFAULT_BUCKETS,
        registry: CollectorRegistry,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets not in ascending order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        if len(bounds) < 2:
            raise ValueError(f"{name}: a histogram needs at least one bucket before +Inf")
        if "le" in labelnames:
            raise ValueError(f"{name}: `le` is the buckets' label")
        self.bounds = tuple(bounds)
        self._le = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]  # untyped upstream
        super().__init__(name, documentation, labelnames, registry=registry)

    def _child(self) -> Timing:
        return Timing(self.bounds)

    def _samples(self, family: Metric, labels: dict[str, str], child: Timing, created: bool) -> None:
        name = self.name
        counted = 0
        for le, count in zip(self._le, list(child.buckets), strict=True):
            counted += count
            family.add_sample(name + "_bucket", {**labels, "le": le}, counted)
        family.add_sample(name + "_count", labels, counted)
        if self.bounds[0] >= 0:  # prometheus_client leaves the sum out when a bound is negative
            family.add_sample(name + "_sum", labels, child.total)
        if created:
            family.add_sample(name + "_created", labels, child.created)

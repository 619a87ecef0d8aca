"""`/metrics` of `serve --workers N`: the leader's exposition merged with its followers'.

Each exposition is read with prometheus_client's own parser (`text_string_to_metric_families`)
and the merge written with its own writer (`generate_latest`), so the answer is the text
format Prometheus reads from one process. The rule, by family (docs/reference.md §3.2):

- counters and histograms (and summaries) are summed, series by series (the same labels); a
  series' `_created` is the earliest;
- but those of the configuration and the event log (`LEADERS_ONLY`: reloads, events, pulls,
  webhooks) are the leader's alone: a follower loads the same files for itself, and what it
  counts of that is not a second reload of the service;
- gauges (and info) are the leader's: the generation, providers, health, budgets' spent and
  the fan-out are the same state in every worker, shared through the files and Redis.

A family only followers have is taken from the first that has it (and, a counter or a
histogram, summed with the others').

Prometheus reads a counter that goes down as a reset, and all of its value then as new counts:
the sums must only ever go up, as one process's counters do (`Scrapes`). A follower that does
not answer a scrape is counted with what it last answered, and a follower started again (another
process, counting from 0) keeps in the sums what the one before it last answered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

LEADERS_ONLY = frozenset(
    {
        "switchboard_reloads",
        "switchboard_reload_seconds",
        "switchboard_events",
        "switchboard_pulls",
        "switchboard_sync_failures",
        "switchboard_webhooks",
    }
)
"""Counters of the configuration and the log: the leader's alone (see the module)."""
_SUMMED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


class _Families:
    """A prometheus_client collector of families already made."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


class Scrapes:
    """The leader's followers' last expositions, by worker, so that the merge never goes down."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[int, bytes]] = {}
        """Each follower's last answer: its process id and its exposition."""
        self.gone = b""
        """The sums of followers that were started again: what each last answered."""

    def merged(self, own: bytes, scraped: dict[int, tuple[int, bytes] | None]) -> bytes:
        """`own` with each follower's answer `(pid, exposition)` to this scrape (None: none)."""
        texts = []
        for worker, answer in scraped.items():
            before = self.last.get(worker)
            if answer is None:
                if before is not None:  # too slow this time: what it answered last
                    texts.append(before[1])
                continue
            if before is not None and before[0] != answer[0]:  # another process: its counts start at 0
                self.gone = merged(b"", [self.gone, before[1]])
            self.last[worker] = answer
            texts.append(answer[1])
        if self.gone:
            texts.append(self.gone)
        return merged(own, texts)


def merged(own: bytes, others: Sequence[bytes]) -> bytes:
    """The leader's exposition `own` with its followers' `others` (see the module)."""
    families: dict[str, Metric] = {}
    series: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for index, text in enumerate((own, *others)):
        for family in text_string_to_metric_families(text.decode("utf-8", "replace")):
            kept = families.get(family.name)
            if kept is None:
                families[family.name] = family
                series[family.name] = {_key(s): s for s in family.samples}
                continue
            if index == 0 or family.type not in _SUMMED or family.name in LEADERS_ONLY:
                continue
            if kept.type != family.type:
                continue
            found = series[family.name]
            for sample in family.samples:
                key = _key(sample)
                before = found.get(key)
                if before is None:
                    found[key] = sample
                elif sample.name.endswith("_created"):
                    found[key] = before._replace(value=min(before.value, sample.value))
                else:
                    found[key] = before._replace(value=before.value + sample.value)
    for name, family in families.items():
        family.samples = list(series[name].values())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


def _key(sample: Sample) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample.name, tuple(sorted(sample.labels.items()))

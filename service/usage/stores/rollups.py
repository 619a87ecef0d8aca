"""The rollups: records added up by UTC hour, and the ranges each rollup answers exactly.

Storing a batch adds the rows it really inserted to `usage_hourly` and `usage_daily`, in the
same transaction (`SQLStore`): `add_up` sums a batch's columns by hour, client, provider,
model and purpose, and `UPSERTS` add each sum to its row, held at `MAX_SUM`. A read of
[since, until) is cut by `pieces` into whole days, whole hours and the ragged edges, each
answered by the table that holds it exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from itertools import repeat
from operator import floordiv, itemgetter
from typing import Any

from service.usage.query import UsageQuery, day_after, day_start, hour_after, hour_start
from service.usage.stores.schema import MAX_SUM, ROLLUP_SUMS
from service.usage.values import from_micros

_UPSERT = (
    "INSERT INTO {table} (period, client, provider, model, purpose, "
    + ", ".join(ROLLUP_SUMS)
    + ") VALUES ("
    + ", ".join("?" * (5 + len(ROLLUP_SUMS)))
    + ") ON CONFLICT (period, client, provider, model, purpose) DO UPDATE SET "
    + ", ".join(
        f"{c} = CASE WHEN {{table}}.{c} > {MAX_SUM} - excluded.{c} THEN {MAX_SUM} "
        f"ELSE {{table}}.{c} + excluded.{c} END"
        for c in ROLLUP_SUMS
    )
)
UPSERTS = {table: _UPSERT.format(table=table) for table in ("usage_hourly", "usage_daily")}
"""Each rollup's upsert, formatted once (a `str.format` of it costs more than a small batch's rows)."""

_HOUR_US = 3_600_000_000

Rollups = dict[tuple[str, str, str, str, str], list[int]]
"""Sums (`ROLLUP_SUMS`) by UTC hour (`YYYY-MM-DDTHH`), client, provider, model and purpose."""


def add_up(rollups: Rollups, columns: Sequence[Sequence[Any]]) -> None:
    """Add rows to `rollups`, given as the columns of `usage_records` (each a sequence of the rows'
    values, as stored). Each group's sums are taken over its columns at once: the batch of one
    client and model (the common case) is added up without a step a row."""
    if not columns or not columns[1]:
        return
    ts = columns[1]
    low, high = min(ts) // _HOUR_US, max(ts) // _HOUR_US
    hours: Iterable[int] = repeat(low) if low == high else [t // _HOUR_US for t in ts]
    keys = list(zip(hours, columns[2], columns[5], columns[4], columns[3], strict=False))
    groups: dict[tuple[Any, ...], list[int]] = {}
    if len(dict.fromkeys(keys)) == 1:
        picks: Iterable[tuple[tuple[Any, ...], Any]] = [(keys[0], None)]
    else:
        for i, key in enumerate(keys):
            found = groups.get(key)
            if found is None:
                groups[key] = [i]
            else:
                found.append(i)
        picks = ((key, _picker(rows)) for key, rows in groups.items())
    summed = [columns[i] for i in (7, 21, 12, 13, 14, 15, 16, 17)]
    for (hour, client, provider, model, purpose), pick in picks:
        status, limited, prompt, cached, cache_write, completion, reasoning, cost = (
            summed if pick is None else [pick(c) for c in summed]
        )
        period = _PERIODS.get(hour)
        if period is None:
            if len(_PERIODS) >= _PERIODS_KEPT:
                _PERIODS.clear()
            period = _PERIODS[hour] = from_micros(hour * _HOUR_US).isoformat()[:13]
        named = (period, client or "", provider or "", model or "", purpose)
        sums = rollups.get(named)
        if sums is None:
            sums = rollups[named] = [0] * len(ROLLUP_SUMS)
        micro = sum(map(floordiv, cost, repeat(1_000_000)))
        sums[0] += len(status)
        if max(status) >= 500:
            sums[1] += sum(1 for s, lim in zip(status, limited, strict=True) if s >= 500 and not lim)
        sums[2] += sum(limited)
        sums[3] += sum(prompt)
        sums[4] += sum(cached)
        sums[5] += sum(cache_write)
        sums[6] += sum(completion)
        sums[7] += sum(reasoning)
        sums[8] += micro
        sums[9] += sum(cost) - micro * 1_000_000  # each row's rest (below a micro-dollar), summed


_PERIODS: dict[int, str] = {}
"""The `YYYY-MM-DDTHH` of the hours (since 1970) added up lately: each batch's are the same few."""
_PERIODS_KEPT = 1024


def _picker(rows: list[int]) -> Any:
    """What takes a group's values (`rows`, its indexes) out of a column, as a sequence."""
    if len(rows) == 1:
        only = rows[0]
        return lambda values: (values[only],)
    return itemgetter(*rows)


def pieces(query: UsageQuery) -> Iterator[tuple[str, datetime, datetime]]:
    """[since, until) cut into what each table answers exactly: (table, since, until)."""
    since, until = query.since, query.until
    first_hour, last_hour = hour_after(since), hour_start(until)
    if first_hour >= last_hour:
        yield "usage_records", since, until
        return
    yield "usage_records", since, first_hour
    yield "usage_records", last_hour, until
    first_day, last_day = day_after(first_hour), day_start(last_hour)
    if "hour" in query.group_by or first_day >= last_day:
        yield "usage_hourly", first_hour, last_hour
        return
    yield "usage_hourly", first_hour, first_day
    yield "usage_daily", first_day, last_day
    yield "usage_hourly", last_day, last_hour

"""Stored rows read back: a record as `Record`, a sum's cost as USD, a group key as shown."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from service.usage.encoding import fields, record_of
from service.usage.record import Record
from service.usage.values import count, from_micros


def dollars(usd: Any, micro: Any, pico: Any) -> Decimal:
    """The USD of a sum in three parts (`COST`, `ROLLUP_COST`)."""
    return Decimal(int(usd or 0)) + Decimal(int(micro or 0)).scaleb(-6) + Decimal(int(pico or 0)).scaleb(-12)


def as_record(row: Sequence[Any]) -> Record:
    """A stored row as a `Record`; one whose values are not of their column's kind (SQLite keeps
    what it was given: a latency `"abc"` stored by an older version) is read as `fields` bounds
    a request's values, so that no row makes a reader fail (`/usage/requests` answered 500)."""
    try:
        if all(type(row[i]) is str or row[i] is None for i in _TEXTS):
            record = _stored(row)
            if 0 <= record.latency_ms < 1e12 and (record.ttfb_ms is None or 0 <= record.ttfb_ms < 1e12):
                return record
    except (TypeError, ValueError, ArithmeticError):
        pass
    return _bounded(row)


_TEXTS = (0, 2, 3, 4, 5, 6, 20)
"""The columns of text (id, names, replica): a row holding another kind there is read bounded."""


def _bounded(row: Sequence[Any]) -> Record:
    ts = count(row[1])
    try:
        from_micros(ts)
    except (OverflowError, ValueError):
        ts = 0  # a time no datetime holds: shown at the epoch
    atto = count(row[17]) * 10**6  # pico-dollars stored, atto-dollars for `fields`
    r = row
    values = fields(
        r[0], ts, r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13],
        r[14], r[15], r[16], atto, r[18], r[19], r[20], r[21],
    )  # fmt: skip
    return record_of(values)


def _stored(row: Sequence[Any]) -> Record:
    (rid, ts, client, purpose, model, provider, upstream, status, stream, attempts, latency, ttfb) = row[:12]
    prompt, cached, cache_write, completion, reasoning, cost, priced, estimated, replica, limited = row[12:]
    return Record(
        id=rid,
        ts=from_micros(int(ts)),
        client=client,
        purpose=purpose,
        model=model,
        provider=provider,
        upstream_model=upstream,
        status=int(status),
        stream=bool(stream),
        attempts=int(attempts),
        latency_ms=float(latency),
        ttfb_ms=None if ttfb is None else float(ttfb),
        prompt_tokens=int(prompt),
        cached_tokens=int(cached),
        cache_write_tokens=int(cache_write),
        completion_tokens=int(completion),
        reasoning_tokens=int(reasoning),
        cost_usd=Decimal(int(cost)).scaleb(-12),
        priced=bool(priced),
        estimated=bool(estimated),
        replica=replica,
        limited=bool(limited),
    )


def shown(name: str, value: Any) -> str | None:
    """A group key's value as the answer shows it: '' is null, an hour is ISO 8601 UTC."""
    if value is None or value == "":
        return None
    text = str(value)
    return f"{text}:00:00Z" if name == "hour" else text

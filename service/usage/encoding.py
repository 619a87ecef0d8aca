"""A record as one line of the spool, and back, made safe for any database on the way.

A line is a JSON array in a fixed order (`FIELDS`), led by a format version, ended by `\\n`:
compact, and quick to write on the request path (orjson writes and reads it; json's own module
only what orjson refuses, so that a line means what it meant). Encoding also bounds what a request could
make absurd, so that no record can fail a batch and hold the spool back: text loses NUL
characters and lone surrogates and is cut to 256 characters (and 512 bytes), counts are whole numbers within
64 bits, times finite, and money a finite decimal between 0 and a million dollars, written
once as plain digits (`"0.00000075"`; lines written before issue 22 may say `"7.5E-7"`, and
are read all the same).
"""

from __future__ import annotations

import json
import math
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from service.usage.record import Record
from service.usage.values import (
    MAX_COST,
    MAX_COUNT,
    TEXT_LIMIT,
    cost_text,
    count,
    from_micros,
    micros,
    pico_text,
    text,
)

VERSION = 1
FIELDS = (
    "id",
    "ts",
    "client",
    "purpose",
    "model",
    "provider",
    "upstream_model",
    "status",
    "stream",
    "attempts",
    "latency_ms",
    "ttfb_ms",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_usd",
    "priced",
    "estimated",
    "replica",
    "limited",
)
"""The record's fields in the order of a line (after the version)."""


class BadLine(ValueError):
    """A spool line that is not a record (torn by a crash, or damaged)."""


def encode(record: Record) -> bytes:
    """The record as one spool line."""
    return dumps(values_of(record))


def values_of(record: Record) -> list[Any]:
    """What the line of `record` holds (`fields`' list)."""
    return fields(
        record.id,
        micros(record.ts),
        record.client,
        record.purpose,
        record.model,
        record.provider,
        record.upstream_model,
        record.status,
        record.stream,
        record.attempts,
        record.latency_ms,
        record.ttfb_ms,
        record.prompt_tokens,
        record.cached_tokens,
        record.cache_write_tokens,
        record.completion_tokens,
        record.reasoning_tokens,
        _usd(record.cost_usd),
        record.priced,
        record.estimated,
        record.replica,
        record.limited,
    )


def fields(
    id_: object,
    ts_us: int,
    client: object,
    purpose: object,
    model: object,
    provider: object,
    upstream_model: object,
    status: object,
    stream: object,
    attempts: object,
    latency_ms: object,
    ttfb_ms: object,
    prompt_tokens: object,
    cached_tokens: object,
    cache_write_tokens: object,
    completion_tokens: object,
    reasoning_tokens: object,
    cost_usd: object,
    priced: object,
    estimated: object,
    replica: object,
    limited: object,
    written: str | None = None,
) -> list[Any]:
    """A record's line as a list (`VERSION`, then `FIELDS`), each value bounded: what `dumps`
    writes, and what the ledger stores (`row`) without reading the line back. The gateway calls
    it with the fields of a request (no `Record` made on the request path); `encode` with a
    record's. A value of the expected type within bounds is taken as it is (the common case).
    `cost_usd` is an `Amount`: an `int` is atto-dollars (pricing's), a `Decimal` USD (a record's);
    `written`, when given, is `cost_text(cost_usd)` as the caller made it already."""
    status = status if type(status) is int and 0 <= status <= 999 else count(status, 999)
    named = _names(client, purpose, model, provider, upstream_model, replica)
    return [
        VERSION,
        id_
        if type(id_) is str and 0 < len(id_) <= TEXT_LIMIT and id_.isascii() and "\x00" not in id_
        else text(id_) or "-",  # `text`'s common case, inline
        ts_us,
        *named[:5],
        status,
        bool(stream),
        attempts if type(attempts) is int and 0 <= attempts <= MAX_COUNT else count(attempts),
        latency_ms if type(latency_ms) is float and 0 <= latency_ms < 1e12 else _float(latency_ms) or 0.0,
        ttfb_ms if type(ttfb_ms) is float and 0 <= ttfb_ms < 1e12 else _float(ttfb_ms),
        # `_count` of each, inline (the common case: a whole number in bounds)
        prompt_tokens
        if type(prompt_tokens) is int and 0 <= prompt_tokens <= MAX_COUNT
        else count(prompt_tokens),
        cached_tokens
        if type(cached_tokens) is int and 0 <= cached_tokens <= MAX_COUNT
        else count(cached_tokens),
        cache_write_tokens
        if type(cache_write_tokens) is int and 0 <= cache_write_tokens <= MAX_COUNT
        else count(cache_write_tokens),
        completion_tokens
        if type(completion_tokens) is int and 0 <= completion_tokens <= MAX_COUNT
        else count(completion_tokens),
        reasoning_tokens
        if type(reasoning_tokens) is int and 0 <= reasoning_tokens <= MAX_COUNT
        else count(reasoning_tokens),
        cost_text(cost_usd) if written is None else written,
        bool(priced),
        bool(estimated),
        named[5],
        bool(limited) or status == 429,
    ]


def _names(*names: object) -> tuple[str | None, ...]:
    """A record's client, purpose, model, provider, upstream model and replica as `fields`
    writes them: the same few for most requests, so those of strings are remembered."""
    try:
        found = _NAMES.get(names)
    except TypeError:  # a value that cannot be a key is not a string: made below
        found = None
    if found is not None:
        return found
    client, purpose, model, provider, upstream_model, replica = names
    found = (
        text(client),
        text(purpose) or "-",
        text(model),
        text(provider),
        text(upstream_model),
        text(replica) or "-",
    )
    if all(name is None or (type(name) is str and len(name) <= TEXT_LIMIT) for name in names):
        # only what it keeps as it is: a client's huge `model` names would hold memory
        if len(_NAMES) >= _NAMES_KEPT:
            _NAMES.clear()
        _NAMES[names] = found
    return found


_NAMES: dict[tuple[object, ...], tuple[str | None, ...]] = {}
_NAMES_KEPT = 4096


def dumps(values: list[Any]) -> bytes:
    """`fields`' list as one spool line."""
    try:
        return orjson.dumps(values, option=orjson.OPT_APPEND_NEWLINE)  # json.dumps' text, a tenth of the work
    except (TypeError, orjson.JSONEncodeError):  # e.g. a lone surrogate a file's line held: json's way
        # escaped (`\ud800`): UTF-8 has no lone surrogate, and json's module reads it back the same
        return json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def row(values: list[Any]) -> tuple[Any, ...]:
    """A line's values (`fields`) as the database's row: the columns of `usage_records`, in order."""
    return (
        *values[1:9],
        int(values[9]),
        *values[10:18],
        pico_text(values[18]),
        int(values[19]),
        int(values[20]),
        values[21],
        int(values[22]),
    )


def record_of(values: list[Any]) -> Record:
    """A line's values (`fields`) as a `Record`."""
    _, rid, ts, client, purpose, model, provider, upstream, status, stream, attempts = values[:11]
    latency, ttfb, prompt, cached, cache_write, completion, reasoning = values[11:18]
    amount, priced, estimated, replica, limited = values[18:]
    return Record(
        rid,
        from_micros(int(ts)),
        client,
        purpose,
        model,
        provider,
        upstream,
        status,
        stream,
        attempts,
        latency,
        ttfb,
        prompt,
        cached,
        cache_write,
        completion,
        reasoning,
        Decimal(amount),
        priced,
        estimated,
        replica,
        limited,
    )


_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19
"""An integer past 64 bits has 19 digits at least (below -2**63: orjson makes a float of
`-9223372036854775809`); one of 18 or fewer is exact in orjson."""
MAX_OPENINGS = 256
"""A text with more `[` and `{` than this is read by json's module (it may nest that deep)."""
MAX_QUICK_BYTES = 1024
"""A text larger than this is read by json's module: past ~2 KB the checks below (1.3 ns a
byte) cost more than orjson saves (json's module: ~1 ns a byte and 2 µs a call; orjson 0.4 ns)."""


def loads(data: bytes) -> Any:
    """JSON as json's module reads it (`json.loads`), read by orjson where that is the same.

    orjson reads a small text (a spool line, a short request) in a third of the time, but not
    everything the same way: it refuses NaN, UTF-16, a BOM, escaped lone surrogates, and json's
    module reads those; it makes floats of integers past 64 bits; and some versions crash on
    deep nesting. So a text with a run of 19
    digits, or more than `MAX_OPENINGS` brackets and braces (no nesting can be deeper), one
    over `MAX_QUICK_BYTES`, and one orjson refuses are json's module's: what is accepted, how
    it reads and the error of what is not stay as they were (ValueError, or RecursionError)."""
    if (
        len(data) <= MAX_QUICK_BYTES
        and data.count(b"[") + data.count(b"{") <= MAX_OPENINGS
        and _LONG_NUMBER not in data.translate(_DIGITS)
    ):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def decode(line: bytes) -> Record:
    """A spool line back as its record; BadLine when it is not one."""
    return record_of(decode_values(line))


def decode_values(line: bytes) -> list[Any]:
    """A spool line back as `fields`' list; BadLine when it is not one.

    A line this version wrote holds what `fields` made, and is given back as it is. One written
    otherwise (by an older version, or by hand) may hold what no database binds, or binds and
    then cannot read back (a name that is a number, a list or holds `\\u0000` or a lone
    surrogate, a status `true`, a count past 64 bits or `"100"`, a latency `"abc"`): its values
    are bounded by `fields` as a request's are, so that it is stored and never holds the spool
    back. Its cost is not changed: one that is not a decimal from 0 to `MAX_COST` (`"-1"`,
    `"NaN"`, `"1e30"`) makes the line a BadLine, set aside, never stored as other money."""
    try:
        values = loads(line)
        if not isinstance(values, list) or len(values) != len(FIELDS) + 1 or values[0] != VERSION:
            raise BadLine("not a version 1 record")
        ts = int(values[2])
        from_micros(ts)  # a time datetime can hold
        amount = values[18]
        usd = Decimal(amount)  # a decimal cost
        if not (usd.is_finite() and 0 <= usd <= MAX_COST) or isinstance(amount, bool):
            raise BadLine(f"a cost out of bounds: {str(amount)[:40]!r}")
        v = values
        return fields(
            v[1], ts, v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13], v[14],
            v[15], v[16], v[17], None, v[19], v[20], v[21], v[22], written=amount,
        )  # fmt: skip
    except BadLine:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, InvalidOperation, RecursionError) as exc:
        raise BadLine(f"{type(exc).__name__}: {exc}") from None


def _usd(value: object) -> object:
    """A record's `cost_usd` as `fields` takes it: an `int` there is USD, not atto-dollars."""
    return Decimal(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _float(value: object) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past any float
        return None
    return number if math.isfinite(number) and 0 <= number < 1e12 else None

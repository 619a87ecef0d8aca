"""The ledger's tables and every statement on them, in the SQL SQLite and PostgreSQL share.

`usage_records` holds one row a record (kept `retention_days`), keyed by its time, `id` and
replica (an upstream's own `x-request-id` need not be unique), and kept in that order in
SQLite (a range of time is read in one sweep). Storing a batch twice stores it once: the
insert returns the rows it really inserted, and only those are added to the rollups,
`usage_hourly` and `usage_daily` (client, provider, model and purpose a UTC hour, and a UTC
day, kept for good), in the same transaction. Money is stored as whole pico-dollars
(10⁻¹² USD): exact for every price with up to six decimals per million tokens. A rollup keeps
its cost in two parts (whole micro-dollars, and the rest), each held at 64 bits; sums are read
in parts small a row (whole dollars, micro-dollars, the rest; tokens by the million and the
rest) so that no 64-bit integer overflows, however large the total, and come back exact.

Subclasses say how to connect (`_transaction`, `_reading`) and the one expression the two
dialects write differently: the UTC hour of a timestamp.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from itertools import chain, repeat
from operator import floordiv, getitem, itemgetter
from typing import Any, Literal, Protocol

from service.errors import SwitchboardError
from service.usage.encoding import count, fields, from_micros, micros, pico_text, record_of, values_of
from service.usage.encoding import row as row_of
from service.usage.query import (
    MAX_GROUPS,
    GroupKey,
    RequestsQuery,
    Totals,
    UsageQuery,
    day_after,
    day_start,
    hour_after,
    hour_start,
    too_many_groups,
)
from service.usage.record import Record


class StoreUnavailable(SwitchboardError):
    """The database cannot take or answer anything now; the ledger retries."""


class BadBatch(SwitchboardError):
    """The database refused a batch for what it holds (not for being unreachable)."""


class _Stored(Exception):
    """A batch held rows stored already: its transaction is undone, and it is stored knowing which."""


Row = tuple[Any, ...]
"""A record as `usage_records` holds it (`encoding.row`)."""


class Cursor(Protocol):
    """The part of a DB-API cursor used here."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, params: Sequence[Sequence[Any]], /) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...
    @property
    def rowcount(self) -> int: ...


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage_records (
        id TEXT NOT NULL,
        ts_us BIGINT NOT NULL,
        client TEXT,
        purpose TEXT NOT NULL,
        model TEXT,
        provider TEXT,
        upstream_model TEXT,
        status INTEGER NOT NULL,
        stream SMALLINT NOT NULL,
        attempts INTEGER NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        ttfb_ms DOUBLE PRECISION,
        prompt_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        cache_write_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        reasoning_tokens BIGINT NOT NULL,
        cost_pico BIGINT NOT NULL,
        priced SMALLINT NOT NULL,
        estimated SMALLINT NOT NULL,
        replica TEXT NOT NULL,
        limited SMALLINT NOT NULL,
        PRIMARY KEY (ts_us, id, replica)
    ){clustered}""",
    "CREATE INDEX IF NOT EXISTS usage_records_client ON usage_records (client, ts_us)",
    "CREATE INDEX IF NOT EXISTS usage_records_provider ON usage_records (provider, ts_us)",
    *(
        statement
        for table in ("usage_hourly", "usage_daily")
        for statement in (
            f"""CREATE TABLE IF NOT EXISTS {table} (
                period TEXT NOT NULL,
                client TEXT NOT NULL,
                provider TEXT NOT NULL,
                model TEXT NOT NULL,
                purpose TEXT NOT NULL,
                requests BIGINT NOT NULL,
                errors BIGINT NOT NULL,
                limited BIGINT NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                cached_tokens BIGINT NOT NULL,
                cache_write_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                reasoning_tokens BIGINT NOT NULL,
                cost_micro BIGINT NOT NULL,
                cost_rest BIGINT NOT NULL,
                PRIMARY KEY (period, client, provider, model, purpose)
            ){{clustered}}""",
            f"CREATE INDEX IF NOT EXISTS {table}_client ON {table} (client, period)",
            f"CREATE INDEX IF NOT EXISTS {table}_provider ON {table} (provider, period)",
        )
    ),
)
"""Rollups, by UTC hour (`period` `YYYY-MM-DDTHH`) and by UTC day (`YYYY-MM-DD`, so a month by
day reads 30 rows a route, not 720), store a missing client, provider or model as '' (a key
column cannot be NULL), and their cost as whole micro-dollars plus the rest in pico-dollars, so
no period's sum overflows. `{clustered}` is where SQLite keeps them in key order."""

_COLUMNS = (
    "id, ts_us, client, purpose, model, provider, upstream_model, status, stream, attempts, latency_ms, "
    "ttfb_ms, prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, reasoning_tokens, "
    "cost_pico, priced, estimated, replica, limited"
)
VALUES_PER_ROW = 22
_ROW = "(" + ", ".join("?" * VALUES_PER_ROW) + ")"
_ROLLUP_SUMS = (
    "requests",
    "errors",
    "limited",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_micro",
    "cost_rest",
)
MAX_SUM = 2**63 - 1
"""What a rollup's sum is held to: a BIGINT's largest. Each record's counts are bounded, but an
upstream reporting absurd usage (`MAX_TOKENS` a class, every answer) fills one route's day in a
few million requests; past it PostgreSQL refused the record (`bigint out of range`: set aside, lost)
and SQLite made the sum a float."""
_UPSERT = (
    "INSERT INTO {table} (period, client, provider, model, purpose, "
    + ", ".join(_ROLLUP_SUMS)
    + ") VALUES ("
    + ", ".join("?" * (5 + len(_ROLLUP_SUMS)))
    + ") ON CONFLICT (period, client, provider, model, purpose) DO UPDATE SET "
    + ", ".join(
        f"{c} = CASE WHEN {{table}}.{c} > {MAX_SUM} - excluded.{c} THEN {MAX_SUM} "
        f"ELSE {{table}}.{c} + excluded.{c} END"
        for c in _ROLLUP_SUMS
    )
)
_UPSERTS = {table: _UPSERT.format(table=table) for table in ("usage_hourly", "usage_daily")}
"""Each rollup's upsert, formatted once (a `str.format` of it costs more than a small batch's rows)."""
_COST = "sum(cost_pico / 1000000000000), sum(cost_pico / 1000000 % 1000000), sum(cost_pico % 1000000)"
"""A cost sum in three parts (`_cost`'s: whole dollars, micro-dollars, pico-dollars), each
small a row, so that no sum passes 64 bits (SQLite's `sum` fails past it, "integer overflow")."""
_TOKENS = ", ".join(
    f"sum({c} / 1000000), sum({c} % 1000000)"
    for c in ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")
)
"""The token sums of `/usage`, each in parts as costs are (millions, and the rest): SQLite's
`sum` fails past 64 bits ("integer overflow"), which a month of rollups held at `MAX_SUM` reaches."""
_ROLLUP_COST = "sum(cost_micro / 1000000), sum(cost_micro % 1000000), sum(cost_rest)"
_ROWS_PER_INSERT = 500
_SLICES = (64, 16, 4, 1)
"""The rows one statement of `insert_values` holds: a batch goes in the largest that fit, so a few
statements (each prepared once, then cached by the driver) store it, not one a row. Each lets
the GIL go once while SQLite runs it, and binds its values (the GIL held) in well under 0.1 ms."""
_INSERTS: dict[tuple[int, int], str] = {}
"""`_insert_sql`'s statements, made once each."""
_BOOLEANS = (8, 18, 19, 21)
"""The columns stored as 0 or 1 (`stream`, `priced`, `estimated`, `limited`)."""
_COST_AT = 17
"""The column of the cost (whole pico-dollars, from the line's text)."""
_NAMES = (2, 3, 4, 5, 6, 20)
"""The columns of names (client, purpose, model, provider, upstream model, replica): the same in
most rows of a statement (the replica's always), and then bound once for all of them."""
_SHARED_FROM = 16
"""A statement this large binds once a name all its rows share: a smaller one, each row's (so
that the statements of the smaller sizes, each prepared once, stay few)."""
_HOUR_US = 3_600_000_000
_PURGE_CHUNK = 5000


class SQLStore:
    """The statements; a subclass connects. Safe to call from several threads at once."""

    shared: bool = False
    """Whether several replicas share this database (PostgreSQL)."""
    kind: Literal["sqlite", "postgresql"]
    hour_of_ts: str
    """SQL for the UTC hour of `ts_us`, as `YYYY-MM-DDTHH`."""
    counts_many: bool = False
    """Whether the driver's `executemany` counts the rows it inserted (`rowcount`)."""
    clustered: str = ""
    """What makes a table kept in key order (SQLite's `WITHOUT ROWID`)."""
    max_rows: int = _ROWS_PER_INSERT
    """The most rows one INSERT may hold: SQLite binds at most 999 values in a statement
    before 3.32 (32,766 since; a build may set another), `VALUES_PER_ROW` a row."""

    @property
    def exists(self) -> bool:
        """Whether there is a database to read (a SQLite file may not have been made yet)."""
        return True

    # -- what a subclass provides --------------------------------------------------------------------

    def _transaction(self) -> contextlib.AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _reading(self) -> contextlib.AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _schema_lock(self, cursor: Cursor) -> None:
        """Keep replicas from creating the tables at the same moment (PostgreSQL)."""

    def close(self) -> None:
        raise NotImplementedError

    # -- the ledger's side ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create the tables when they are not there; StoreUnavailable when it cannot connect."""
        with self._transaction() as cur:
            self._schema_lock(cur)
            for statement in SCHEMA:
                cur.execute(statement.replace("{clustered}", self.clustered))

    def ping(self) -> None:
        with self._reading() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()

    def insert(self, records: Sequence[Record]) -> int:
        """Store the records and add the new ones to the rollups, in one transaction; returns how
        many were new (a record whose `id` is already stored is skipped, not counted twice)."""
        return self.insert_values([values_of(r) for r in records])

    def insert_values(self, batch: Sequence[list[Any]]) -> int:
        """`insert` of records given as their lines' values (`encoding.fields`, as the ledger
        keeps them); the lists are not changed.

        Where the driver counts the rows a statement inserted (`counts_many`), the batch goes in
        a few statements of many rows each (`_statements`: the lines' values bound a column at
        a time, no row made of each, a name all rows share bound once), and when every row was
        new (the common case: a batch is stored again only after a crash, and holds a record
        twice never) they are the ones the rollups add, summed a column at a time. Else, and
        when some row was already stored, the rows really inserted are told by RETURNING."""
        if not batch:
            return 0
        if self.counts_many:
            try:
                with self._transaction() as cur:
                    inserted = 0
                    bound: list[list[Sequence[Any]]] = []
                    for sql, values, columns in _statements(batch, self.max_rows):
                        cur.execute(sql, values)
                        inserted += cur.rowcount
                        bound.append(columns)
                    if inserted != len(batch):
                        raise _Stored  # some were stored already: undone, and done again knowing which
                    hourly: _Rollups = {}
                    if len(bound) > 1:  # the batch's columns, each whole
                        bound = [list(map(list, map(chain.from_iterable, zip(*bound, strict=True))))]
                    _add_up(hourly, bound[0])
                    self._upsert_rollups(cur, hourly)
                    return inserted
            except _Stored:
                pass
        rows = [row_of(values) for values in batch]
        unique = {(r[0], r[1], r[20]): r for r in reversed(rows)}  # the first of a repeated one
        return self._insert_returning(unique, list(unique.values()))

    def _insert_returning(self, unique: dict[tuple[Any, Any, Any], Row], batch: list[Row]) -> int:
        with self._transaction() as cur:
            inserted: list[Row] = []
            per_insert = min(_ROWS_PER_INSERT, self.max_rows)
            for start in range(0, len(batch), per_insert):
                chunk = batch[start : start + per_insert]
                values = list(chain.from_iterable(chunk))
                sql = (
                    f"INSERT INTO usage_records ({_COLUMNS}) VALUES "
                    + ", ".join([_ROW] * len(chunk))
                    + " ON CONFLICT (ts_us, id, replica) DO NOTHING RETURNING id, ts_us, replica"
                )
                cur.execute(sql, values)
                inserted.extend(unique[(row[0], int(row[1]), row[2])] for row in cur.fetchall())
            self._add_rollups(cur, inserted)
        return len(inserted)

    @staticmethod
    def _add_rollups(cur: Cursor, rows: Sequence[Row]) -> None:
        """Add rows (`encoding.row`'s) to the rollups."""
        hourly: _Rollups = {}
        if rows:
            _add_up(hourly, list(zip(*rows, strict=True)))
        SQLStore._upsert_rollups(cur, hourly)

    @staticmethod
    def _upsert_rollups(cur: Cursor, hourly: _Rollups) -> None:
        """Add the hourly sums (`_add_up`'s), and the daily ones they make, to the rollups."""
        if not hourly:
            return
        daily: _Rollups = {}
        for (hour, client, provider, model, purpose), sums in hourly.items():
            key = (hour[:10], client, provider, model, purpose)
            found = daily.get(key)
            if found is None:
                daily[key] = list(sums)
            else:
                for i, value in enumerate(sums):
                    found[i] += value
        for table, rollups in (("usage_hourly", hourly), ("usage_daily", daily)):
            # In key order: replicas adding to the same rows take their locks in one order.
            rows = [(*key, *sums) for key, sums in sorted(rollups.items())]
            if max(map(max, rollups.values())) > MAX_SUM:  # a batch of lines past 64 bits: held
                rows = [(*key, *(min(v, MAX_SUM) for v in sums)) for key, sums in sorted(rollups.items())]
            cur.executemany(_UPSERTS[table], rows)

    def purge(self, before: datetime, seconds: float | None = None) -> tuple[int, bool]:
        """Delete raw records older than `before`, in chunks (rollups stay), for about `seconds`
        at most (None: until done): how many were deleted, and whether that was all (else call
        again: each chunk is a transaction of its own)."""
        deleted = 0
        stop = None if seconds is None else time.monotonic() + seconds
        while True:
            with self._transaction() as cur:
                cur.execute(
                    "DELETE FROM usage_records WHERE (ts_us, id, replica) IN "
                    "(SELECT ts_us, id, replica FROM usage_records WHERE ts_us < ? LIMIT ?)",
                    (micros(before), _PURGE_CHUNK),
                )
                count = max(cur.rowcount, 0)
            deleted += count
            if count < _PURGE_CHUNK:
                return deleted, True
            if stop is not None and time.monotonic() >= stop:
                return deleted, False

    # -- reading -----------------------------------------------------------------------------------

    def grouped(self, query: UsageQuery) -> dict[GroupKey, Totals]:
        """`/usage`'s groups: whole days from the daily rollups (unless grouped by hour), whole
        hours from the hourly ones, and the range's ragged edges from the raw records."""
        groups: dict[GroupKey, Totals] = {}
        with self._reading() as cur:
            for table, since, until in _pieces(query):
                if table == "usage_records":
                    self._merge(groups, self._from_records(cur, query, since, until))
                else:
                    self._merge(groups, self._from_rollups(cur, query, table, since, until))
        return groups

    def requests(self, query: RequestsQuery) -> list[Record]:
        """Up to `limit + 1` records, newest first, after the cursor."""
        where, params = _record_filters(query.since, query.until, query.client, query.provider)
        if query.status is not None:
            where.append("status BETWEEN ? AND ?")
            params.extend(query.status)
        if query.cursor is not None:
            where.append("(ts_us < ? OR (ts_us = ? AND id < ?))")
            params.extend((query.cursor[0], query.cursor[0], query.cursor[1]))
        sql = (
            f"SELECT {_COLUMNS} FROM usage_records WHERE {' AND '.join(where) or '1 = 1'} "
            "ORDER BY ts_us DESC, id DESC LIMIT ?"
        )
        with self._reading() as cur:
            cur.execute(sql, (*params, query.limit + 1))
            return [_record(row) for row in cur.fetchall()]

    def spent(
        self,
        kind: Literal["client", "provider"],
        subject: str,
        since: datetime,
        until: datetime | None = None,
    ) -> Decimal:
        """The cost of `subject`'s records in [since, until) (whole hours from the rollups, the
        partial hours at either end from the records)."""
        column = "client" if kind == "client" else "provider"
        first = hour_after(since)
        hours = f"SELECT {_ROLLUP_COST} FROM usage_hourly WHERE {column} = ? AND period >= ?"
        records = f"SELECT {_COST} FROM usage_records WHERE {column} = ? AND ts_us >= ? AND ts_us < ?"
        with self._reading() as cur:
            if until is None:
                cur.execute(hours, (subject, first.strftime("%Y-%m-%dT%H")))
                total = _cost(*cur.fetchone())
                cur.execute(records, (subject, micros(since), micros(first)))
                return total + _cost(*cur.fetchone())
            last = max(hour_start(until), first)
            cur.execute(
                f"{hours} AND period < ?",
                (subject, first.strftime("%Y-%m-%dT%H"), last.strftime("%Y-%m-%dT%H")),
            )
            total = _cost(*cur.fetchone())
            for start, end in ((since, min(first, until)), (last, until)):
                if start < end:
                    cur.execute(records, (subject, micros(start), micros(end)))
                    total += _cost(*cur.fetchone())
            return total

    def _from_rollups(
        self, cur: Cursor, query: UsageQuery, table: str, first: datetime, last: datetime
    ) -> Iterator[tuple[GroupKey, Totals]]:
        keys = [_key(k, "client", "provider", "model", "period") for k in query.group_by]
        shape = "%Y-%m-%dT%H" if table == "usage_hourly" else "%Y-%m-%d"
        where = ["period >= ?", "period < ?"]
        params: list[Any] = [first.strftime(shape), last.strftime(shape)]
        for name in ("client", "provider", "model"):
            value = getattr(query, name)
            if value is not None:
                where.append(f"{name} = ?")
                params.append(value)
        sums = f"sum(requests), sum(errors), sum(limited), {_TOKENS}, {_ROLLUP_COST}"
        yield from self._groups(cur, query, keys, sums, table, where, params)

    def _from_records(
        self, cur: Cursor, query: UsageQuery, since: datetime, until: datetime
    ) -> Iterator[tuple[GroupKey, Totals]]:
        if since >= until:
            return
        keys = [
            _key(k, "coalesce(client, '')", "coalesce(provider, '')", "coalesce(model, '')", self.hour_of_ts)
            for k in query.group_by
        ]
        where, params = _record_filters(since, until, query.client, query.provider)
        if query.model is not None:
            where.append("model = ?")
            params.append(query.model)
        sums = (
            "count(*), sum(CASE WHEN limited = 0 AND status >= 500 THEN 1 ELSE 0 END), sum(limited), "
            f"{_TOKENS}, {_COST}"
        )
        yield from self._groups(cur, query, keys, sums, "usage_records", where, params)

    @staticmethod
    def _groups(
        cur: Cursor,
        query: UsageQuery,
        keys: list[str],
        sums: str,
        table: str,
        where: list[str],
        params: list[Any],
    ) -> Iterator[tuple[GroupKey, Totals]]:
        # Every name in this statement comes from fixed lists; every value caller-given is bound.
        select = ", ".join([*keys, sums])
        group = f" GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}" if keys else ""
        cur.execute(
            f"SELECT {select} FROM {table} WHERE {' AND '.join(where)}{group} LIMIT ?",
            (*params, MAX_GROUPS + 1),
        )
        width = len(keys)
        for row in cur.fetchall():
            requests, errors, limited = (int(v or 0) for v in row[width : width + 3])
            prompt, cached, completion, reasoning = (
                int(row[at] or 0) * 1_000_000 + int(row[at + 1] or 0)
                for at in range(width + 3, width + 11, 2)
            )
            totals = Totals(
                requests, errors, limited, prompt, cached, completion, reasoning, _cost(*row[width + 11 :])
            )
            yield tuple(_shown(name, value) for name, value in zip(query.group_by, row, strict=False)), totals

    @staticmethod
    def _merge(groups: dict[GroupKey, Totals], found: Iterator[tuple[GroupKey, Totals]]) -> None:
        for key, totals in found:
            if totals.requests:
                groups.setdefault(key, Totals()).add(totals)
        if len(groups) > MAX_GROUPS:  # a year by hour and model: the answer would be gigabytes
            raise too_many_groups()


# -- rows -------------------------------------------------------------------------------------------


def _cost(usd: Any, micro: Any, pico: Any) -> Decimal:
    """The USD of a sum in three parts (`_COST`, `_ROLLUP_COST`)."""
    return Decimal(int(usd or 0)) + Decimal(int(micro or 0)).scaleb(-6) + Decimal(int(pico or 0)).scaleb(-12)


def _record(row: Sequence[Any]) -> Record:
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


_Rollups = dict[tuple[str, str, str, str, str], list[int]]
"""Sums (`_ROLLUP_SUMS`) by UTC hour (`YYYY-MM-DDTHH`), client, provider, model and purpose."""


def _add_up(rollups: _Rollups, columns: Sequence[Sequence[Any]]) -> None:
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
            sums = rollups[named] = [0] * len(_ROLLUP_SUMS)
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


def _statements(
    batch: Sequence[list[Any]], max_rows: int
) -> Iterator[tuple[str, list[Any], list[Sequence[Any]]]]:
    """A batch of lines' values as statements of `_SLICES` rows each (`max_rows` at most),
    largest first: each statement, its values (a column after the other: each boolean 0 or
    1 and each cost whole pico-dollars, as `encoding.row` makes them; a name all its rows share
    once), and its columns (`usage_records`', the rows' values as stored)."""
    start = 0
    for size in _SLICES:
        if size > max_rows:
            continue
        while len(batch) - start >= size:
            columns: list[Sequence[Any]] = list(zip(*batch[start : start + size], strict=True))
            del columns[0]  # the lines' version
            for index in _BOOLEANS:
                try:
                    columns[index] = bytes(columns[index])  # booleans as 0 and 1, in one C loop
                except (TypeError, ValueError):
                    # not all whole numbers from 0 to 255 (a line written by hand): `int` of each
                    columns[index] = list(map(int, columns[index]))
            columns[_COST_AT] = list(map(pico_text, columns[_COST_AT]))
            shared = 0
            if size >= _SHARED_FROM:
                for index in _NAMES:
                    names = columns[index]
                    first = names[0]
                    if (first is None or type(first) is str) and names.count(first) == size:
                        shared |= 1 << index
            if shared:
                values = list(chain.from_iterable(map(getitem, columns, _bound(shared))))
            else:
                values = list(chain.from_iterable(columns))
            yield _insert_sql(size, shared), values, columns
            start += size


_ALL, _FIRST = slice(None), slice(1)


@functools.cache
def _bound(shared: int) -> tuple[slice, ...]:
    """What of each column a statement binds: all its values, or the first (in `shared`) alone."""
    return tuple(_FIRST if shared >> index & 1 else _ALL for index in range(VALUES_PER_ROW))


def _insert_sql(size: int, shared: int) -> str:
    """The INSERT of `size` rows bound a column after the other, each column of `shared` (a bit
    for each, by its index) bound once for every row."""
    sql = _INSERTS.get((size, shared))
    if sql is None:
        numbers = []  # each column's first parameter, and the step from a row to the next
        at = 1
        for index in range(VALUES_PER_ROW):
            step = 0 if shared >> index & 1 else 1
            numbers.append((at, step))
            at += 1 if step == 0 else size
        rows = ", ".join(
            "(" + ", ".join(f"?{first + step * row}" for first, step in numbers) + ")" for row in range(size)
        )
        sql = _INSERTS[(size, shared)] = (
            f"INSERT INTO usage_records ({_COLUMNS}) VALUES {rows} "
            "ON CONFLICT (ts_us, id, replica) DO NOTHING"
        )
    return sql


def _pieces(query: UsageQuery) -> Iterator[tuple[str, datetime, datetime]]:
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


def _record_filters(
    since: datetime | None, until: datetime | None, client: str | None, provider: str | None
) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append("ts_us >= ?")
        params.append(micros(since))
    if until is not None:
        where.append("ts_us < ?")
        params.append(micros(until))
    for name, value in (("client", client), ("provider", provider)):
        if value is not None:
            where.append(f"{name} = ?")
            params.append(value)
    return where, params


def _key(name: str, client: str, provider: str, model: str, hour: str) -> str:
    """The SQL of a group key (from a fixed list: `name` was checked against GROUP_KEYS)."""
    return {
        "client": client,
        "provider": provider,
        "model": model,
        "purpose": "purpose",
        "hour": hour,
        "day": f"substr({hour}, 1, 10)",
        "month": f"substr({hour}, 1, 7)",
    }[name]


def _shown(name: str, value: Any) -> str | None:
    """A group key's value as the answer shows it: '' is null, an hour is ISO 8601 UTC."""
    if value is None or value == "":
        return None
    text = str(value)
    return f"{text}:00:00Z" if name == "hour" else text

"""Every statement on the ledger's tables (`schema`), in the SQL SQLite and PostgreSQL share.

Storing a batch twice stores it once: the insert says which rows it really inserted, and
only those are added to the rollups (`rollups`), in the same transaction. Reads take whole
days and hours from the rollups, and the ragged edges of a range from the records.

Subclasses say how to connect (`_transaction`, `_reading`) and the one expression the two
dialects write differently: the UTC hour of a timestamp.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from itertools import chain
from typing import Any, Literal, Protocol

from service.errors import SwitchboardError
from service.usage.encoding import row as row_of
from service.usage.encoding import values_of
from service.usage.query import (
    MAX_GROUPS,
    GroupKey,
    RequestsQuery,
    Totals,
    UsageQuery,
    hour_after,
    hour_start,
    too_many_groups,
)
from service.usage.record import Record
from service.usage.stores.inserts import statements
from service.usage.stores.rollups import UPSERTS, Rollups, add_up, pieces
from service.usage.stores.rows import as_record, dollars, shown
from service.usage.stores.schema import COLUMNS, COST, MAX_SUM, ROLLUP_COST, ROW, SCHEMA, TOKENS, Row
from service.usage.values import micros


class StoreUnavailable(SwitchboardError):
    """The database cannot take or answer anything now; the ledger retries."""


class BadBatch(SwitchboardError):
    """The database refused a batch for what it holds (not for being unreachable)."""


class _Stored(Exception):
    """A batch held rows stored already: its transaction is undone, and it is stored knowing which."""


class Cursor(Protocol):
    """The part of a DB-API cursor used here."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, params: Sequence[Sequence[Any]], /) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...
    @property
    def rowcount(self) -> int: ...


_ROWS_PER_INSERT = 500
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

    def interrupt(self) -> None:
        """Cut the calls waiting on the database now, and fail those that come after (a stop that
        cannot wait: their records stay in the spool). A database of a local file never keeps a
        call waiting long: nothing to do."""

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
        a few statements of many rows each (`statements`: the lines' values bound a column at
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
                    for sql, values, columns in statements(batch, self.max_rows):
                        cur.execute(sql, values)
                        inserted += cur.rowcount
                        bound.append(columns)
                    if inserted != len(batch):
                        raise _Stored  # some were stored already: undone, and done again knowing which
                    hourly: Rollups = {}
                    if len(bound) > 1:  # the batch's columns, each whole
                        bound = [list(map(list, map(chain.from_iterable, zip(*bound, strict=True))))]
                    add_up(hourly, bound[0])
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
                    f"INSERT INTO usage_records ({COLUMNS}) VALUES "
                    + ", ".join([ROW] * len(chunk))
                    + " ON CONFLICT (ts_us, id, replica) DO NOTHING RETURNING id, ts_us, replica"
                )
                cur.execute(sql, values)
                inserted.extend(unique[(row[0], int(row[1]), row[2])] for row in cur.fetchall())
            self._add_rollups(cur, inserted)
        return len(inserted)

    @staticmethod
    def _add_rollups(cur: Cursor, rows: Sequence[Row]) -> None:
        """Add rows (`encoding.row`'s) to the rollups."""
        hourly: Rollups = {}
        if rows:
            add_up(hourly, list(zip(*rows, strict=True)))
        SQLStore._upsert_rollups(cur, hourly)

    @staticmethod
    def _upsert_rollups(cur: Cursor, hourly: Rollups) -> None:
        """Add the hourly sums (`add_up`'s), and the daily ones they make, to the rollups."""
        if not hourly:
            return
        daily: Rollups = {}
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
            cur.executemany(UPSERTS[table], rows)

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
            for table, since, until in pieces(query):
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
            f"SELECT {COLUMNS} FROM usage_records WHERE {' AND '.join(where) or '1 = 1'} "
            "ORDER BY ts_us DESC, id DESC LIMIT ?"
        )
        with self._reading() as cur:
            cur.execute(sql, (*params, query.limit + 1))
            return [as_record(row) for row in cur.fetchall()]

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
        hours = f"SELECT {ROLLUP_COST} FROM usage_hourly WHERE {column} = ? AND period >= ?"
        records = f"SELECT {COST} FROM usage_records WHERE {column} = ? AND ts_us >= ? AND ts_us < ?"
        with self._reading() as cur:
            if until is None:
                cur.execute(hours, (subject, first.strftime("%Y-%m-%dT%H")))
                total = dollars(*cur.fetchone())
                cur.execute(records, (subject, micros(since), micros(first)))
                return total + dollars(*cur.fetchone())
            last = max(hour_start(until), first)
            cur.execute(
                f"{hours} AND period < ?",
                (subject, first.strftime("%Y-%m-%dT%H"), last.strftime("%Y-%m-%dT%H")),
            )
            total = dollars(*cur.fetchone())
            for start, end in ((since, min(first, until)), (last, until)):
                if start < end:
                    cur.execute(records, (subject, micros(start), micros(end)))
                    total += dollars(*cur.fetchone())
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
        sums = f"sum(requests), sum(errors), sum(limited), {TOKENS}, {ROLLUP_COST}"
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
            f"{TOKENS}, {COST}"
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
                requests, errors, limited, prompt, cached, completion, reasoning, dollars(*row[width + 11 :])
            )
            yield tuple(shown(name, value) for name, value in zip(query.group_by, row, strict=False)), totals

    @staticmethod
    def _merge(groups: dict[GroupKey, Totals], found: Iterator[tuple[GroupKey, Totals]]) -> None:
        for key, totals in found:
            if totals.requests:
                groups.setdefault(key, Totals()).add(totals)
        if len(groups) > MAX_GROUPS:  # a year by hour and model: the answer would be gigabytes
            raise too_many_groups()


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

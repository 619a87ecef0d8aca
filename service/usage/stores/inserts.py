"""A batch of records as a few INSERT statements of many rows each, bound a column at a time.

Where the driver counts the rows a statement inserted (SQLite), `SQLStore.insert_values`
stores a batch in statements of `_SLICES` rows: the lines' values bound a column at a
time, no row made of each, and a name all the rows share bound once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from itertools import chain
from operator import getitem
from typing import Any

from service.usage.stores.schema import COLUMNS, VALUES_PER_ROW
from service.usage.values import pico_text

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


def statements(
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
            f"INSERT INTO usage_records ({COLUMNS}) VALUES {rows} ON CONFLICT (ts_us, id, replica) DO NOTHING"
        )
    return sql

"""The ledger's tables, on SQLite and on a real PostgreSQL: storing once, rollups, reads, retention."""

from __future__ import annotations

import json
import random
import sqlite3
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from service.errors import BadRequest
from service.usage.encoding import row, values_of
from service.usage.query import RequestsQuery, UsageQuery
from service.usage.stores import SQLStore, inserts, open_store, schema, sql
from service.usage.values import MAX_COST
from tests.usage.conftest import NOW, record


def _usage(store: SQLStore, **params: str) -> dict[tuple[str | None, ...], dict[str, object]]:
    query = UsageQuery.parse(params, NOW + timedelta(days=1))
    return {key: totals.to_json() for key, totals in store.grouped(query).items()}


def test_a_batch_stored_twice_is_stored_once_and_counted_once(store: SQLStore) -> None:
    batch = [record(), record(status=502, cost_usd=Decimal(0)), record(status=429, provider=None)]
    assert store.insert(batch) == 3
    assert store.insert(batch) == 0  # a crash between the commit and the spool's removal
    assert store.insert([*batch, record(id=batch[0].id)]) == 0

    (totals,) = _usage(store, since="2026-11-27").values()
    assert totals == {
        "requests": 3,
        "errors": 1,
        "limited": 1,
        "prompt_tokens": 300,
        "cached_tokens": 60,
        "completion_tokens": 150,
        "reasoning_tokens": 30,
        "cost_usd": "0.00165",
    }
    page = store.requests(RequestsQuery(limit=10))
    assert sorted(r.id for r in page) == sorted(r.id for r in batch)


def test_a_refuse_mode_503_counts_as_limited_not_as_an_error_from_rollups_and_records(
    store: SQLStore,
) -> None:
    hour = NOW.replace(minute=0, second=0, microsecond=0)
    refusal = {"status": 503, "limited": True, "provider": None, "cost_usd": Decimal(0)}
    store.insert(
        [
            record(ts=hour - timedelta(hours=2), **refusal),  # inside a whole hour: from its rollup
            record(ts=hour - timedelta(hours=2), status=502, cost_usd=Decimal(0)),
            record(ts=NOW, **refusal),  # the ragged end: from the records
            record(ts=NOW, status=503, cost_usd=Decimal(0)),  # a 503 no_candidate: an error
        ]
    )
    since = (hour - timedelta(hours=3, minutes=30)).isoformat()
    (totals,) = _usage(store, since=since).values()
    assert (totals["requests"], totals["errors"], totals["limited"]) == (4, 2, 2)


def test_grouping_adds_whole_hours_from_rollups_and_the_edges_from_records(store: SQLStore) -> None:
    start = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    records = [
        record(
            ts=start + timedelta(minutes=17 * i), client=f"c{i % 3}", model=f"m{i % 2}", cost_usd=Decimal(i)
        )
        for i in range(200)
    ]
    store.insert(records)
    since, until = start + timedelta(minutes=50), start + timedelta(hours=40, minutes=10)  # ragged ends
    got = _usage(store, since=since.isoformat(), until=until.isoformat(), group_by="client,day")

    expected: dict[tuple[str | None, ...], list[int]] = {}
    for r in records:
        if since <= r.ts < until:
            counted = expected.setdefault((r.client, r.ts.strftime("%Y-%m-%d")), [0, 0])
            counted[0] += 1
            counted[1] += int(r.cost_usd)
    assert {k: [v["requests"], int(str(v["cost_usd"]))] for k, v in got.items()} == expected


def test_hours_months_purposes_and_a_missing_provider_are_named_as_the_spec_says(store: SQLStore) -> None:
    store.insert([record(provider=None, status=429), record(purpose="embeddings")])
    got = _usage(store, since="2026-11-01", group_by="hour,month,provider,purpose")
    assert set(got) == {
        ("2026-11-27T05:00:00Z", "2026-11", None, "chat"),
        ("2026-11-27T05:00:00Z", "2026-11", "openai", "embeddings"),
    }


def test_money_is_exact_in_sums_far_past_what_64_bits_hold(store: SQLStore) -> None:
    tiny = [record(cost_usd=Decimal("0.00000015")) for _ in range(1000)]  # 1 token at $0.15 / M
    huge = [record(ts=NOW - timedelta(days=2), cost_usd=MAX_COST) for _ in range(20)]  # $20M > 2^63 pico
    store.insert([*tiny, *huge])
    (totals,) = _usage(store, since="2026-11-20").values()
    assert totals["cost_usd"] == "20000000.00015"
    assert store.spent("client", "ops-center", NOW - timedelta(days=30)) == Decimal("20000000.00015")


def _seed_rollups(store: SQLStore, day: str, prompt_tokens: int) -> None:
    """A route's rollups for the hour of NOW on `day` holding `prompt_tokens`, as a few million
    answers an upstream said used `MAX_TOKENS` would leave them."""
    values = "VALUES (?, 'ops-center', 'openai', 'gpt-4o', 'chat', 1, 0, 0, ?, 0, 0, 0, 0, 0, 0)"
    with store._transaction() as cur:
        cur.execute("INSERT INTO usage_hourly " + values, (f"{day}T05", prompt_tokens))
        cur.execute("INSERT INTO usage_daily " + values, (day, prompt_tokens))


def test_a_record_past_what_its_rollup_can_add_is_stored_and_the_rollup_held(store: SQLStore) -> None:
    """An upstream reporting absurd usage fills a route's rollups to 64 bits in a few million
    answers: PostgreSQL then refused every later record of that route and day (`bigint out of
    range`: set aside, lost), and SQLite made the sum a float. The sum is held at its largest."""
    _seed_rollups(store, "2026-11-27", schema.MAX_SUM - 10)
    assert store.insert([record(prompt_tokens=100), record(prompt_tokens=7)]) == 2
    (totals,) = _usage(store, since="2026-11-27").values()
    assert totals["prompt_tokens"] == schema.MAX_SUM and totals["requests"] == 3
    assert type(totals["prompt_tokens"]) is int


def test_token_sums_past_64_bits_are_exact_and_answer(store: SQLStore) -> None:
    """Rollups of several days each near 64 bits, and records past them: SQLite's `sum` failed
    ("integer overflow"), which the ledger took for the database being down (`/usage` 503), and
    a batch's sums past 64 bits were refused. The sums are exact (a rollup held) and answer."""
    for day in ("2026-11-24", "2026-11-25", "2026-11-26"):
        _seed_rollups(store, day, schema.MAX_SUM)
    big = [record(ts=NOW + timedelta(minutes=10), prompt_tokens=2**62) for _ in range(4)]
    assert store.insert(big) == 4
    (totals,) = _usage(store, since="2026-11-20").values()
    assert totals["prompt_tokens"] == 4 * schema.MAX_SUM  # the records' own day held too
    (edge,) = _usage(store, since="2026-11-27T05:40:00Z").values()  # from the records themselves
    assert edge["prompt_tokens"] == 4 * 2**62 and edge["requests"] == 4


def test_costs_past_64_bits_of_micro_dollars_are_summed_exactly(store: SQLStore) -> None:
    """Rollups whose cost is near 64 bits of micro-dollars (millions of answers held to
    `MAX_COST`): SQLite's `sum` of them failed ("integer overflow"), taken for the database being
    down (`/usage` 503, and no budget's spent). They are summed in parts, exactly."""
    values = "VALUES (?, 'ops-center', 'openai', 'gpt-4o', 'chat', 1, 0, 0, 0, 0, 0, 0, 0, ?, 999999)"
    with store._transaction() as cur:
        for day in ("2026-11-24", "2026-11-25", "2026-11-26"):
            cur.execute("INSERT INTO usage_hourly " + values, (f"{day}T05", schema.MAX_SUM))
            cur.execute("INSERT INTO usage_daily " + values, (day, schema.MAX_SUM))
    store.insert([record(cost_usd=MAX_COST) for _ in range(10)])
    each = Decimal(schema.MAX_SUM).scaleb(-6) + Decimal("0.000000999999")
    expected = 3 * each + 10 * MAX_COST
    (totals,) = _usage(store, since="2026-11-20").values()
    assert Decimal(str(totals["cost_usd"])) == expected
    (edge,) = _usage(store, since="2026-11-27T05:10:00Z").values()  # from the records themselves
    assert Decimal(str(edge["cost_usd"])) == 10 * MAX_COST
    assert store.spent("client", "ops-center", NOW - timedelta(days=30)) == expected
    assert store.spent("client", "ops-center", NOW - timedelta(minutes=1)) == 10 * MAX_COST


def _wide(seed: int) -> str:
    """256 characters of 4 bytes each, none repeated (nothing to compress)."""
    return "".join(chr(0x10000 + seed * 1000 + i) for i in range(256))


def test_a_record_of_long_wide_names_is_stored(store: SQLStore) -> None:
    """Names of 256 4-byte characters made a rollup key of 4 KB: PostgreSQL refused it
    (`index row size … exceeds btree version 4 maximum 2704`), which the ledger took for the
    database being down, retrying the batch for good. Names are cut at 512 bytes too."""
    sent = record(client=_wide(1), model=_wide(2), provider=_wide(3), purpose=_wide(4), id=_wide(5))
    assert store.insert([sent]) == 1
    (found,) = store.requests(RequestsQuery())
    assert found.model is not None and _wide(2).startswith(found.model) and len(found.model.encode()) == 512
    (totals,) = _usage(store, since="2026-11-27", group_by="client,model").values()
    assert totals["requests"] == 1


def test_a_key_past_what_postgresql_indexes_is_a_bad_batch(postgres_url: str, tmp_path: Path) -> None:
    """A row whose key no index holds (values not bounded by `encoding.fields`) is refused for its
    data (set aside by the ledger), not taken for the database being down (retried for good)."""
    store = open_store(postgres_url, tmp_path)
    assert store is not None
    store.open()
    try:
        values = values_of(record())
        values[3], values[4], values[5], values[6] = _wide(1), _wide(2), _wide(3), _wide(4)
        with pytest.raises(sql.BadBatch, match="ProgramLimitExceeded"):
            store.insert_values([values])
    finally:
        store.close()


def test_spent_counts_whole_hours_from_rollups_and_a_ragged_start_from_records(store: SQLStore) -> None:
    hour = NOW.replace(minute=0, second=0, microsecond=0)
    store.insert([record(ts=hour + timedelta(minutes=m), cost_usd=Decimal(1)) for m in (5, 20, 40)])
    store.insert([record(ts=hour + timedelta(hours=3), cost_usd=Decimal(10), provider="other")])
    assert store.spent("client", "ops-center", hour) == 13
    assert store.spent("client", "ops-center", hour + timedelta(minutes=10)) == 12
    assert store.spent("provider", "openai", hour) == 3
    assert store.spent("provider", "other", hour + timedelta(hours=4)) == 0
    assert store.spent("client", "nobody", hour) == 0


def test_pages_go_newest_first_and_end_with_a_null_cursor(store: SQLStore) -> None:
    from service.usage.query import requests_answer

    records = [record(ts=NOW - timedelta(seconds=i // 2)) for i in range(25)]  # ties in ts
    store.insert(records)
    seen: list[str] = []
    cursor = None
    while True:
        query = RequestsQuery(limit=7, cursor=cursor)
        answer = requests_answer(store.requests(query), query.limit)
        seen.extend(r["id"] for r in answer["requests"])
        if answer["next_cursor"] is None:
            break
        from service.usage.query import decode_cursor

        cursor = decode_cursor(answer["next_cursor"])
    assert sorted(seen) == sorted(r.id for r in records) and len(seen) == 25
    stamps = [(r.ts, r.id) for r in sorted(records, key=lambda r: (r.ts, r.id), reverse=True)]
    assert seen == [rid for _, rid in stamps]


def test_requests_filter_by_client_provider_status_and_time(store: SQLStore) -> None:
    store.insert(
        [
            record(id="a", client="x", status=200),
            record(id="b", client="y", status=503),
            record(id="c", client="x", status=502, ts=NOW - timedelta(hours=2)),
            record(id="d", client="x", provider=None, status=429),
        ]
    )

    def ids(**params: str) -> list[str]:
        return sorted(r.id for r in store.requests(RequestsQuery.parse(params, NOW + timedelta(seconds=1))))

    assert ids(client="x") == ["a", "c", "d"]
    assert ids(status="5xx") == ["b", "c"]
    assert ids(status="429") == ["d"]
    assert ids(provider="openai", since="1h") == ["a", "b"]
    assert ids(client="x", until=(NOW - timedelta(hours=1)).isoformat()) == ["c"]


def test_retention_deletes_old_records_and_keeps_their_rollups(store: SQLStore) -> None:
    store.insert([record(ts=NOW - timedelta(days=100)) for _ in range(3)])
    store.insert([record()])
    assert store.purge(NOW - timedelta(days=90)) == (3, True)
    assert [r.ts for r in store.requests(RequestsQuery(limit=10))] == [NOW]
    (totals,) = _usage(store, since="2026-08-01T00:00:00Z").values()
    assert totals["requests"] == 4  # the old hours still count, from the rollups


def test_values_a_caller_chose_are_bound_never_run_as_sql(store: SQLStore) -> None:
    store.insert([record(client="robert'); DROP TABLE usage_records;--", model="' OR 1=1 --")])
    hostile = "x' OR '1'='1"
    assert _usage(store, since="2026-11-01", client=hostile) == {}
    assert _usage(store, since="2026-11-01", model=hostile) == {}
    assert store.requests(RequestsQuery(client=hostile)) == []
    assert store.spent("client", hostile, NOW - timedelta(days=1)) == 0
    (row,) = store.requests(RequestsQuery())
    assert row.client == "robert'); DROP TABLE usage_records;--"


def test_a_grouping_too_large_to_answer_is_refused_not_built(
    store: SQLStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A year by hour and model would be gigabytes of JSON: refused once past MAX_GROUPS rows."""
    store.insert([record(model=f"m{i}", ts=NOW - timedelta(hours=i)) for i in range(30)])
    monkeypatch.setattr(sql, "MAX_GROUPS", 10)
    with pytest.raises(BadRequest, match="more than"):
        store.grouped(UsageQuery.parse({"since": "2026-11-20", "group_by": "hour,model"}, NOW))
    monkeypatch.setattr(sql, "MAX_GROUPS", 30)
    assert (
        len(
            store.grouped(
                UsageQuery.parse(
                    {"since": "2026-11-20", "group_by": "hour,model"}, NOW + timedelta(seconds=1)
                )
            )
        )
        == 30
    )


def test_two_requests_an_upstream_gave_one_request_id_are_two_records(store: SQLStore) -> None:
    """The record's id is the answer's x-request-id, the upstream's own when it sends one: a
    server answering `x-request-id: 1` to everything must not make the ledger keep one request."""
    first, second = record(id="1"), record(id="1", ts=NOW + timedelta(milliseconds=3))
    assert store.insert([first, second]) == 2
    assert store.insert([first, second]) == 0  # each stored again: still once each
    assert len(store.requests(RequestsQuery())) == 2


def test_rollups_are_the_sums_of_the_records_whether_a_batch_is_new_or_partly_stored(store: SQLStore) -> None:
    """A batch all new is added to the rollups as it was inserted (one prepared statement); one
    partly stored already (a crash between a commit and its segment's removal) adds only the
    rows really inserted. Either way each hour's and day's rollup is the sum of its records."""
    rng = random.Random(22)
    records = [
        record(
            id=f"r-{i}",
            ts=NOW - timedelta(seconds=rng.randrange(0, 3 * 86_400), microseconds=rng.randrange(10**6)),
            client=rng.choice(["a", "b", None]),
            provider=rng.choice(["p", "q", None]),
            model=rng.choice(["m", "n", None]),
            purpose=rng.choice(["chat", "embeddings"]),
            status=rng.choice([200, 200, 200, 429, 499, 502, 503]),
            limited=rng.random() < 0.1,
            prompt_tokens=rng.randrange(10**6),
            cached_tokens=rng.randrange(10**5),
            cache_write_tokens=rng.randrange(10**4),
            completion_tokens=rng.randrange(10**6),
            reasoning_tokens=rng.randrange(10**5),
            cost_usd=Decimal(rng.randrange(10**15)).scaleb(-12),
        )
        for i in range(600)
    ]
    assert store.insert(records[:400]) == 400
    assert store.insert(records[200:]) == 200
    assert store.insert(records) == 0
    columns = (
        "period, client, provider, model, purpose, requests, errors, limited, prompt_tokens, cached_tokens, "
        "cache_write_tokens, completion_tokens, reasoning_tokens, cost_micro, cost_rest"
    )
    for table, width in (
        (f"SELECT {columns} FROM usage_hourly", 13),  # noqa: S608 - fixed names
        (f"SELECT {columns} FROM usage_daily", 10),  # noqa: S608
    ):
        expected: dict[tuple[str, ...], list[int]] = {}
        for r in records:
            key = (r.ts.isoformat()[:width], r.client or "", r.provider or "", r.model or "", r.purpose)
            sums = expected.setdefault(key, [0] * 10)
            limited = r.limited or r.status == 429
            pico = int(r.cost_usd * 10**12)
            for i, value in enumerate(
                (
                    1,
                    int(not limited and r.status >= 500),
                    int(limited),
                    r.prompt_tokens,
                    r.cached_tokens,
                    r.cache_write_tokens,
                    r.completion_tokens,
                    r.reasoning_tokens,
                    pico // 10**6,
                    pico % 10**6,
                )
            ):
                sums[i] += value
        with store._reading() as cur:
            cur.execute(table)
            found = {tuple(row[:5]): [int(v) for v in row[5:]] for row in cur.fetchall()}
        assert found == expected, table


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ledger:pa%zzSECRETPW@127.0.0.1:1/usage",  # a `%` not percent-encoded
        "postgresql://ledger:SECRET PW@127.0.0.1:1/usage",  # a space
        "postgresql://ledger:SECRETPW@[::1/usage",  # a host libpq cannot read: the URL quoted whole
        "postgresql://ledger@127.0.0.1:1/usage?password=SECRET%20PW&bogus=1",
    ],
)
def test_a_malformed_postgresql_url_never_puts_its_password_in_a_log(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq's errors quote what they cannot read of a URL, its password included, and
    psycopg's pool logs them at each try: a password is masked in what reaches the logs."""
    from service.usage.stores import postgres

    monkeypatch.setattr(postgres, "_WAIT_S", 1.0)
    store = open_store(url, tmp_path)
    assert store is not None
    with caplog.at_level("DEBUG"), pytest.raises(sql.StoreUnavailable) as raised:
        store.open()
    store.close()
    assert "error connecting" in caplog.text  # what libpq said is logged...
    for secret in ("SECRET", "zzS"):
        assert secret not in caplog.text and secret not in str(raised.value)  # ... but not the password


_ONE_ROW = (
    f"INSERT INTO usage_records ({schema.COLUMNS}) VALUES ({', '.join('?' * 22)}) "  # noqa: S608 - fixed names
    "ON CONFLICT (ts_us, id, replica) DO NOTHING"
)


def _dump(store: SQLStore) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the ledger's tables, each value with its SQLite type."""
    found = {}
    with store._reading() as cur:
        for table in ("usage_records", "usage_hourly", "usage_daily"):
            cur.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed names
            rows = cur.fetchall()
            found[table] = sorted(tuple((type(v).__name__, v) for v in row) for row in rows)
    return found


@pytest.mark.parametrize("size", [1, 3, 4, 5, 17, 64, 85, 149, 600])
def test_a_batch_in_statements_of_many_rows_is_stored_as_one_row_at_a_time_stores_it(
    tmp_path: Path, size: int
) -> None:
    """SQLite stores a batch in a few statements of many rows (64, 16, 4 and 1): the same rows,
    each value of the same type, and the same rollups, as a statement a row stores."""
    rng = random.Random(size)
    records = [
        record(
            id=f"s-{i}",
            ts=NOW - timedelta(seconds=rng.randrange(0, 86_400), microseconds=rng.randrange(10**6)),
            client=rng.choice(["a", "b", None]),
            status=rng.choice([200, 429, 502]),
            stream=rng.random() < 0.5,
            ttfb_ms=rng.choice([None, 12.5, 0.1 + rng.random()]),
            latency_ms=rng.random() * 1000,
            cost_usd=Decimal(rng.randrange(10**15)).scaleb(-12),
        )
        for i in range(size)
    ]
    batch = [values_of(r) for r in records]
    rows = [row(values) for values in batch]
    sliced, single = (
        open_store(str(tmp_path / "sliced.db"), tmp_path),
        open_store(str(tmp_path / "one.db"), tmp_path),
    )
    assert sliced is not None and single is not None
    try:
        sliced.open()
        single.open()
        assert sliced.insert_values(batch) == size
        with single._transaction() as cur:
            for one in rows:
                cur.execute(_ONE_ROW, one)
            single._add_rollups(cur, rows)
        assert _dump(sliced) == _dump(single)
        assert sliced.insert_values(batch) == 0  # all stored already: nothing added twice
        assert _dump(sliced) == _dump(single)
    finally:
        sliced.close()
        single.close()


def test_a_batch_holding_a_record_twice_stores_it_once_and_counts_it_once(store: SQLStore) -> None:
    first, other = record(), record()
    assert store.insert([first, other, first]) == 2
    assert len(store.requests(RequestsQuery())) == 2
    (totals,) = _usage(store, since="2026-11-27").values()
    assert totals["requests"] == 2


def test_a_sqlite_that_binds_at_most_999_values_a_statement_stores_a_batch_once(tmp_path: Path) -> None:
    """SQLite before 3.32 binds at most 999 values in one statement (`SQLITE_MAX_VARIABLE_NUMBER`,
    a build may set another): a batch still goes in, in statements that fit, and a batch stored
    again (the RETURNING path) too, rather than the database being taken for down for good."""
    store = open_store(str(tmp_path / "old.db"), tmp_path)
    assert store is not None
    try:
        store.open()
        assert isinstance(store._writer, sqlite3.Connection)
        store._writer.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        batch = [record(ts=NOW + timedelta(seconds=i)) for i in range(100)]
        assert store.insert(batch) == 100
        assert store.insert([*batch, record(ts=NOW)]) == 1  # some stored already: RETURNING tells which
        (totals,) = _usage(store, since="2026-11-27").values()
        assert totals["requests"] == 101
    finally:
        store.close()


@pytest.mark.parametrize(
    ("size", "names"), [(1, 1), (5, 1), (16, 1), (16, 3), (64, 1), (64, 2), (85, 1), (85, 3)]
)
def test_a_statement_binds_each_line_s_values_as_its_row_holds_them(size: int, names: int) -> None:
    """`insert_values` binds the lines' values a column at a time (a name every row of a statement
    holds bound once): each row as `encoding.row` makes it, each value of the same type (booleans
    0 or 1, a cost whole pico-dollars), also where a line written by hand holds a number or a
    text for a boolean, or a number for a name; the lines themselves are left as they were."""
    rng = random.Random(size * names)
    batch = [
        values_of(
            record(
                client=rng.choice(["a", None, "c"][:names]),
                model=rng.choice(["m", "n", "o"][:names]),
                provider="p" if names == 1 else rng.choice(["p", None]),
                stream=rng.random() < 0.5,
                ttfb_ms=rng.choice([None, 12.5]),
                cost_usd=Decimal(rng.randrange(10**15)).scaleb(-12),
            )
        )
        for _ in range(size)
    ]
    if size > 1 and names > 1:
        batch[1][9], batch[1][19], batch[1][20], batch[1][22] = 1, 0.0, "1", 300  # by hand
        batch[-1][18] = "7.5E-7"  # as lines before issue 22 wrote a cost
        batch[0][3], batch[-1][3] = 5, 5.0  # a number where a name goes
    kept = [list(values) for values in batch]
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE TABLE usage_records ({schema.COLUMNS}, UNIQUE (ts_us, id, replica))")  # as bound
    for statement, values, _ in inserts.statements(batch, 500):
        db.execute(statement, values)
    found = db.execute("SELECT * FROM usage_records ORDER BY rowid").fetchall()
    assert [[(type(v), v) for v in r] for r in found] == [
        [(type(v), v) for v in row(values)] for values in batch
    ]
    assert batch == kept


def test_a_line_whose_boolean_is_not_a_number_is_refused_as_its_row_would_be() -> None:
    values = values_of(record())
    values[19] = None
    with pytest.raises(TypeError):
        row(values)
    with pytest.raises(TypeError):
        list(inserts.statements([values], 500))


@pytest.mark.parametrize("hours", [1, 3])
def test_a_batch_of_one_group_adds_up_as_row_by_row(store: SQLStore, hours: int) -> None:
    """A batch of one client, provider, model and purpose (within an hour: the common case, summed
    a column at a time) adds to the rollups what its records sum to, errors and limits apart."""
    rng = random.Random(hours)
    records = [
        record(
            ts=NOW + timedelta(minutes=rng.randrange(60 * hours)),
            status=rng.choice([200, 200, 429, 500, 503]),
            limited=rng.random() < 0.2,
            prompt_tokens=rng.randrange(10**6),
            cost_usd=Decimal(rng.randrange(10**15)).scaleb(-12),
        )
        for _ in range(150)
    ]
    assert store.insert(records) == 150
    with store._reading() as cur:
        cur.execute(
            "SELECT sum(requests), sum(errors), sum(limited), sum(prompt_tokens), "
            "sum(cost_micro), sum(cost_rest) FROM usage_hourly"
        )
        found = [int(v) for v in cur.fetchone()]
    picos = [int(r.cost_usd * 10**12) for r in records]
    limited = [r.limited or r.status == 429 for r in records]
    assert found == [
        150,
        sum(1 for r, lim in zip(records, limited, strict=True) if r.status >= 500 and not lim),
        sum(limited),
        sum(r.prompt_tokens for r in records),
        sum(p // 10**6 for p in picos),
        sum(p % 10**6 for p in picos),
    ]


@pytest.mark.parametrize(
    ("column", "stored"),
    [
        ("latency_ms", "abc"),
        ("latency_ms", 1e308 * 10),  # inf: no JSON number
        ("ttfb_ms", "-"),
        ("status", "200x"),
        ("ts_us", 10**18),  # 31,000 years: no datetime
        ("cost_pico", "x"),
        ("client", b"\xff\xfe"),
        ("model", 12345),
        ("prompt_tokens", "many"),
    ],
)
def test_a_row_an_older_version_stored_otherwise_is_read_bounded_not_a_failure(
    tmp_path: Path, column: str, stored: object
) -> None:
    """SQLite keeps whatever it was given: a row stored by an older version with a value of
    another kind in a column (a latency `"abc"`) made every read of its page fail, a 500 from
    `/usage/requests`. It is read as a request's values are bounded, its other values as stored."""
    store = open_store(str(tmp_path / "old.db"), tmp_path)
    assert store is not None
    try:
        store.open()
        kept = record(model="kept-model")
        assert store.insert([kept, record()]) == 2
        assert isinstance(store._writer, sqlite3.Connection)
        update = f"UPDATE usage_records SET {column} = ? WHERE id = ?"  # noqa: S608 - a column of the test's own
        store._writer.execute(update, (stored, kept.id))
        store._writer.commit()
        found = {r.id: r for r in store.requests(RequestsQuery())}
        assert len(found) == 2
        read = found[kept.id]
        json.dumps(read.to_json(), allow_nan=False)  # an answer's JSON, whatever was stored
        assert read.latency_ms >= 0 and read.cost_usd >= 0
        if column != "model":
            assert read.model == "kept-model"
    finally:
        store.close()

"""The ledger's tables, in the SQL SQLite and PostgreSQL share, and the sums read from them.

`usage_records` holds one row a record (kept `retention_days`), keyed by its time, `id` and
replica (an upstream's own `x-request-id` need not be unique), and kept in that order in
SQLite (a range of time is read in one sweep). The rollups, `usage_hourly` and `usage_daily`
(client, provider, model and purpose a UTC hour, and a UTC day, kept for good), are added to
in the same transaction as the records (`rollups`). Money is stored as whole pico-dollars
(10⁻¹² USD): exact for every price with up to six decimals per million tokens. A rollup keeps
its cost in two parts (whole micro-dollars, and the rest), each held at 64 bits; sums are read
in parts small a row (whole dollars, micro-dollars, the rest; tokens by the million and the
rest) so that no 64-bit integer overflows, however large the total, and come back exact.
"""

from __future__ import annotations

from typing import Any

Row = tuple[Any, ...]
"""A record as `usage_records` holds it (`encoding.row`)."""


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

COLUMNS = (
    "id, ts_us, client, purpose, model, provider, upstream_model, status, stream, attempts, latency_ms, "
    "ttfb_ms, prompt_tokens, cached_tokens, cache_write_tokens, completion_tokens, reasoning_tokens, "
    "cost_pico, priced, estimated, replica, limited"
)
VALUES_PER_ROW = 22
ROW = "(" + ", ".join("?" * VALUES_PER_ROW) + ")"
ROLLUP_SUMS = (
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
COST = "sum(cost_pico / 1000000000000), sum(cost_pico / 1000000 % 1000000), sum(cost_pico % 1000000)"
"""A cost sum in three parts (`rows.dollars`'s: whole dollars, micro-dollars, pico-dollars), each
small a row, so that no sum passes 64 bits (SQLite's `sum` fails past it, "integer overflow")."""
TOKENS = ", ".join(
    f"sum({c} / 1000000), sum({c} % 1000000)"
    for c in ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")
)
"""The token sums of `/usage`, each in parts as costs are (millions, and the rest): SQLite's
`sum` fails past 64 bits ("integer overflow"), which a month of rollups held at `MAX_SUM` reaches."""
ROLLUP_COST = "sum(cost_micro / 1000000), sum(cost_micro % 1000000), sum(cost_rest)"

"""Benchmark of the usage ledger (issue 20): `/usage` over millions of records, and `submit`.

    python -m bench.usage                          # 1M and 10M records, SQLite (cached in bench/.cache/)
    python -m bench.usage --records 1000000        # one size
    python -m bench.usage --postgres URL           # the same in PostgreSQL (an empty database)

For each size N it fills a ledger (through the store's own insert, rollups included) with N
records spread evenly over the 30 days of November 2026, from 50 clients each using two
(provider, model, purpose) routes, as a real fleet's traffic is shaped, and measures:

- `/usage` for the month grouped by `client,day`, as `Ledger.usage` answers it (thread hop and
  JSON shape included; the HTTP layer adds its own few hundred microseconds): p50 and max over
  20 runs, with the month's bounds on whole hours (rollups only) and ragged by 30 minutes at
  each end (the two edge hours read from the raw records);
- once: what `submit` costs on the request path (encode, one `write` to the spool, a wake-up),
  p50 and p99 over 100,000 calls.

Results print as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from bench.load import percentile
from service.usage.ledger import Ledger
from service.usage.query import UsageQuery
from service.usage.record import Record
from service.usage.stores import SQLStore, open_store

CACHE = Path(__file__).resolve().parent / ".cache"
MONTH = datetime(2026, 11, 1, tzinfo=UTC)
DAYS = 30
CLIENTS = 50
PROVIDERS = ("openai", "anthropic", "openrouter", "groq", "local-vllm", "together", "mistral", "deepseek")
MODELS = tuple(f"model-{i}" for i in range(20))


def _routes() -> list[tuple[str, str, str, str]]:
    rng = random.Random(20)
    routes = []
    for c in range(CLIENTS):
        for _ in range(2):
            purpose = "chat" if rng.random() < 0.8 else "embeddings"
            routes.append((f"client-{c:02d}", rng.choice(PROVIDERS), rng.choice(MODELS), purpose))
    return routes


def _record(i: int, ts: datetime, route: tuple[str, str, str, str], rng: random.Random) -> Record:
    client, provider, model, purpose = route
    prompt, completion = rng.randrange(50, 4000), rng.randrange(0, 800)
    return Record(
        id=f"bench-{i:010d}",
        ts=ts,
        client=client,
        purpose=purpose,
        model=model,
        provider=provider,
        upstream_model=model,
        status=200 if rng.random() < 0.97 else 502,
        stream=rng.random() < 0.5,
        attempts=1,
        latency_ms=rng.uniform(100, 3000),
        ttfb_ms=None,
        prompt_tokens=prompt,
        cached_tokens=prompt // 4,
        cache_write_tokens=0,
        completion_tokens=completion,
        reasoning_tokens=0,
        cost_usd=Decimal(prompt * 150 + completion * 600).scaleb(-9),
        priced=True,
        estimated=False,
        replica="bench",
    )


def fill(store: SQLStore, records: int) -> float:
    """Insert `records` records over the month; seconds it took."""
    store.open()
    rng = random.Random(records)
    routes = _routes()
    step = timedelta(days=DAYS) / records
    started = time.perf_counter()
    batch: list[Record] = []
    for i in range(records):
        batch.append(_record(i, MONTH + step * i, rng.choice(routes), rng))
        if len(batch) == 5000:
            store.insert(batch)
            batch = []
    if batch:
        store.insert(batch)
    return time.perf_counter() - started


async def query_times(ledger: Ledger, ragged: bool, runs: int = 20) -> list[float]:
    edge = timedelta(minutes=30) if ragged else timedelta(0)
    params = {
        "since": (MONTH + edge).isoformat(),
        "until": (MONTH + timedelta(days=DAYS) - edge).isoformat(),
        "group_by": "client,day",
    }
    query = UsageQuery.parse(params, MONTH + timedelta(days=DAYS))
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        answer = await ledger.usage(query)
        times.append((time.perf_counter() - started) * 1000)
    assert len(answer["rows"]) == CLIENTS * DAYS, len(answer["rows"])
    return times


async def submit_cost(calls: int = 100_000) -> tuple[float, float]:
    folder = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    ledger = Ledger(open_store("usage.db", folder), folder / "spool")
    await ledger.start()
    rng = random.Random(1)
    routes = _routes()
    records = [_record(i, datetime.now(UTC), rng.choice(routes), rng) for i in range(calls)]
    times = []
    for i, record in enumerate(records):
        started = time.perf_counter_ns()
        ledger.submit(record)
        times.append((time.perf_counter_ns() - started) / 1000)
        if i % 64 == 0:
            await asyncio.sleep(0)  # the loop breathes, as between requests
    await ledger.stop()
    return statistics.median(times), percentile(times, 99)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--postgres", metavar="URL", help="an empty PostgreSQL database instead of SQLite")
    ns = parser.parse_args()
    print("| ledger | records | fill (s) | month by client,day: p50 / max (ms) | ragged: p50 / max (ms) |")
    print("|---|---:|---:|---:|---:|")
    for count in ns.records:
        if ns.postgres:
            url, kind = ns.postgres, "PostgreSQL"
        else:
            CACHE.mkdir(exist_ok=True)
            url, kind = str(CACHE / f"usage-{count}.db"), "SQLite"
        store = open_store(url, CACHE)
        assert store is not None
        cached = not ns.postgres and Path(url).exists()
        took = 0.0 if cached else fill(store, count)
        ledger = Ledger(store, Path(tempfile.mkdtemp(prefix="bench-spool-")))
        await ledger.start()
        whole = await query_times(ledger, ragged=False)
        ragged = await query_times(ledger, ragged=True)
        await ledger.stop()
        fill_text = "cached" if cached else f"{took:.0f}"
        print(
            f"| {kind} | {count:,} | {fill_text} | {statistics.median(whole):.1f} / {max(whole):.1f} "
            f"| {statistics.median(ragged):.1f} / {max(ragged):.1f} |",
            flush=True,
        )
    p50, p99 = await submit_cost()
    print(f"\n`submit` on the request path: p50 {p50:.1f} µs, p99 {p99:.1f} µs (100,000 calls)")


if __name__ == "__main__":
    asyncio.run(main())

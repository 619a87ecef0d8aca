"""Benchmark of limits and budgets (issue 20): what a limit check costs, and what metering
costs the gateway's throughput.

    python -m bench.limits                     # both parts
    python -m bench.limits --runs 3 --seconds 3

1. **A limit check**, in this process: `Limiter.admit` then `Limiter.settle` for a client with
   every limit (rpm, tpm, max_parallel, a budget) and a provider budget, one request at a time,
   on this process's counters and on Debian's `redis-server` (a fresh one on a free loopback
   port, one script call for the admission, one for the settlement). p50 and p99 in µs.
2. **Throughput at concurrency 64**: one `switchboard serve` (its own process) in front of one
   fake upstream (its own process), a priced `api_key` provider with a budget, two clients:
   one with every limit (all far from reached) and one with none; the loads alternate between
   them in each round, so both see the same machine. Once on this process's counters, once
   with Redis. The ledger is whatever the service wires (none in this branch).

The load generator shares the machine's cores with the service and the upstream: read the
ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from bench.config import CACHE, Service
from bench.load import LoadResult, percentile, run_load
from bench.upstream import UpstreamProcess
from service.config.metering import Budget, Limits
from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops
from service.crypto.tokens import token_sha256
from service.usage.limits.keeper import Keeper
from service.usage.limits.limiter import Limiter
from service.usage.limits.remote import Remote
from tests.support.replicas import RedisServer

UPSTREAM_KEY = "sk-upstream-bench-0123456789"
LIMITED = "sb_bench_limited_0123456789abcdef"
FREE = "sb_bench_free_0123456789abcdef0123"
LIMITS = Limits.model_validate(
    {"rpm": 10**9, "tpm": 10**12, "max_parallel": 10**6, "budget": {"usd": "1000000000", "period": "month"}}
)
PROVIDER_BUDGET = Budget(usd=Decimal(10**9), period="month")


# -- 1. a limit check ------------------------------------------------------------------------------


async def checks(limiter: Limiter, count: int) -> tuple[list[float], list[float]]:
    """Seconds of `count` admissions, and of admission plus settlement."""
    admitted, whole = [], []
    for n in range(count):
        started = time.perf_counter()
        ticket, _ = await limiter.admit(
            f"r{n}", "c", LIMITS, Decimal("0.001"), ("p", PROVIDER_BUDGET, Decimal("0.001"))
        )
        middle = time.perf_counter()
        await limiter.settle(ticket, Decimal("0.0005"), 100)
        admitted.append(middle - started)
        whole.append(time.perf_counter() - started)
    return admitted, whole


def _us(values: list[float], q: float) -> str:
    return f"{percentile(sorted(values), q) * 1e6:,.1f} µs"


async def check_costs(count: int) -> list[str]:
    rows = [
        "| counters | admit p50 | admit p99 | admit + settle p50 | admit + settle p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    local = Limiter()
    await checks(local, 500)  # warm
    admitted, whole = await checks(local, count)
    rows.append(
        f"| this process | {_us(admitted, 50)} | {_us(admitted, 99)} | {_us(whole, 50)} | {_us(whole, 99)} |"
    )
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        try:
            remote = Limiter(remote=Remote(server.url))
            await Keeper(remote).load()
            assert remote.up, "Redis did not answer"
            await checks(remote, 500)
            admitted, whole = await checks(remote, count)
            cells = f"{_us(admitted, 50)} | {_us(admitted, 99)} | {_us(whole, 50)} | {_us(whole, 99)}"
            rows.append(f"| Redis (loopback) | {cells} |")
            assert remote.remote is not None
            await remote.remote.aclose()
        finally:
            server.stop()
    return rows


# -- 2. throughput -----------------------------------------------------------------------------------


def build_project(upstream_base_url: str) -> tuple[Path, Path]:
    root = CACHE / "limits"
    key_file = CACHE / "age" / "keys.txt"
    if not key_file.exists():
        write_identity(key_file)
    folder = root / "providers.d"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    recipient = next(x.split(": ")[1] for x in key_file.read_text().splitlines() if "public key" in x)
    add_recipient(root / ".sops.yaml", recipient)
    path = folder / "upstream.yaml"
    path.write_text(
        f"kind: api_key\nid: upstream\nprovider: openai\nbase_url: {upstream_base_url}\n"
        f"api_key: {UPSTREAM_KEY}\npurposes: [chat]\n"
        "pricing: {'*': {input: 0.15, output: 0.6}}\nbudget: {usd: 1000000000, period: month}\n"
    )
    Sops(age_key_file=key_file, project_root=root).encrypt_in_place(path)
    (folder / "routing.yaml").write_text("kind: routing\npurposes:\n  chat:\n    primary: upstream\n")
    (folder / "clients.yaml").write_text(
        "kind: clients\nclients:\n"
        f"  - name: limited\n    token_sha256: {token_sha256(LIMITED)}\n    scopes: [completions]\n"
        "    limits: {rpm: 1000000000, tpm: 1000000000000, max_parallel: 1000000,"
        " budget: {usd: '1000000000', period: month}}\n"
        f"  - name: free\n    token_sha256: {token_sha256(FREE)}\n    scopes: [completions]\n"
    )
    return root, key_file


async def throughput(
    upstream: UpstreamProcess, runs: int, seconds: float, redis_url: str | None
) -> dict[str, list[LoadResult]]:
    root, key_file = build_project(upstream.base_url)
    previous = os.environ.get("SWITCHBOARD_REDIS_URL")
    if redis_url:
        os.environ["SWITCHBOARD_REDIS_URL"] = redis_url
    service = Service(root, key_file)
    results: dict[str, list[LoadResult]] = {"limited": [], "free": []}
    try:
        await service.start()
        for run in range(runs):
            order = (
                (("limited", LIMITED), ("free", FREE)) if run % 2 else (("free", FREE), ("limited", LIMITED))
            )
            for name, token in order:
                result = await run_load(
                    f"{service.url}/v1/chat/completions", token=token, concurrency=64,
                    requests=None, duration_s=seconds, warmup=20,
                )  # fmt: skip
                if result.errors:
                    print(f"  {name}: {result.errors} errors {result.statuses}", file=sys.stderr)
                results[name].append(result)
                print(
                    f"round {run + 1} {'redis' if redis_url else 'local'} {name:<7} {result.summary()}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        service.stop()
        if previous is None:
            os.environ.pop("SWITCHBOARD_REDIS_URL", None)
        else:
            os.environ["SWITCHBOARD_REDIS_URL"] = previous
    return results


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checks", type=int, default=5000, help="limit checks measured on each counter")
    parser.add_argument("--runs", type=int, default=5, help="rounds of the throughput part; medians")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each load")
    args = parser.parse_args(argv)
    rows = await check_costs(args.checks)
    upstream = await UpstreamProcess(name="bench", api_key=UPSTREAM_KEY).start()
    table = [
        "",
        "| counters | c=64 req/s, no limits | c=64 req/s, every limit | ratio | p99 no limits | p99 limits |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    try:
        with tempfile.TemporaryDirectory() as folder:
            server = RedisServer(Path(folder))
            try:
                for label, url in (("this process", None), ("Redis", server.url)):
                    found = await throughput(upstream, args.runs, args.seconds, url)
                    free = statistics.median(r.rps for r in found["free"])
                    limited = statistics.median(r.rps for r in found["limited"])
                    p99 = {k: statistics.median(r.p99_ms for r in v) for k, v in found.items()}
                    table.append(
                        f"| {label} | {free:,.0f} | {limited:,.0f} | {limited / free:.0%} "
                        f"| {p99['free']:.1f} ms | {p99['limited']:.1f} ms |"
                    )
            finally:
                server.stop()
    finally:
        await upstream.stop()
    print("\n".join(rows + table))


if __name__ == "__main__":
    asyncio.run(main())

"""Benchmark of metering as a whole (issue 20): the gateway's throughput with limits and the
ledger on, against off, in one run.

    python -m bench.metering                     # 5 rounds of 4 s at concurrency 64; medians
    python -m bench.metering --runs 3 --seconds 3

Two `switchboard serve` processes run side by side in front of one fake upstream (its own
process), each serving a priced `api_key` provider:

- **on**: the provider has a budget, the client every limit (`rpm`, `tpm`, `max_parallel`, a
  monthly budget, all far from reached), and the ledger is SQLite (`var/usage.db`, its spool
  beside it): each request is admitted, reserved, priced, settled and recorded;
- **off**: no budget, no limits, `SWITCHBOARD_USAGE_DB=off`: each request is still priced and
  gets its `x-request-id`, nothing else.

The loads alternate between them in each round (the first one swapped every round), so both
see the same machine; the ratio is of the medians. The load generator shares the machine's
cores with both services and the upstream: read the ratio, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

from bench.config import CACHE, Service
from bench.load import LoadResult, run_load
from bench.upstream import UpstreamProcess
from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops
from service.crypto.tokens import token_sha256

UPSTREAM_KEY = "sk-upstream-bench-0123456789"
TOKEN = "sb_bench_metering_0123456789abcdef"  # noqa: S105 - a bench client, not a secret


def build_project(name: str, upstream_base_url: str, *, on: bool) -> tuple[Path, Path]:
    """A project under bench/.cache/: the provider and the client, limited and budgeted when `on`."""
    root = CACHE / name
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
    budget = "budget: {usd: 1000000000, period: month}\n" if on else ""
    path.write_text(
        f"kind: api_key\nid: upstream\nprovider: openai\nbase_url: {upstream_base_url}\n"
        f"api_key: {UPSTREAM_KEY}\npurposes: [chat]\npricing: {{'*': {{input: 0.15, output: 0.6}}}}\n{budget}"
    )
    Sops(age_key_file=key_file, project_root=root).encrypt_in_place(path)
    (folder / "routing.yaml").write_text("kind: routing\npurposes:\n  chat:\n    primary: upstream\n")
    limits = (
        "    limits: {rpm: 1000000000, tpm: 1000000000000, max_parallel: 1000000,"
        " budget: {usd: '1000000000', period: month}}\n"
        if on
        else ""
    )
    (folder / "clients.yaml").write_text(
        "kind: clients\nclients:\n"
        f"  - name: bench\n    token_sha256: {token_sha256(TOKEN)}\n    scopes: [completions]\n{limits}"
    )
    for stale in ("var/usage.db", "var/usage.db-wal", "var/usage.db-shm"):
        (root / stale).unlink(missing_ok=True)
    return root, key_file


async def rounds(upstream: UpstreamProcess, runs: int, seconds: float) -> dict[str, list[LoadResult]]:
    services = {}
    for label, on in (("on", True), ("off", False)):
        root, key_file = build_project(f"metering-{label}", upstream.base_url, on=on)
        env = {"SWITCHBOARD_USAGE_DB": str(root / "var" / "usage.db") if on else "off"}
        services[label] = Service(root, key_file, env=env)
    results: dict[str, list[LoadResult]] = {"on": [], "off": []}
    try:
        for service in services.values():
            await service.start()
        for run in range(runs):
            order = ("on", "off") if run % 2 else ("off", "on")
            for label in order:
                result = await run_load(
                    f"{services[label].url}/v1/chat/completions", token=TOKEN, concurrency=64,
                    requests=None, duration_s=seconds, warmup=20,
                )  # fmt: skip
                if result.errors:
                    print(f"  {label}: {result.errors} errors {result.statuses}", file=sys.stderr)
                results[label].append(result)
                print(f"round {run + 1} {label:<3} {result.summary()}", file=sys.stderr, flush=True)
    finally:
        for service in services.values():
            service.stop()
    return results


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds; medians")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each load")
    args = parser.parse_args(argv)
    upstream = await UpstreamProcess(name="bench", api_key=UPSTREAM_KEY).start()
    try:
        found = await rounds(upstream, args.runs, args.seconds)
    finally:
        await upstream.stop()
    off = statistics.median(r.rps for r in found["off"])
    on = statistics.median(r.rps for r in found["on"])
    p50 = {k: statistics.median(r.p50_ms for r in v) for k, v in found.items()}
    p99 = {k: statistics.median(r.p99_ms for r in v) for k, v in found.items()}
    print(
        "\n".join(
            [
                "| c=64 req/s, off | on (limits + ledger) | ratio | p50 off / on | p99 off / on |",
                "|---:|---:|---:|---:|---:|",
                f"| {off:,.0f} | {on:,.0f} | {on / off:.0%} | {p50['off']:.1f} / {p50['on']:.1f} ms "
                f"| {p99['off']:.1f} / {p99['on']:.1f} ms |",
            ]
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

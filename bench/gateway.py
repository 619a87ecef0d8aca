"""Benchmark of the gateway (issue 4): direct vs Switchboard vs LiteLLM's proxy, same run.

    python -m bench.litellm_proxy setup     # once: LiteLLM's proxy in bench/.litellm-venv
    python -m bench.gateway                 # or: just bench
    python -m bench.gateway --runs 3 --seconds 3 --no-litellm   # quicker, without LiteLLM

One fake OpenAI-protocol upstream (its own process) answers all three paths:

- direct: the load generator talks to the upstream itself (the baseline);
- switchboard: `switchboard serve` (its own process) with one encrypted `api_key` provider
  pointing at the upstream, a clients file, and a bearer token, as in production;
- litellm: LiteLLM's proxy (its own process, one worker, a master key) with a config
  pointing at the same upstream.

Each round runs every load on every path, alternating, and the table reports medians over
the rounds: latency added per request (p50 and p99 against direct, concurrency 1),
throughput and p99 at concurrency 32 and 64, and time to first byte of a stream. The load
generator (bench/load.py, aiohttp) shares the 2 cores with the process under test, so the
numbers are ratios within one run, not absolutes. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from bench.config import CACHE, Service
from bench.litellm_proxy import LiteLLMProxy
from bench.load import LoadResult, run_load
from bench.upstream import UpstreamProcess
from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops
from service.crypto.tokens import create_token

UPSTREAM_KEY = "sk-upstream-bench-0123456789"
MODEL = "fake-model"


def build_project(upstream_base_url: str) -> tuple[Path, Path, str]:
    """A project with one encrypted provider for the upstream and a client; (root, key file, token)."""
    root = CACHE / "gateway"
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
    )
    Sops(age_key_file=key_file, project_root=root).encrypt_in_place(path)
    (folder / "routing.yaml").write_text("kind: routing\npurposes:\n  chat:\n    primary: upstream\n")
    token, _ = create_token(folder, "bench", ["completions"])
    return root, key_file, token


LOADS = [
    ("c1", {"concurrency": 1, "stream": False}),
    ("c32", {"concurrency": 32, "stream": False}),
    ("c64", {"concurrency": 64, "stream": False}),
    ("stream", {"concurrency": 1, "stream": True}),
]


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds; the table gives medians")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each load")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also serve another checkout of Switchboard (`git worktree add ../base <rev>`) in the same run",
    )
    args = parser.parse_args(argv)

    upstream = await UpstreamProcess(name="bench", api_key=UPSTREAM_KEY).start()
    root, key_file, token = build_project(upstream.base_url)
    service = Service(root, key_file)
    proxy = (
        None if args.no_litellm else LiteLLMProxy(upstream.base_url, model=MODEL, upstream_key=UPSTREAM_KEY)
    )
    baseline = (
        Service(root, key_file, code=args.baseline.resolve(), name="var-base") if args.baseline else None
    )
    paths = {
        "direct": (f"{upstream.base_url}/chat/completions", UPSTREAM_KEY),
        "switchboard": (f"{service.url}/v1/chat/completions", token),
    }
    if baseline is not None:
        paths["switchboard@base"] = (f"{baseline.url}/v1/chat/completions", token)
    results: dict[tuple[str, str], list[LoadResult]] = defaultdict(list)
    try:
        await service.start()
        if baseline is not None:
            await baseline.start()
        if proxy is not None:
            await proxy.start()
            paths["litellm"] = (proxy.chat_url, proxy.master_key)
        for run in range(args.runs):
            for load, options in LOADS:
                for name, (url, bearer) in paths.items():
                    result = await run_load(
                        url,
                        token=bearer,
                        model=MODEL,
                        requests=None,
                        duration_s=args.seconds,
                        warmup=20,
                        **options,
                    )
                    if result.errors:
                        print(f"  {name} {load}: {result.errors} errors {result.statuses}", file=sys.stderr)
                    results[(name, load)].append(result)
                    print(
                        f"round {run + 1} {name:<12} {load:<7} {result.summary()}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        service.stop()
        if baseline is not None:
            baseline.stop()
        if proxy is not None:
            await proxy.stop()
        await upstream.stop()
    print(_table(results, list(paths)))


def _median(results: list[LoadResult], field: str) -> float:
    return statistics.median(float(getattr(r, field) or 0.0) for r in results)


def _table(results: dict[tuple[str, str], list[LoadResult]], names: list[str]) -> str:
    direct_p50 = _median(results[("direct", "c1")], "p50_ms")
    direct_p99 = _median(results[("direct", "c1")], "p99_ms")
    rows = [
        "| path | c=1 p50 | c=1 p99 | added p50 | added p99 | c=32 req/s | c=32 p99 | c=64 req/s | c=64 p99 "
        "| stream TTFB p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        p50, p99 = _median(results[(name, "c1")], "p50_ms"), _median(results[(name, "c1")], "p99_ms")
        c32, c64 = results[(name, "c32")], results[(name, "c64")]
        cells = [
            name,
            f"{p50:.2f} ms",
            f"{p99:.2f} ms",
            f"{p50 - direct_p50:+.2f} ms",
            f"{p99 - direct_p99:+.2f} ms",
            f"{_median(c32, 'rps'):,.0f}",
            f"{_median(c32, 'p99_ms'):.1f} ms",
            f"{_median(c64, 'rps'):,.0f}",
            f"{_median(c64, 'p99_ms'):.1f} ms",
            f"{_median(results[(name, 'stream')], 'ttfb_p50_ms'):.2f} ms",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    rates = {name: _median(results[(name, "c64")], "rps") for name in names}
    rows.append("")
    rows.append(f"Switchboard at c=64 serves {rates['switchboard'] / rates['direct']:.0%} of the direct rate")
    if rates.get("litellm"):
        rows[-1] += f" and {rates['switchboard'] / rates['litellm']:.1f}x LiteLLM's proxy."
    if rates.get("switchboard@base"):
        ratio = rates["switchboard"] / rates["switchboard@base"]
        rows.append(f"Against the baseline checkout in the same run: {ratio:.2f}x its rate at c=64.")
    return "\n".join(rows)


if __name__ == "__main__":
    asyncio.run(main())

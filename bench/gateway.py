"""Benchmark of the gateway (issues 4, 22): direct vs Switchboard vs LiteLLM's proxy, same run.

    python -m bench.litellm_proxy setup     # once: LiteLLM's proxy in bench/.litellm-venv
    python -m bench.gateway                 # or: just bench
    python -m bench.gateway --rounds 3 --seconds 3 --no-litellm   # quicker, without LiteLLM
    python -m bench.gateway --baseline ../base    # and another checkout, in the same run
    python -m bench.gateway --rounds 0 --flame docs/perf/flame.svg   # py-spy on serve at c=64
    python -m bench.gateway --workers 2 --no-litellm   # serve and serve --workers 2, both on Redis

One fake OpenAI-protocol upstream (its own process) answers every path:

- direct: the load generator talks to the upstream itself (the baseline);
- switchboard: `switchboard serve` (its own process) as a real deployment runs it: one
  encrypted, priced `api_key` provider with a budget pointing at the upstream, a clients file
  whose client has every limit (rpm, tpm, max_parallel, a monthly budget; none is reached)
  and a bearer token, and the usage ledger on (SQLite, its spool), each request recorded;
- switchboard@base (`--baseline DIR`): the same project served by another checkout's code;
- litellm: LiteLLM's proxy (its own process, one worker, a master key) with a config
  pointing at the same upstream.

Each round runs every load on every path, alternating, and the table reports medians over
the rounds: latency added per request (p50 and p99 against direct, concurrency 1),
throughput and p99 at concurrency 32 and 64, and time to first byte of a stream. The ratios
under it are medians of each round's ratio (both sides measured minutes apart at most). The
load generator (bench/load.py, aiohttp) shares the 2 cores with the process under test, so
the numbers are ratios within one run, not absolutes. Only 127.0.0.1 is contacted.

`--workers N` (2 or more) adds `switchboard-wN`: `serve --workers N` on the same project, with
Debian's `redis-server` (which `--workers` needs) for its limits; `switchboard` then uses the
same Redis (so the two differ only in their processes). Its CPU per request is every worker's.

`--flame PATH` then records `switchboard serve` with py-spy (`pip install py-spy`) under
load at concurrency 64 and writes a flame graph (SVG), and beside it the share of samples
per function (`.shares.txt`: inclusive and self, over every thread of the service).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp

from bench.config import CACHE, Service
from bench.litellm_proxy import LiteLLMProxy
from bench.load import LoadResult, run_load
from bench.upstream import UpstreamProcess
from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops
from service.crypto.tokens import new_token, token_sha256

UPSTREAM_KEY = "sk-upstream-bench-0123456789"
MODEL = "fake-model"
LIMITS = (
    "{rpm: 1000000000, tpm: 1000000000000, max_parallel: 1000000, budget: {usd: '1000000000', period: month}}"
)


def build_project(upstream_base_url: str) -> tuple[Path, Path, str]:
    """A project with one encrypted, priced provider for the upstream and a limited client;
    (root, key file, the client's token)."""
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
        "pricing: {'*': {input: 0.15, output: 0.6}}\nbudget: {usd: 1000000000, period: month}\n"
    )
    Sops(age_key_file=key_file, project_root=root).encrypt_in_place(path)
    (folder / "routing.yaml").write_text("kind: routing\npurposes:\n  chat:\n    primary: upstream\n")
    token = new_token()
    (folder / "clients.yaml").write_text(
        "kind: clients\nclients:\n"
        f"  - name: bench\n    token_sha256: {token_sha256(token)}\n    scopes: [completions]\n"
        f"    limits: {LIMITS}\n"
    )
    return root, key_file, token


def metered_service(
    root: Path, key_file: Path, name: str, code: Path | None = None, env: dict[str, str] | None = None
) -> Service:
    """`switchboard serve` with a ledger of its own (a SQLite file and its spool under `root/name`)."""
    ledger = {
        "SWITCHBOARD_USAGE_DB": str(root / name / "usage.db"),
        "SWITCHBOARD_USAGE_SPOOL": str(root / name / "usage-spool"),
    }
    return Service(root, key_file, code=code, name=name, env=ledger | (env or {}))


def _redis() -> Any:
    """Debian's `redis-server` on a free loopback port (the tests' own, tests/support/replicas.py)."""
    from tests.support.replicas import RedisServer

    return RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-")))


LOADS: list[tuple[str, dict[str, Any]]] = [
    ("c1", {"concurrency": 1, "stream": False}),
    ("c32", {"concurrency": 32, "stream": False}),
    ("c64", {"concurrency": 64, "stream": False}),
    ("stream", {"concurrency": 1, "stream": True}),
]


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", "--runs", dest="runs", type=int, default=5, help="rounds; the table gives medians"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each load")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also serve another checkout of Switchboard (`git worktree add ../base <rev>`) in the same run",
    )
    parser.add_argument("--flame", type=Path, metavar="SVG", help="then profile serve at c=64 with py-spy")
    parser.add_argument("--flame-seconds", type=float, default=10.0, help="how long py-spy records")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="also serve --workers N (Redis)")
    args = parser.parse_args(argv)

    upstream = await UpstreamProcess(name="bench", api_key=UPSTREAM_KEY).start()
    root, key_file, token = build_project(upstream.base_url)
    redis = _redis() if args.workers > 1 else None
    shared = {"SWITCHBOARD_REDIS_URL": redis.url} if redis is not None else {}
    service = metered_service(root, key_file, "var", env=shared)
    workers = (
        metered_service(
            root, key_file, "var-workers", env=shared | {"SWITCHBOARD_WORKERS": str(args.workers)}
        )
        if redis is not None
        else None
    )
    proxy = (
        None
        if args.no_litellm or args.runs == 0
        else LiteLLMProxy(upstream.base_url, model=MODEL, upstream_key=UPSTREAM_KEY)
    )
    baseline = metered_service(root, key_file, "var-base", args.baseline.resolve()) if args.baseline else None
    paths = {
        "direct": (f"{upstream.base_url}/chat/completions", UPSTREAM_KEY),
        "switchboard": (f"{service.url}/v1/chat/completions", token),
    }
    if baseline is not None:
        paths["switchboard@base"] = (f"{baseline.url}/v1/chat/completions", token)
    if workers is not None:
        paths[f"switchboard-w{args.workers}"] = (f"{workers.url}/v1/chat/completions", token)
    results: dict[tuple[str, str], list[LoadResult]] = defaultdict(list)
    cpu: dict[tuple[str, str], list[float]] = defaultdict(list)
    """(path, load) -> µs of CPU its serving process spent per request, each round."""
    try:
        await service.start()
        await _check_metered(service)
        if baseline is not None:
            await baseline.start()
            await _check_metered(baseline)
        if workers is not None:
            await workers.start()
            await _check_metered(workers)
            await asyncio.sleep(5)  # `/readyz` is the leader's: the followers listen once they loaded too
        if proxy is not None:
            await proxy.start()
            paths["litellm"] = (proxy.chat_url, proxy.master_key)
        pids = {
            "direct": upstream.pid,
            "switchboard": service.pid,
            "switchboard@base": baseline.pid if baseline is not None else None,
            "litellm": proxy.pid if proxy is not None else None,
            f"switchboard-w{args.workers}": workers.pid if workers is not None else None,
        }
        for run in range(args.runs):
            for load, options in LOADS:
                for name, (url, bearer) in paths.items():
                    before = _cpu_s(pids[name])
                    result = await run_load(
                        url, token=bearer, model=MODEL, requests=None, duration_s=args.seconds,
                        warmup=20, **options,
                    )  # fmt: skip
                    if result.errors:
                        print(f"  {name} {load}: {result.errors} errors {result.statuses}", file=sys.stderr)
                    results[(name, load)].append(result)
                    if result.ok:
                        cpu[(name, load)].append((_cpu_s(pids[name]) - before) / result.ok * 1e6)
                    print(
                        f"round {run + 1} {name:<16} {load:<7} {result.summary()}",
                        file=sys.stderr,
                        flush=True,
                    )
        if args.flame is not None:
            await _flame(service, paths["switchboard"][0], token, args.flame, args.flame_seconds)
    finally:
        service.stop()
        if baseline is not None:
            baseline.stop()
        if workers is not None:
            workers.stop()
        if redis is not None:
            redis.stop()
        if proxy is not None:
            await proxy.stop()
        await upstream.stop()
    if args.runs:
        print(_table(results, cpu, list(paths)))


def _cpu_s(pid: int | None) -> float:
    """The CPU seconds (user and system) process `pid` has used so far; 0 when unknown.

    Per request, it is the process's own work, which the machine's other load moves far less
    than it moves the wall clock."""
    if pid is None:
        return 0.0
    total = 0.0
    for each in [pid, *_children(pid)]:  # `serve --workers N`: the leader's followers too
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


async def _check_metered(service: Service) -> None:
    """Refuse to measure a service whose ledger is not on: the point is the metered path."""
    async with aiohttp.ClientSession() as session, session.get(f"{service.url}/readyz") as response:
        ready = await response.json()
    if ready.get("ledger") in (None, "off"):
        raise RuntimeError(f"the ledger is not on in {service.url}: {ready}")
    print(f"{service.url}: ledger {ready['ledger']}, limits {ready.get('limits')}", file=sys.stderr)


async def _flame(service: Service, url: str, token: str, svg: Path, seconds: float) -> None:
    """Record `service` with py-spy while it serves chat completions at concurrency 64: once
    as a flame graph, once as collapsed stacks (each under a load of its own), whose shares
    are written beside the graph."""
    svg.parent.mkdir(parents=True, exist_ok=True)
    await _record(service, url, token, svg, "flamegraph", seconds)
    with tempfile.TemporaryDirectory(prefix="py-spy-") as folder:
        raw = Path(folder) / "stacks.txt"
        await _record(service, url, token, raw, "raw", seconds)
        svg.with_suffix(".shares.txt").write_text(shares(raw.read_text()))
    print(f"flame graph: {svg}; shares: {svg.with_suffix('.shares.txt')}", file=sys.stderr)


async def _record(service: Service, url: str, token: str, out: Path, form: str, seconds: float) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    assert service.process is not None
    load = asyncio.ensure_future(
        run_load(url, token=token, model=MODEL, concurrency=64, requests=None, duration_s=seconds + 3)
    )
    await asyncio.sleep(1)  # the load's warm-up done
    recorder = await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(service.process.pid), "--duration", str(int(seconds)),
        "--rate", "250", "--nonblocking", "--format", form, "--output", str(out),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    await recorder.wait()
    await load


def shares(collapsed: str, top: int = 60) -> str:
    """From py-spy's collapsed stacks: each function's share of the samples it is on the stack
    of (inclusive), and of those it was running itself (self), the largest first."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"{total} samples", "", "inclusive  self  function"]
    for frame, n in inclusive.most_common(top):
        lines.append(f"{n / total:8.1%} {own[frame] / total:6.1%}  {frame}")
    lines += ["", "self (the most time spent in the function itself)"]
    for frame, n in own.most_common(top):
        lines.append(f"{n / total:6.1%}  {frame}")
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    """`relay (service/gateway/relay.py:120)` without the line number or the site-packages path."""
    name, _, where = frame.partition(" (")
    where = where.rsplit(":", 1)[0]
    for cut in ("site-packages/", "lib/python3.11/"):
        if cut in where:
            where = where.split(cut, 1)[1]
    return f"{name} ({where})"


def _median(results: list[LoadResult], field: str) -> float:
    return statistics.median(float(getattr(r, field) or 0.0) for r in results)


def _ratio(results: dict[tuple[str, str], list[LoadResult]], a: str, b: str, load: str = "c64") -> float:
    """The median over rounds of `a`'s rate over `b`'s at `load`."""
    pairs = zip(results[(a, load)], results[(b, load)], strict=True)
    return statistics.median(x.rps / y.rps if y.rps else 0.0 for x, y in pairs)


def _added(results: dict[tuple[str, str], list[LoadResult]], name: str, load: str, field: str) -> float:
    """The median over rounds of what `name` adds to direct's `field` at `load`, in ms."""
    pairs = zip(results[(name, load)], results[("direct", load)], strict=True)
    return statistics.median(float(getattr(x, field) or 0) - float(getattr(y, field) or 0) for x, y in pairs)


def _table(
    results: dict[tuple[str, str], list[LoadResult]],
    cpu: dict[tuple[str, str], list[float]],
    names: list[str],
) -> str:
    rows = [
        "| path | c=1 p50 | c=1 p99 | added p50 | added p99 | c=32 req/s | c=32 p99 | c=64 req/s | c=64 p99 "
        "| stream TTFB p50 | added TTFB | CPU/request c=64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        c1, c32, c64 = results[(name, "c1")], results[(name, "c32")], results[(name, "c64")]
        cells = [
            name,
            f"{_median(c1, 'p50_ms'):.2f} ms",
            f"{_median(c1, 'p99_ms'):.2f} ms",
            f"{_added(results, name, 'c1', 'p50_ms'):+.2f} ms",
            f"{_added(results, name, 'c1', 'p99_ms'):+.2f} ms",
            f"{_median(c32, 'rps'):,.0f}",
            f"{_median(c32, 'p99_ms'):.1f} ms",
            f"{_median(c64, 'rps'):,.0f}",
            f"{_median(c64, 'p99_ms'):.1f} ms",
            f"{_median(results[(name, 'stream')], 'ttfb_p50_ms'):.2f} ms",
            f"{_added(results, name, 'stream', 'ttfb_p50_ms'):+.2f} ms",
            f"{statistics.median(cpu[(name, 'c64')]):.0f} µs" if cpu[(name, "c64")] else "",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("Medians of each round's ratio at c=64 (and c=32):")
    for name in names[1:]:
        direct, direct32 = _ratio(results, name, "direct"), _ratio(results, name, "direct", "c32")
        line = f"- {name}: {direct:.1%} of direct ({direct32:.1%})"
        if "litellm" in names and name != "litellm":
            line += f", {_ratio(results, name, 'litellm'):.1f}x LiteLLM's proxy"
        if "switchboard@base" in names and name == "switchboard":
            base, base32 = (
                _ratio(results, name, "switchboard@base"),
                _ratio(results, name, "switchboard@base", "c32"),
            )
            line += f", {base:.2f}x the baseline ({base32:.2f}x at c=32)"
        rows.append(line)
    return "\n".join(rows)


if __name__ == "__main__":
    asyncio.run(main())

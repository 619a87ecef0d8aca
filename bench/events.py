"""Benchmark of the event log (issue 9): a long log must not slow the service or fill its memory.

    python -m bench.events                       # 100,000 events, 30 `/state?at=` queries
    python -m bench.events --events 20000 --queries 10

It builds a project of 10 encrypted `api_key` files (as `bench.config` does) and a real log
for it with the real `EventLog` and hash chain: the configuration first recorded, then a
mix of what a service writes over years (provider updates, health changes, secret reads,
refused files), ending on the configuration of the files, so a start records nothing new.
fsync is skipped while generating (the bytes are the same; 100,000 fsyncs would take
minutes); the log is cached in bench/.cache/. Then `switchboard serve` runs in its own
process, once on an empty log and once on the long one, and it measures:

- start: process start -> `/readyz` 200 (the log indexed and replayed, every file decrypted);
- RSS (VmRSS from /proc) once ready and after the queries, and its growth over the empty log;
- `GET /api/v1/llm-config/state?at=T` for times spread over the log: p50 and p99;
- `GET /api/v1/llm-config/audit?limit=1000` (the most recent thousand events);
- `switchboard audit verify` on the long log (the whole chain checked), and `state --at`.

Only 127.0.0.1 is contacted. Results print as Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp

from bench.config import CACHE, build_project
from bench.load import percentile
from service.config.snapshot import load_folder
from service.config.view import ConfigView, diff_views
from service.crypto.sops import Sops
from service.journal.events import (
    ConfigRejected,
    ProviderHealthChanged,
    SecretRead,
    ServiceStarted,
    draft_from_change,
)
from service.journal.log import EventLog
from service.journal.reader import read_events

SIZE = 10


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _record(log: EventLog, old: ConfigView, new: ConfigView) -> None:
    for change in diff_views(old, new, routing_file="providers.d/routing.yaml", clients_file=None):
        log.append(draft_from_change(change, commit=f"{random.getrandbits(160):040x}"))


def build_log(root: Path, key_file: Path, count: int) -> Path:
    """A log of `count` events ending on the configuration of `root` (cached)."""
    path = CACHE / f"events-{count}.jsonl"
    if path.exists():
        return path
    sops = Sops(age_key_file=key_file, project_root=root)
    final = load_folder(root / "providers.d", "providers.d", sops).view()
    rng = random.Random(9)
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    with mock.patch.object(os, "fsync", lambda fd: None), EventLog(tmp) as log:
        log.append(ServiceStarted(version="0.1.0", pid=1))
        _record(log, {"providers": {}, "routing": {}, "clients": {}}, final)
        current = final
        ids = sorted(final["providers"])
        while log.last_seq < count - 2:
            roll = rng.random()
            pid = rng.choice(ids)
            if roll < 0.25:  # a provider edited (and, half the time, edited back)
                edited = {**current["providers"][pid], "base_url": f"https://edit-{rng.randrange(5)}/v1"}
                target = {**current, "providers": {**current["providers"], pid: edited}}
                _record(log, current, target)
                current = target
            elif roll < 0.6:
                status = rng.choice(["healthy", "unhealthy"])
                changes: Any = {"status": {"old": "unknown", "new": status}}
                log.append(ProviderHealthChanged(subject=pid, changes=changes))
            elif roll < 0.95:
                log.append(SecretRead(subject=pid, client=f"app-{rng.randrange(20)}", purpose="chat"))
            else:
                log.append(ConfigRejected(subject=pid, file=f"providers.d/{pid}.yaml", reason="line 3: bad"))
            if rng.random() < 0.001:
                log.append(ServiceStarted(version="0.1.0", pid=rng.randrange(1 << 16)))
        _record(log, current, final)
    tmp.replace(path)
    return path


class Service:
    """`switchboard serve` in its own process, on a given event log."""

    def __init__(self, root: Path, key_file: Path, events: Path) -> None:
        self.root, self.key_file, self.events = root, key_file, events
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> float:
        """Start, and return the seconds until `/readyz` answers 200."""
        env = {**os.environ, "SOPS_AGE_KEY_FILE": str(self.key_file), "SWITCHBOARD_LOG_LEVEL": "WARNING"}
        argv = [sys.executable, "-m", "service", "--root", str(self.root), "serve"]
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [*argv, "--port", str(self.port), "--events", str(self.events)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        async with aiohttp.ClientSession() as session:
            while time.perf_counter() - started < 120:
                try:
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return time.perf_counter() - started
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.005)
        raise RuntimeError("the service did not become ready in 120 s")

    def rss_mb(self) -> float:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return kb / 1024

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


async def timed_gets(url: str, paths: list[str]) -> list[float]:
    """Milliseconds of each GET, one after the other."""
    times = []
    async with aiohttp.ClientSession() as session:
        for path in paths:
            started = time.perf_counter()
            async with session.get(url + path) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{path} answered {response.status}")
            times.append((time.perf_counter() - started) * 1000)
    return times


def _command(root: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "service", "--root", str(root), *args], check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - started


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"preparing {SIZE} encrypted files and a log of {args.events:,} events...", file=sys.stderr)
    root, key_file, _ = build_project(SIZE)
    cached = build_log(root, key_file, args.events)
    times = [e.ts for e in read_events(cached)[:: max(args.events // 1000, 1)]]
    var = root / "var"
    rows: dict[str, dict[str, float]] = {}
    for label, source in (("empty log", None), (f"{args.events:,} events", cached)):
        shutil.rmtree(var, ignore_errors=True)
        var.mkdir()
        log = var / "events.jsonl"
        if source is not None:
            shutil.copyfile(source, log)
        service = Service(root, key_file, log)
        try:
            row = {"start": await service.start(), "rss_ready": service.rss_mb()}
            rng = random.Random(1)
            picks: list[datetime] = [rng.choice(times) for _ in range(args.queries)] if source else []
            stamps = [t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in picks] or ["now"] * args.queries
            state = await timed_gets(service.url, [f"/api/v1/llm-config/state?at={s}" for s in stamps])
            audit = await timed_gets(service.url, ["/api/v1/llm-config/audit?limit=1000"] * 5)
            row |= {
                "state_p50": statistics.median(state),
                "state_p99": percentile(state, 99),
                "audit_p50": statistics.median(audit),
                "rss_after": service.rss_mb(),
            }
        finally:
            service.stop()
        if source is not None:
            row["verify"] = _command(root, "audit", "verify", "--events", str(log))
            row["state_cli"] = _command(root, "state", "--events", str(log))
        rows[label] = row
        print(f"  {label}: {row}", file=sys.stderr)
    empty, full = rows["empty log"], rows[f"{args.events:,} events"]
    header = "| log | start to ready | RSS ready | RSS after queries | `/state?at=` p50 | p99 | audit p50 |"
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        print(
            f"| {label} | {row['start']:.2f} s | {row['rss_ready']:.1f} MB | {row['rss_after']:.1f} MB | "
            f"{row['state_p50']:.0f} ms | {row['state_p99']:.0f} ms | {row['audit_p50']:.0f} ms |"
        )
    print(
        f"\nRSS growth over the empty log: {full['rss_ready'] - empty['rss_ready']:+.1f} MB once ready, "
        f"{full['rss_after'] - empty['rss_after']:+.1f} MB after the queries. "
        f"`audit verify`: {full['verify']:.2f} s; `state` (whole log, CLI): {full['state_cli']:.2f} s "
        f"({cached.stat().st_size / 1e6:.0f} MB of log)."
    )


if __name__ == "__main__":
    asyncio.run(main())

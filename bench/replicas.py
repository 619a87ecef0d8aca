"""Benchmark of many replicas (docs/reference.md §12): how fast a push reaches all of three, and
what fan-out costs.

    python -m bench.replicas                        # 20 pushes each way, 1 s polling, 5 s of lookups
    python -m bench.replicas --pushes 10 --poll-interval 2

Three `switchboard serve` processes, each with its own clone of a bare repository (the
remote), port and event log, all on 127.0.0.1, and Debian's `redis-server` on a free port:

- (a) webhook + fan-out: the replicas pull only at start and when told (interval 1 h). Each
  push to the remote is followed by a signed webhook to the first replica; timed from the
  push until all three `/readyz` name the new commit (polled every 5 ms). Pushes are spaced
  by a random 0.05-1 s, so they land anywhere in the replicas' cycles.
- (b) polling: the same without Redis or webhooks, with `SWITCHBOARD_GIT_PULL_INTERVAL_S`
  short; timed the same way.
- (c) the cost of fan-out on requests: `GET /api/v1/llm-config/active/chat` on one replica,
  concurrency 8, for `--lookup-seconds`, on the three with Redis (heartbeats every 2 s, the
  fan-out thread live) and on the three without, alternating, `--rounds` times each.

Both trios run at once (six processes, each trio with its own remote); they, the remotes,
Redis and the load share the machine's two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.config import measure_lookups
from bench.load import percentile
from tests.support.replicas import (
    Checkout,
    RedisServer,
    Replica,
    clone,
    free_port,
    make_remote,
    replica_env,
    replicas,
    routing_yaml,
    server_yaml,
)

SECRET = "whsec-bench-0123456789"  # noqa: S105 - a throwaway, for this run only
PAYLOAD = b'{"ref": "refs/heads/main"}'
API = "/api/v1/llm-config"


def _signed() -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), PAYLOAD, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


def _trio(workdir: Path, bare: Path, tag: str, **settings: str) -> tuple[Replica, ...]:
    members = []
    for i in range(1, 4):
        checkout = clone(bare, workdir / f"{tag}-r{i}")
        env = replica_env(None, git_pull="origin/main", webhook_secret=SECRET, log_level="ERROR", **settings)
        members.append(Replica(f"{tag}-r{i}", checkout.root, checkout.providers, free_port(), env, workdir))
    return tuple(members)


async def _all_serve(members: tuple[Replica, ...], commit: str, timeout_s: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        commits = await asyncio.gather(*(m.commit() for m in members))
        if all(c == commit for c in commits):
            return time.perf_counter() - started
        await asyncio.sleep(0.005)
    raise RuntimeError(f"not all replicas served {commit[:12]} within {timeout_s}s")


async def _pushes(
    members: tuple[Replica, ...], author: Checkout, count: int, *, webhook: bool, timeout_s: float
) -> list[float]:
    """Seconds from each push until all of `members` serve it."""
    took = []
    for i in range(count):
        commit = author.commit({"gpu.yaml": server_yaml("gpu", 1000 + i)}, f"push {i}")
        started = time.perf_counter()
        author.push()
        if webhook:
            status, _ = await members[0].post(f"{API}/hooks/git", PAYLOAD, **_signed())
            if status != 202:
                raise RuntimeError(f"the webhook answered {status}")
        await _all_serve(members, commit, timeout_s)
        took.append(time.perf_counter() - started)
        await asyncio.sleep(random.uniform(0.05, 1.0))  # pushes land anywhere in a poll's cycle
    return took


def _row(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    return f"| {name} | {len(ms)} | {p50:.0f} ms | {p99:.0f} ms | {max(ms):.0f} ms |"


async def _lookups(members: tuple[Replica, ...], seconds: float) -> tuple[float, float, float]:
    return await measure_lookups(members[0].url + f"{API}/active/chat", 8, seconds)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--lookup-seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3, help="lookup rounds each way, alternating")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-bench-replicas-"))
    redis: RedisServer | None = None
    try:
        project = workdir / "project"
        (project / "providers.d").mkdir(parents=True)
        (project / "providers.d" / "gpu.yaml").write_text(server_yaml("gpu", 9))
        (project / "providers.d" / "routing.yaml").write_text(routing_yaml("gpu"))
        bare_f, author_f = make_remote(workdir / "f", project)
        bare_p, author_p = make_remote(workdir / "p", project)
        redis = RedisServer(workdir / "redis")
        fanned = _trio(workdir, bare_f, "fanout", redis_url=redis.url, git_pull_interval_s="3600")
        polled = _trio(workdir, bare_p, "polling", git_pull_interval_s=str(args.poll_interval))
        async with replicas(*fanned, *polled):
            await asyncio.sleep(3)  # every replica has heard the others
            by_fanout = await _pushes(fanned, author_f, args.pushes, webhook=True, timeout_s=30)
            by_polling = await _pushes(
                polled, author_p, args.pushes, webhook=False, timeout_s=args.poll_interval * 5 + 10
            )
            with_fanout, without = [], []
            for _ in range(args.rounds):  # alternating, so a busy moment of the machine hits both
                with_fanout.append(await _lookups(fanned, args.lookup_seconds))
                without.append(await _lookups(polled, args.lookup_seconds))
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print("| from a push to the remote until all 3 replicas serve it | pushes | p50 | p99 | max |")
    print("|---|---:|---:|---:|---:|")
    print(_row("webhook to one replica + Redis fan-out", by_fanout))
    print(_row(f"polling every {args.poll_interval:g} s, no Redis", by_polling))
    print()
    title = f"`GET …/active/chat`, concurrency 8, one replica (median of {args.rounds})"
    print(f"| {title} | req/s | p50 | p99 |")
    print("|---|---:|---:|---:|")
    for name, runs in (("three replicas with Redis fan-out", with_fanout), ("three without Redis", without)):
        rate, p50, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"| {name} | {rate:,.0f} | {p50:.2f} ms | {p99:.2f} ms |")


if __name__ == "__main__":
    asyncio.run(main())

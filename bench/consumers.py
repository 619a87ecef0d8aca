"""Benchmark of consumers behind a load balancer without affinity (docs/reference.md §9, §12;
issue 19): what an idle consumer costs, and how late a change reaches it.

    python -m bench.consumers                       # 60 s idle, 20 changes each way (~2.5-4 min)
    python -m bench.consumers --idle-seconds 300 --changes 50

Three `switchboard serve` replicas from one bare remote, each with its own clone, port and event
log, behind a per-request round-robin reverse proxy (`tests.support.balancer`: each request
to the next replica, no affinity), all on 127.0.0.1. After a first change one replica is
restarted with a fresh event log, so their indexes differ (a pod replaced with a new
`emptyDir`). Active health checks run every 5 s on every replica (the provider's port is
closed: `unhealthy`, with a reason), so health is part of every tag. Two trios:

- **with Redis** (Debian's `redis-server` on a free port): pull interval 1 h; each change is
  pushed to the remote and announced by a signed webhook to the first replica, the others
  pull when the fan-out tells them. Health is shared.
- **without Redis**: each replica pulls every `--poll-interval` s; health is each one's own.

Two consumers on each trio, each through its own proxy (so each one's requests are counted
alone): the raw HTTP loop of docs/reference.md §9 (`GET …/active/chat?wait=15s` with `If-None-Match: <its
tag>`) and the Python client (`service.client.Switchboard`, `wait_s=15`).

- (a) idle: requests each consumer makes in `--idle-seconds` with no change, as a rate per
  minute (target: one per wait period, 4 a minute);
- (b) latency: `--changes` changes (spaced by a random 0.2-1 s); each replica's `/readyz` is
  polled every 5 ms until all three serve the change, and each consumer notes when it first
  holds the new commit (`ETag`'s commit part for the raw loop, `Route.commit` for the
  client). Reported: from the last replica applying it to the consumer seeing it (negative
  when the consumer was held on a replica that applied it before the last one did), p50/p99
  (target p99 < 500 ms), and from the push.

Everything shares the machine's two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.load import percentile
from service.client import Switchboard
from tests.support.balancer import RoundRobin, round_robin
from tests.support.replicas import (
    Checkout,
    RedisServer,
    Replica,
    clone,
    free_port,
    make_remote,
    replica_env,
    routing_yaml,
    server_yaml,
)

SECRET = "whsec-bench-0123456789"  # noqa: S105 - a throwaway, for this run only
PAYLOAD = b'{"ref": "refs/heads/main"}'
API = "/api/v1/llm-config"
WAIT_S = 15.0


def _signed() -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), PAYLOAD, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


def _commit_of(tag: str) -> str:
    """The commit part of a weak tag `W/"<blob>.<commit>.<hash>"`."""
    return tag.removeprefix("W/").strip('"').split(".")[1]


@dataclass
class Trio:
    name: str
    members: tuple[Replica, ...]
    author: Checkout
    webhook: bool
    proxies: list[RoundRobin] = field(default_factory=list)


def _trio(workdir: Path, name: str, *, redis_url: str | None, poll_interval_s: float) -> Trio:
    project = workdir / f"{name}-project"
    (project / "providers.d").mkdir(parents=True)
    (project / "providers.d" / "gpu.yaml").write_text(server_yaml("gpu", 9))
    (project / "providers.d" / "routing.yaml").write_text(routing_yaml("gpu"))
    bare, author = make_remote(workdir / name, project)
    settings = {"redis_url": redis_url} if redis_url else {}
    members = []
    for i in range(1, 4):
        checkout = clone(bare, workdir / f"{name}-r{i}")
        env = replica_env(
            None,
            git_pull="origin/main",
            git_pull_interval_s=str(3600 if redis_url else poll_interval_s),
            webhook_secret=SECRET,
            log_level="ERROR",
            **settings,
        )
        env["SWITCHBOARD_HEALTH_INTERVAL_S"] = "5"
        members.append(Replica(f"{name}-r{i}", checkout.root, checkout.providers, free_port(), env, workdir))
    return Trio(name, tuple(members), author, webhook=redis_url is not None)


@contextlib.asynccontextmanager
async def _running(trio: Trio, http: aiohttp.ClientSession) -> AsyncIterator[Trio]:
    """The trio started, a first change applied everywhere, then its second replica restarted
    with a fresh event log (their indexes differ); stopped at the end."""
    members = trio.members
    try:
        for m in members:
            m.http = http
            await m.start()
        for m in members:
            await m.wait_ready()
        await _change(trio, 1, timeout_s=60)
        second = members[1]
        await second.stop()
        second.events_file.unlink()
        await second.start()
        await second.wait_ready()
        yield trio
    finally:
        await asyncio.gather(*(m.stop() for m in members))


async def _indexes(trio: Trio, http: aiohttp.ClientSession) -> tuple[set[str], set[str]]:
    indexes, etags = set(), set()
    for m in trio.members:
        async with http.get(f"{m.url}{API}/active/chat") as answer:
            indexes.add(answer.headers["X-Switchboard-Index"])
            etags.add(answer.headers["ETag"])
    return indexes, etags


async def _change(trio: Trio, n: int, timeout_s: float) -> tuple[str, float, float]:
    """Push change `n` (the provider's port); (commit, when pushed, when the last replica
    applied it), `time.perf_counter()` clock."""
    commit = trio.author.commit({"gpu.yaml": server_yaml("gpu", 20000 + n)}, f"change {n}")
    pushed = time.perf_counter()
    trio.author.push()
    if trio.webhook:
        status, _ = await trio.members[0].post(f"{API}/hooks/git", PAYLOAD, **_signed())
        if status != 202:
            raise RuntimeError(f"the webhook answered {status}")
    while time.perf_counter() - pushed < timeout_s:
        commits = await asyncio.gather(*(m.commit() for m in trio.members))
        if all(c == commit for c in commits):
            return commit, pushed, time.perf_counter()
        await asyncio.sleep(0.005)
    raise RuntimeError(f"{trio.name}: not all replicas served change {n} within {timeout_s}s")


class RawLoop:
    """The loop of docs/reference.md §9: `If-None-Match: <tag>` with `?wait=15s`, through its own proxy."""

    kind = "raw HTTP loop"

    def __init__(self, proxy: RoundRobin, http: aiohttp.ClientSession) -> None:
        self.proxy, self.http = proxy, http
        self.tag: str | None = None
        self.seen: dict[str, float] = {}
        self.statuses: dict[int, int] = {}

    async def run(self) -> None:
        url = f"{self.proxy.url}{API}/active/chat?wait={WAIT_S:g}s"
        while True:
            headers = {"If-None-Match": self.tag} if self.tag else {}
            try:
                async with self.http.get(url, headers=headers) as answer:
                    self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
                    await answer.read()
                    if answer.status == 200:
                        self.tag = answer.headers["ETag"]
                        self.seen.setdefault(_commit_of(self.tag), time.perf_counter())
                    elif answer.status != 304:
                        await asyncio.sleep(1)
            except aiohttp.ClientError:
                self.statuses[0] = self.statuses.get(0, 0) + 1
                await asyncio.sleep(1)

    @property
    def requests(self) -> int:
        return len(self.proxy.sent)


class ClientWatch:
    """The Python client (`wait_s=15`), through its own proxy, noting each commit's arrival."""

    kind = "Python client"

    def __init__(self, proxy: RoundRobin) -> None:
        self.proxy = proxy
        self.client = Switchboard(proxy.url, wait_s=WAIT_S)
        self.seen: dict[str, float] = {}

    async def run(self) -> None:
        await self.client.start()
        version = 0
        try:
            while True:
                route = await self.client.route("chat", timeout_s=30)
                if route.commit is not None:
                    self.seen.setdefault(route.commit, time.perf_counter())
                version = await self.client.wait_for_change(version)
        finally:
            await self.client.close()

    @property
    def requests(self) -> int:
        return len(self.proxy.sent)


Consumer = RawLoop | ClientWatch


async def _consumers(
    trio: Trio, http: aiohttp.ClientSession, stack: AsyncExitStack
) -> tuple[list[Consumer], list[asyncio.Task[None]]]:
    urls = [m.url for m in trio.members]
    raw = RawLoop(await stack.enter_async_context(round_robin(urls)), http)
    client = ClientWatch(await stack.enter_async_context(round_robin(urls)))
    consumers: list[Consumer] = [raw, client]
    return consumers, [asyncio.create_task(c.run()) for c in consumers]


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{percentile(ms, 50):.0f} ms | {percentile(ms, 99):.0f} ms | {max(ms):.0f} ms"


async def _latencies(
    trio: Trio, consumers: list[Consumer], count: int, timeout_s: float
) -> dict[str, tuple[list[float], list[float]]]:
    """Per consumer kind: (after the last replica applied, after the push), seconds."""
    out: dict[str, tuple[list[float], list[float]]] = {c.kind: ([], []) for c in consumers}
    for n in range(count):
        commit, pushed, applied = await _change(trio, 100 + n, timeout_s)
        deadline = time.perf_counter() + 20
        while not all(commit in c.seen for c in consumers):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{trio.name}: a consumer never saw change {n}")
            await asyncio.sleep(0.005)
        for c in consumers:
            out[c.kind][0].append(c.seen[commit] - applied)
            out[c.kind][1].append(c.seen[commit] - pushed)
        await asyncio.sleep(random.uniform(0.2, 1.0))
    return out


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="pull interval without Redis")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-bench-consumers-"))
    redis: RedisServer | None = None
    idle: list[tuple[str, str, int, float]] = []
    latency: list[tuple[str, str, tuple[list[float], list[float]]]] = []
    notes: list[str] = []
    try:
        redis = RedisServer(workdir / "redis")
        shared = _trio(workdir, "redis", redis_url=redis.url, poll_interval_s=args.poll_interval)
        alone = _trio(workdir, "alone", redis_url=None, poll_interval_s=args.poll_interval)
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S + 10))
            )
            for trio in (shared, alone):
                await stack.enter_async_context(_running(trio, http))
            await asyncio.sleep(6)  # the first health checks confirmed, and shared
            watching = {}
            for trio in (shared, alone):
                indexes, etags = await _indexes(trio, http)
                notes.append(f"{trio.name}: indexes {sorted(indexes)}, {len(etags)} tag(s) across the three")
                watching[trio.name] = await _consumers(trio, http, stack)
            await asyncio.sleep(3)  # each has its first copy
            counted = {name: [c.requests for c in cs] for name, (cs, _) in watching.items()}
            await asyncio.sleep(args.idle_seconds)
            for trio in (shared, alone):
                consumers, _ = watching[trio.name]
                for consumer, before in zip(consumers, counted[trio.name], strict=True):
                    made = consumer.requests - before
                    idle.append((trio.name, consumer.kind, made, made * 60 / args.idle_seconds))
            for trio in (shared, alone):
                consumers, tasks = watching[trio.name]
                timeout = 30 if trio.webhook else args.poll_interval * 5 + 10
                before = [c.requests for c in consumers]
                for kind, values in (await _latencies(trio, consumers, args.changes, timeout)).items():
                    latency.append((trio.name, kind, values))
                for c, asked in zip(consumers, before, strict=True):
                    notes.append(
                        f"{trio.name} {c.kind}: {c.requests - asked} requests for {args.changes} changes"
                    )
                for c in consumers:
                    if isinstance(c, RawLoop):
                        notes.append(f"{trio.name} {c.kind}: answers {dict(sorted(c.statuses.items()))}")
                await _stop(tasks)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    names = {
        "redis": "with Redis (webhook + fan-out)",
        "alone": f"without Redis (pull every {args.poll_interval:g} s)",
    }
    print(f"| idle consumer, {args.idle_seconds:g} s, wait=15s | trio | requests | per minute |")
    print("|---|---|---:|---:|")
    for name, kind, made, rate in idle:
        print(f"| {kind} | {names[name]} | {made} | {rate:.1f} |")
    print()
    print(
        f"| a change ({args.changes} each) reaching the consumer | trio "
        "| after the last replica applied it: p50 | p99 | max | after the push: p50 | p99 | max |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, kind, (after_last, after_push) in latency:
        print(f"| {kind} | {names[name]} | {_ms(after_last)} | {_ms(after_push)} |")
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    asyncio.run(main())

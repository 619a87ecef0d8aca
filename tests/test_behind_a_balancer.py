"""Consumers behind a balancer without affinity (docs/reference.md §9, §12; docs/deploy.md): three
real `switchboard serve` replicas from one bare remote, Debian's `redis-server`, and a per-request
round-robin proxy in front, all on loopback. Their event logs differ (one restarted with a fresh
log); one is held back while the others apply a change. A raw HTTP consumer holding its tag makes
about one request per wait period, and never sees a change and then loses it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.client import Switchboard
from tests.conftest import SopsProject, until
from tests.support.balancer import RoundRobin, round_robin
from tests.support.replicas import Checkout, RedisServer, Replica, clone, free_port, replica_env, server_yaml
from tests.test_replicas import PAYLOAD, SECRET, all_serve, signed

API = "/api/v1/llm-config"
WAIT_S = 2.0

pytestmark = pytest.mark.timeout(120)


def member(tmp_path: Path, bare: Path, key: Path, name: str, **settings: str) -> Replica:
    checkout = clone(bare, tmp_path / name)
    env = replica_env(
        key, git_pull="origin/main", git_pull_interval_s="3600", webhook_secret=SECRET, **settings
    )
    return Replica(name, checkout.root, checkout.providers, free_port(), env, tmp_path)


class Consumer:
    """The raw HTTP loop of docs/reference.md §9: `If-None-Match` with `?wait=`, through the proxy."""

    def __init__(self, proxy: RoundRobin, http: aiohttp.ClientSession) -> None:
        self.proxy, self.http = proxy, http
        self.tag: str | None = None
        self.requests = 0
        self.seen: list[tuple[float, str, str]] = []  # (when, replica, base_url) of each 200
        self.statuses: list[int] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            headers = {"If-None-Match": self.tag} if self.tag else {}
            self.requests += 1
            url = f"{self.proxy.url}{API}/active/chat?wait={WAIT_S}s"
            async with self.http.get(url, headers=headers) as answer:
                self.statuses.append(answer.status)
                if answer.status == 200:
                    body: Any = await answer.json()
                    self.tag = answer.headers["ETag"]
                    replica = answer.headers["X-Switchboard-Replica"]
                    self.seen.append((time.monotonic(), replica, body["primary"][0]["base_url"]))
                else:
                    assert answer.status == 304, await answer.text()


async def started(trio: tuple[Replica, ...], http: aiohttp.ClientSession) -> None:
    """Start each replica on `http`, then wait until every one is ready."""
    for m in trio:
        m.http = http
        await m.start()
    for m in trio:
        await m.wait_ready()


async def test_a_consumer_behind_a_round_robin_neither_loops_nor_steps_back(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    key = sops_project.identity.key_file
    server = RedisServer(tmp_path / "redis")
    one = member(tmp_path, bare, key, "r1", redis_url=server.url)
    two = member(tmp_path, bare, key, "r2", redis_url=server.url)
    three = member(tmp_path, bare, key, "r3")  # no Redis: held back until its own pull
    trio = (one, two, three)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await started(trio, http)
            # a first change everywhere, then r2 again with a fresh event log: its index is not
            # the others' (as a pod replaced with a new emptyDir)
            author.commit({"gpu.yaml": server_yaml("gpu", 7001)})
            author.push()
            for m in (one, three):
                status, _ = await m.post(f"{API}/hooks/git", PAYLOAD, **signed(PAYLOAD))
            first = author.head()
            await until(lambda: all_serve(trio, first), 15, "the first change everywhere")
            await two.stop()
            two.events_file.unlink()
            await two.start()
            await two.wait_ready()
            indexes = set()
            for m in trio:
                async with http.get(f"{m.url}{API}/active/chat") as answer:
                    indexes.add((answer.headers["X-Switchboard-Index"], answer.headers["ETag"]))
            assert len({tag for _, tag in indexes}) == 1, indexes  # one commit: one tag
            assert len({index for index, _ in indexes}) > 1, indexes  # whatever their logs hold

            async with round_robin([m.url for m in trio]) as proxy:
                consumer = Consumer(proxy, http)
                stop = asyncio.Event()
                loop = asyncio.create_task(consumer.run(stop))
                # idle: about one request per wait period, whichever replica takes each
                await asyncio.sleep(3 * WAIT_S + 0.5)
                idle = consumer.requests
                assert idle <= 5, (idle, consumer.statuses)

                # a change reaches r1 (webhook) and r2 (fan-out); r3 is held back
                author.commit({"gpu.yaml": server_yaml("gpu", 7777)})
                author.push()
                status, _ = await one.post(f"{API}/hooks/git", PAYLOAD, **signed(PAYLOAD))
                assert status == 202
                new = author.head()
                await until(lambda: all_serve((one, two), new), 15, "r1 and r2 serve the change")
                assert await three.commit() != new
                await until(lambda: _saw(consumer, "7777"), 10, "the consumer sees the change")
                # through r3 too, which is behind: held, never the old content
                await asyncio.sleep(3 * WAIT_S)
                status, _ = await three.post(f"{API}/hooks/git", PAYLOAD, **signed(PAYLOAD))
                await until(lambda: all_serve(trio, new), 15, "r3 catches up")
                applied = time.monotonic()
                await asyncio.sleep(WAIT_S)
                stop.set()
                await asyncio.wait_for(loop, 3 * WAIT_S + 5)
    finally:
        await asyncio.gather(*(m.stop() for m in trio))
        server.stop()
    urls = [url for _, _, url in consumer.seen]
    first_new = urls.index("http://127.0.0.1:7777/v1")
    assert all(u == "http://127.0.0.1:7777/v1" for u in urls[first_new:]), consumer.seen  # no step back
    assert applied > 0
    # ~one request per wait while idle, plus the change: no busy loop anywhere in the run
    assert consumer.requests <= 30, (consumer.requests, consumer.statuses)


async def _saw(consumer: Consumer, port: str) -> bool:
    return any(port in url for _, _, url in consumer.seen)


async def test_the_python_client_behind_a_round_robin_sees_each_change_soon_after_the_last_replica(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """docs/reference.md §9 measured with the Python client itself: three replicas (no Redis,
    each told by its own webhook) behind a per-request round-robin; a change reaches the client
    within 500 ms of the last replica applying it (asserted with room for a loaded machine), and
    idle it asks about once per `wait`."""
    bare, author = remote
    key = sops_project.identity.key_file
    trio = tuple(member(tmp_path, bare, key, f"r{i}") for i in (1, 2, 3))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await started(trio, http)
            async with (
                round_robin([m.url for m in trio]) as proxy,
                Switchboard(proxy.url, wait_s=WAIT_S) as sb,
            ):
                assert await sb.get_active_llm_provider("chat") is not None
                for port in (7301, 7302):
                    version = sb.version
                    author.commit({"gpu.yaml": server_yaml("gpu", port)})
                    author.push()
                    new = author.head()
                    waiting = asyncio.create_task(sb.wait_for_change(version, timeout_s=20))
                    for m in trio:
                        status, _ = await m.post(f"{API}/hooks/git", PAYLOAD, **signed(PAYLOAD))
                        assert status == 202
                    await until(lambda: all_serve(trio, new), 15, "every replica serves the change")  # noqa: B023
                    applied = time.monotonic()
                    await asyncio.wait_for(waiting, 15)
                    assert time.monotonic() - applied < 1.5
                    chat = await sb.get_active_llm_provider("chat")
                    assert (
                        chat is not None and chat.base_url == f"http://127.0.0.1:{port}/v1" and not chat.stale
                    )
                await asyncio.sleep(0.5)
                before = len(proxy.sent)
                await asyncio.sleep(3 * WAIT_S + 0.5)
                assert len(proxy.sent) - before <= 5, proxy.sent[before:]
    finally:
        await asyncio.gather(*(m.stop() for m in trio))

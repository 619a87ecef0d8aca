"""Many replicas (docs/reference.md §12), whole: three `switchboard serve` processes, each with its own clone,
port and event log, a bare repository as the remote, and Debian's `redis-server`, all on
loopback. Each test starts its own replicas; every wait is bounded and polled, never slept.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SopsProject, until
from tests.support.replicas import (
    Checkout,
    GitSync,
    RedisServer,
    Replica,
    clone,
    free_port,
    git,
    replica_env,
    replicas,
    routing_yaml,
    server_yaml,
)

API = "/api/v1/llm-config"
SECRET = "whsec-replicas-0123456789"
PAYLOAD = json.dumps({"ref": "refs/heads/main"}).encode()

pytestmark = pytest.mark.timeout(90)


def signed(body: bytes) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


async def all_serve(members: tuple[Replica, ...], commit: str) -> bool:
    commits = await asyncio.gather(*(m.commit() for m in members))
    return all(c == commit for c in commits)


def members(
    tmp_path: Path, bare: Path, key_file: Path, count: int = 3, **settings: str
) -> tuple[Replica, ...]:
    found = []
    for i in range(1, count + 1):
        name = f"r{i}"
        checkout = clone(bare, tmp_path / name)
        env = replica_env(
            key_file,
            git_pull="origin/main",
            git_push="origin",
            webhook_secret=SECRET,
            **settings,
        )
        found.append(Replica(name, checkout.root, checkout.providers, free_port(), env, tmp_path))
    return tuple(found)


@asynccontextmanager
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


async def listed(member: Replica) -> dict[str, Any]:
    status, body = await member.get(f"{API}/replicas")
    assert status == 200, body
    return dict(body)


# -- with Redis: a webhook to one, fan-out to all; a write on one reaching all; a restart -------------


async def test_a_push_signalled_to_one_replica_reaches_all_three_and_so_does_a_write(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    key = sops_project.identity.key_file
    async with redis(tmp_path) as server:
        trio = members(tmp_path, bare, key, redis_url=server.url, git_pull_interval_s="3600")
        async with replicas(*trio) as (one, two, three):

            async def all_listed() -> bool:
                body = await listed(three)
                return body["shared"] and [r["replica"] for r in body["replicas"]] == ["r1", "r2", "r3"]

            await until(all_listed, 10, "three replicas heard of each other")

            # a push, and a webhook to one replica only: the fan-out brings the others
            pushed = author.commit(
                {"spare.yaml": server_yaml("spare", 11), "routing.yaml": routing_yaml("spare")}
            )
            author.push()
            status, _ = await one.post(f"{API}/hooks/git", PAYLOAD, **signed(PAYLOAD))
            assert status == 202
            took = await until(lambda: all_serve(trio, pushed), 2.0, "all three serve the push")
            assert took < 2.0
            status, route = await two.get(f"{API}/active/chat")
            assert status == 200 and [p["id"] for p in route["primary"]] == ["spare"]

            # a write on one replica: pushed, applied there, and fanned out to the others
            body = {"id": "third", "server_type": "vllm", "base_url": "http://127.0.0.1:12/v1"}
            assert two.http is not None
            async with two.http.post(two.url + f"{API}/servers", json=body) as response:
                assert response.status == 201, await response.text()
                written = (await response.json())["commit"]
            assert written == git(bare, "rev-parse", "main")
            await until(lambda: all_serve(trio, written), 2.0, "all three serve the write")

            async def converged() -> bool:
                body = await listed(one)
                return {r["commit"] for r in body["replicas"]} == {written} and len(body["replicas"]) == 3

            await until(converged, 5, "/replicas shows all three on the write's commit")

            # a replica killed, the remote moving on meanwhile, the replica back: it catches up
            await three.stop(signal.SIGKILL)
            author.pull()  # the write above is on the remote now
            later = author.commit({"spare.yaml": server_yaml("spare", 13)})
            author.push()
            status, _ = await one.post(f"{API}/hooks/git", PAYLOAD, **signed(PAYLOAD))
            assert status == 202
            await until(lambda: all_serve((one, two), later), 2.0, "the two left serve the push")
            await three.start()
            await three.wait_ready()
            await until(lambda: all_serve(trio, later), 5.0, "the restarted replica caught up")


# -- Redis killed mid-run: the replicas serve on, and converge by polling ---------------------------------


async def test_redis_killed_mid_run_changes_nothing_but_convergence_speed(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    key = sops_project.identity.key_file
    async with redis(tmp_path) as server:
        trio = members(tmp_path, bare, key, redis_url=server.url, git_pull_interval_s="1")
        async with replicas(*trio) as (one, _, _):

            async def shared() -> bool:
                return bool((await listed(one))["shared"])

            await until(shared, 10, "the fan-out is up")
            server.stop()

            async def alone() -> bool:
                return not (await listed(one))["shared"]

            await until(alone, 10, "the fan-out noticed Redis is gone")
            pushed = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
            author.push()
            status, _ = await one.post(f"{API}/hooks/git", PAYLOAD, **signed(PAYLOAD))
            assert status == 202
            await until(lambda: all_serve(trio, pushed), 5.0, "all three serve the push, by polling")
            for member in trio:
                status, _ = await member.get(f"{API}/active/chat")
                assert status == 200


# -- without Redis: polling; and a diverged replica that goes on serving --------------------------------


async def test_without_redis_replicas_converge_by_polling_and_a_diverged_one_is_reported(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    key = sops_project.identity.key_file
    trio = members(tmp_path, bare, key, git_pull_interval_s="0.5")
    diverged = Checkout(trio[2].root)
    local = diverged.commit({"gpu.yaml": server_yaml("gpu", 66)}, "a commit only this replica has")
    async with replicas(*trio) as (one, two, three):
        pushed = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        await until(lambda: all_serve((one, two), pushed), 5.0, "the two clean replicas pull the push")

        async def reported() -> bool:
            _, body = await three.get("/readyz")
            return bool(body["sync"]["remote_commit"] == pushed)

        await until(reported, 5.0, "the diverged replica fetched the push")
        status, body = await three.get("/readyz")
        assert status == 200 and body["last_applied_commit"] == local
        assert body["sync"]["status"] == "failed" and body["sync"]["remote_commit"] == pushed
        assert "diverged" in body["sync"]["reason"]
        status, route = await three.get(f"{API}/active/chat")
        assert status == 200 and route["primary"][0]["base_url"] == "http://127.0.0.1:66/v1"
        assert diverged.head() == local
        body = await listed(one)
        assert body == {"replicas": body["replicas"], "shared": False} and len(body["replicas"]) == 1
    events = [json.loads(line) for line in three.events_file.read_text().splitlines()]
    # one event per distinct failure, many polls: ahead of the remote at first, then diverged
    failures = [(e["remote_commit"], e["reason"]) for e in events if e["type"] == "sync.failed"]
    assert len(failures) == len(set(failures)) <= 2 and failures[-1][0] == pushed


# -- git-sync: the link swapped under a running process --------------------------------------------------


async def test_a_git_sync_swap_is_served_by_a_running_process_within_a_second(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    sync = GitSync(tmp_path / "git", bare)
    sync.sync()
    env = replica_env(sops_project.identity.key_file, rescan_s="60")
    member = Replica("synced", sync.link, sync.providers, free_port(), env, tmp_path)
    async with replicas(member):
        pushed = author.commit(
            {"spare.yaml": server_yaml("spare", 11), "routing.yaml": routing_yaml("spare")}
        )
        author.push()
        sync.sync()
        took = await until(lambda: all_serve((member,), pushed), 1.0, "the swap is served")
        assert took < 1.0
        status, route = await member.get(f"{API}/active/chat")
        assert status == 200 and route["commit"] == pushed

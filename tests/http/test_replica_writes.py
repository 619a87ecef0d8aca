"""Writes on a replica (docs/reference.md §12): pushed to the remote first, applied after, under its commit.

A replica fed by the built-in pull moves its own branch once the push landed; one fed by
git-sync never touches git-sync's checkout, and answers once git-sync has brought the commit
back (or 202, pending, when it does not within the wait). Without SWITCHBOARD_GIT_PUSH both
refuse with 405.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from service.http.context import PULLER, WRITER
from tests.conftest import Service, SopsProject, eventually, serve
from tests.support.replicas import Checkout, GitSync, clone, git, server_yaml

SERVERS = "/api/v1/llm-config/servers"
NEW = {"id": "spare", "server_type": "vllm", "base_url": "http://127.0.0.1:11/v1", "purposes": ["chat"]}


async def write(service: Service, body: dict[str, Any] = NEW) -> tuple[int, Any]:
    async with service.http.post(service.url + SERVERS, json=body) as response:
        return response.status, await response.json()


@contextlib.asynccontextmanager
async def git_sync_running(sync: GitSync, period_s: float = 0.05) -> AsyncIterator[None]:
    """git-sync's loop: fetch, and publish whatever is new, every `period_s`."""

    async def loop() -> None:
        while True:
            await asyncio.to_thread(sync.sync)
            await asyncio.sleep(period_s)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- without a push, nothing ------------------------------------------------------------------------


async def test_a_replica_that_pulls_refuses_writes_without_a_push(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    mine = clone(bare, tmp_path / "replica")
    before = mine.head()
    settings = {"root": mine.root, "providers": mine.providers, "git_pull": "origin/main"}
    async with serve(sops_project, **settings) as service:
        status, body = await write(service)
        assert status == 405 and "SWITCHBOARD_GIT_PUSH" in body["error"]["message"]
    assert mine.head() == before and not (mine.providers / "spare.yaml").exists()


async def test_a_git_sync_replica_refuses_writes_without_a_push(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    sync = GitSync(tmp_path / "git", bare)
    sync.sync()
    async with serve(sops_project, root=sync.link, providers=sync.providers) as service:
        status, body = await write(service)
        assert status == 405
        assert "git-sync" in body["error"]["message"] and "SWITCHBOARD_GIT_PUSH" in body["error"]["message"]


WHATEVER_THE_BODY = [
    ("POST", "/api-keys", {}),
    ("POST", SERVERS, {"id": "NOT A NAME"}),
    ("PUT", "/active/chat", {"primary": "nobody"}),
    ("POST", "/active", {"purpose": "chat"}),
    ("PATCH", SERVERS + "/gpu", {"base_url": "not a url"}),
    ("DELETE", SERVERS + "/nobody", None),
]


@pytest.mark.parametrize("synced", [False, True], ids=["pull", "git-sync"])
async def test_a_replica_without_a_push_refuses_every_write_with_405_before_judging_its_body(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, synced: bool
) -> None:
    """§12 "a write needs SWITCHBOARD_GIT_PUSH (otherwise 405, saying why)": a write that could
    never be made here is not told how to fix its body (a create's body was judged first: 422)."""
    bare, _ = remote
    if synced:
        sync = GitSync(tmp_path / "git", bare)
        sync.sync()
        settings: dict[str, Any] = {"root": sync.link, "providers": sync.providers}
    else:
        mine = clone(bare, tmp_path / "replica")
        settings = {"root": mine.root, "providers": mine.providers, "git_pull": "origin/main"}
    async with serve(sops_project, **settings) as service:
        for method, path, body in WHATEVER_THE_BODY:
            url = service.url + (path if path.startswith("/api/") else "/api/v1/llm-config" + path)
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": "application/json"}
            async with service.http.request(method, url, data=data, headers=headers) as response:
                answer = await response.json()
                assert (response.status, response.headers.get("Allow")) == (405, "GET, HEAD"), (path, answer)
                assert "SWITCHBOARD_GIT_PUSH" in answer["error"]["message"]


async def test_an_empty_push_variable_is_no_push_and_a_replica_that_pulls_refuses_writes(
    sops_project: SopsProject,
    remote: tuple[Path, Checkout],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/reference.md §12: with the built-in pull a write needs `SWITCHBOARD_GIT_PUSH` (405
    otherwise), so no replica serves a commit the remote lacks. `SWITCHBOARD_GIT_PUSH=` (a
    variable a template left empty) counted as set: the write was committed here alone, answered
    201 and served, the remote never had it, and the branch could no longer fast-forward."""
    bare, _ = remote
    mine = clone(bare, tmp_path / "replica")
    before = mine.head()
    monkeypatch.setenv("SWITCHBOARD_GIT_PUSH", "")
    monkeypatch.setenv("SWITCHBOARD_GIT_PULL", " ")
    settings = {"root": mine.root, "providers": mine.providers}
    async with serve(sops_project, **settings) as service:
        assert service.app.get(PULLER) is None  # an empty pull variable is no pull either
    monkeypatch.setenv("SWITCHBOARD_GIT_PULL", "origin/main")
    async with serve(sops_project, **settings) as service:
        status, body = await write(service)
        assert status == 405 and "SWITCHBOARD_GIT_PUSH" in body["error"]["message"], body
    assert mine.head() == before == git(bare, "rev-parse", "main")
    assert not (mine.providers / "spare.yaml").exists()


# -- with the built-in pull -------------------------------------------------------------------------------


async def test_a_write_on_a_replica_that_pulls_is_pushed_first_then_applied_under_the_remote_commit(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    # Someone pushed meanwhile: the write lands on top of it, and the replica gets both.
    theirs = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
    author.push()
    settings = {
        "root": mine.root,
        "providers": mine.providers,
        "git_pull": "origin/main",
        "git_pull_interval_s": 3600,
        "git_push": "origin",
    }
    async with serve(sops_project, **settings) as service:
        pull = service.app[PULLER]
        results = await asyncio.gather(write(service), *(pull.pull() for _ in range(3)))
        status, body = results[0]
        assert status == 201, body
        remote_main = git(bare, "rev-parse", "main")
        assert body["commit"] == remote_main and mine.head() == remote_main
        assert git(bare, "rev-parse", "main~1") == theirs
        assert service.registry.state.last_applied_commit == remote_main
        assert service.registry.snapshot.providers["gpu"].endpoint == "http://127.0.0.1:10/v1"
        assert pull.status.status == "ok" and await pull.pull() == "unchanged"


# -- with git-sync ------------------------------------------------------------------------------------------


async def test_a_write_on_a_git_sync_replica_is_answered_once_git_sync_brings_it_back(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    sync = GitSync(tmp_path / "git", bare)
    first = sync.sync()
    worktree = sync.link.resolve()
    settings = {"root": sync.link, "providers": sync.providers, "git_push": str(bare)}
    async with serve(sops_project, **settings) as service, git_sync_running(sync):
        status, body = await write(service)
        assert status == 201, body
        remote_main = git(bare, "rev-parse", "main")
        assert body["commit"] == remote_main and git(bare, "rev-parse", "main~1") == first
        assert service.registry.state.last_applied_commit == remote_main
        assert body["generation"] == service.registry.snapshot.generation
        assert "spare" in service.registry.snapshot.providers
        assert sync.link.resolve() != worktree  # served from git-sync's new worktree
        assert not (worktree / "providers.d" / "spare.yaml").exists()  # the old one was never touched


async def test_a_write_git_sync_does_not_bring_back_in_time_is_202_pending(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    sync = GitSync(tmp_path / "git", bare)
    first = sync.sync()
    settings = {"root": sync.link, "providers": sync.providers, "git_push": str(bare)}
    async with serve(sops_project, **settings) as service:
        service.app[WRITER].apply_wait_s = 0.3
        status, body = await write(service)
        assert status == 202, body
        remote_main = git(bare, "rev-parse", "main")
        assert body == {"pending": True, "commit": remote_main, "file": "providers.d/spare.yaml"}
        assert git(sync.link, "rev-parse", "HEAD") == first  # git-sync's checkout is as it was
        assert service.registry.state.last_applied_commit == first
        sync.sync()  # git-sync comes round

        async def served() -> bool:
            return service.registry.state.last_applied_commit == remote_main

        await eventually(served, timeout=2)
        assert "spare" in service.registry.snapshot.providers


async def test_concurrent_writes_on_a_git_sync_replica_all_land_in_one_order(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    sync = GitSync(tmp_path / "git", bare)
    sync.sync()
    settings = {"root": sync.link, "providers": sync.providers, "git_push": str(bare)}
    async with serve(sops_project, **settings) as service, git_sync_running(sync):
        bodies = [NEW | {"id": f"s{i}", "base_url": f"http://127.0.0.1:{20 + i}/v1"} for i in range(3)]
        results = await asyncio.gather(*(write(service, b) for b in bodies))
        assert [s for s, _ in results] == [201, 201, 201], results
        log = git(bare, "log", "--format=%s", "main").splitlines()
        assert sorted(log[:3]) == ["create ai_server s0", "create ai_server s1", "create ai_server s2"]
        assert {"s0", "s1", "s2"} <= set(service.registry.snapshot.providers)

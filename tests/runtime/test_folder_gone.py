"""The watcher when `providers.d/` itself goes (docs/reference.md §4).

git removes a folder a commit empties: after `git rm` of every file and a commit (a pull, a
checkout, a git-sync worktree of such a commit) there is no `providers.d/`, and the
configuration is empty, as a replica started fresh at that commit serves it. A folder missing
while the commit served still holds it (deleted by hand), or outside git, is no removal: its
files are refused and their last good versions stay. Real git, a real watcher, a real service.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from service.http.context import EVENTS, LIMITS, RELOADER
from service.runtime.registry import CLIENTS_GONE, Outcome
from tests.conftest import (
    Service,
    SopsProject,
    eventually,
    git,
    git_init,
    serve,
    write_atomically,
    write_routing,
    write_server,
)
from tests.http.test_auth import TOKEN, clients_yaml
from tests.http.test_push import API, get
from tests.http.test_tag_commit import list_tags
from tests.http.test_tag_holds import commit_all
from tests.http.test_write_api import call
from tests.support.replicas import GitSync, make_remote, routing_yaml, server_yaml

pytestmark = pytest.mark.timeout(60)

WATCHER = "service.runtime.watcher"
UNREADABLE = {"providers.d/a.yaml": "unreadable folder", "providers.d/routing.yaml": "unreadable folder"}


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WATCHER and r.levelno >= logging.ERROR]


def committed(project: SopsProject) -> str:
    """`a` routed for chat, committed in a new repository at the project's root; the commit."""
    git_init(project.root)
    (project.root / ".gitignore").write_text("var/\n")
    write_server(project, "a")
    write_routing(project, ["a"])
    return commit_all(project, "setup")


@pytest.fixture
async def running(sops_project: SopsProject) -> AsyncIterator[Service]:
    """The service on `committed`, with no periodic rescan within a test: what is seen is seen
    by the watch (or the watch of a missing folder)."""
    committed(sops_project)
    async with serve(sops_project, rescan_s=60) as service:
        yield service


async def served(service: Service) -> list[str]:
    return [p["id"] for p in (await get(service, API + "/providers")).json()["providers"]]


async def test_a_commit_removing_every_file_empties_the_configuration_as_a_fresh_replica_has_it(
    running: Service, tmp_path: Path
) -> None:
    service, project = running, running.project
    seq = service.app[EVENTS].last_seq
    git(project.root, "rm", "-r", "-q", "providers.d")
    removed = commit_all(project, "drop every provider")
    assert not project.providers.exists()  # git removed the folder its last file left

    def emptied() -> None:
        state = service.registry.state
        assert state.last_applied_commit == removed and state.snapshot.providers == {}

    await eventually(emptied, timeout=3)
    state = service.registry.state
    assert state.refused == {} and state.snapshot.routing is None
    assert await served(service) == []
    _, ready = await service.get("/readyz")
    assert ready["degraded"] is False and ready["last_applied_commit"] == removed
    changes = [(e.type, e.subject, e.commit) for e in service.app[EVENTS].events()[seq:]]
    assert sorted(changes) == [("provider.removed", "a", removed), ("routing.updated", "routing", removed)]
    running_tags = await list_tags(service)
    clone = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(project.root), str(clone))
    assert not (clone / "providers.d").exists()
    async with serve(replace(project, root=clone, providers=clone / "providers.d")) as fresh:
        assert fresh.registry.state.last_applied_commit == removed
        assert await served(fresh) == []
        assert await list_tags(fresh) == running_tags


async def test_a_folder_a_later_commit_brings_back_is_served_again(running: Service) -> None:
    service, project = running, running.project
    git(project.root, "rm", "-r", "-q", "providers.d")
    removed = commit_all(project, "drop every provider")
    await eventually(lambda: service.registry.state.last_applied_commit == removed, timeout=3)
    assert await served(service) == []
    git(project.root, "revert", "--no-edit", "HEAD")  # the folder and its files, made by git
    back = git(project.root, "rev-parse", "HEAD")
    started = time.monotonic()
    await eventually(lambda: set(service.registry.snapshot.providers) == {"a"}, timeout=3)
    assert time.monotonic() - started < 1.0  # seen by a watch, not found by a rescan
    assert await served(service) == ["a"] and service.registry.refused == {}
    await service.app[RELOADER].reload()  # the commit itself changed no file: seen at a rescan
    assert service.registry.state.last_applied_commit == back
    write_server(project, "b")  # and the folder that came back is watched as any
    await eventually(lambda: "b" in service.registry.snapshot.providers, timeout=3)


async def test_a_clients_file_gone_with_the_folder_keeps_authentication_on(sops_project: SopsProject) -> None:
    """As after the clients file's own removal (docs/reference.md §6.1): never turned off while
    the service runs."""
    committed(sops_project)
    write_atomically(sops_project.providers / "clients.yaml", clients_yaml("config:read"))
    commit_all(sops_project, "clients")
    async with serve(sops_project, rescan_s=60) as service:
        git(sops_project.root, "rm", "-r", "-q", "providers.d")
        removed = commit_all(sops_project, "drop every file")
        await eventually(lambda: service.registry.state.last_applied_commit == removed, timeout=3)
        assert service.registry.snapshot.providers == {}
        assert service.registry.refused == {"providers.d/clients.yaml": CLIENTS_GONE}
        assert (await service.get(API + "/providers"))[0] == 401
        status, body = await service.get(API + "/providers", TOKEN)
        assert (status, body["providers"]) == (200, [])


async def test_a_write_deleting_the_last_file_is_applied(sops_project: SopsProject) -> None:
    """A write is a commit (docs/reference.md §8), and its files come as a checkout leaves them:
    the folder the deletion of the last file empties goes. The write was undone, refused as an
    `unreadable folder`."""
    git_init(sops_project.root)
    (sops_project.root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "a")
    commit_all(sops_project, "setup")
    async with serve(sops_project, rescan_s=60) as service:
        status, answer, _ = await call(service, "DELETE", "/servers/a")
        assert status == 200, answer
        assert not sops_project.providers.exists()
        state = service.registry.state
        assert state.snapshot.providers == {} and state.refused == {}
        assert state.last_applied_commit == answer["commit"] == git(sops_project.root, "rev-parse", "HEAD")


async def test_a_folder_deleted_by_hand_keeps_the_last_good_files_and_says_so_once(
    running: Service, caplog: pytest.LogCaptureFixture
) -> None:
    service, project = running, running.project
    head = git(project.root, "rev-parse", "HEAD")
    caplog.set_level(logging.INFO, logger=WATCHER)
    shutil.rmtree(project.providers)  # HEAD still holds the files: not a removal
    await eventually(lambda: service.registry.refused == UNREADABLE, timeout=3)
    for _ in range(3):
        await service.app[RELOADER].reload()
    applies: list[Outcome] = []
    service.registry.on_apply.append(applies.append)
    await eventually(lambda: len(applies) >= 2, timeout=5)  # the watch of it looks every second too
    assert set(service.registry.snapshot.providers) == {"a"}
    assert service.registry.state.last_applied_commit == head
    [error] = errors(caplog)
    assert error.startswith(f"cannot list {project.providers}: No such file or directory")
    assert f"commit {head[:12]} (HEAD) holds it" in error
    git(project.root, "checkout", "-q", "--", "providers.d")  # git puts it back
    await eventually(lambda: service.registry.refused == {}, timeout=3)
    assert f"{project.providers} can be listed again" in caplog.messages


async def test_outside_git_a_folder_deleted_keeps_the_last_good_files_and_says_so_once(
    running_service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    service, project = running_service, running_service.project
    caplog.set_level(logging.INFO, logger=WATCHER)
    aside = project.root / "providers.d.aside"
    shutil.copytree(project.providers, aside)
    shutil.rmtree(project.providers)
    gone = {"providers.d/gpu.yaml": "unreadable folder", "providers.d/routing.yaml": "unreadable folder"}
    await eventually(lambda: service.registry.refused == gone, timeout=3)
    for _ in range(3):
        await service.app[RELOADER].reload()
    assert "gpu" in service.registry.snapshot.providers
    [error] = errors(caplog)
    assert error.startswith(f"cannot list {project.providers}: No such file or directory")
    aside.rename(project.providers)
    write_server(project, "back")
    await eventually(lambda: "back" in service.registry.snapshot.providers)
    assert service.registry.refused == {}


async def test_a_fresh_clone_without_the_folder_serves_an_empty_configuration_quietly(
    sops_project: SopsProject, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    committed(sops_project)
    git(sops_project.root, "rm", "-r", "-q", "providers.d")
    removed = commit_all(sops_project, "drop every provider")
    clone = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(sops_project.root), str(clone))
    caplog.set_level(logging.INFO, logger=WATCHER)
    async with serve(replace(sops_project, root=clone, providers=clone / "providers.d")) as service:
        for _ in range(3):
            await service.app[RELOADER].reload()
        state = service.registry.state
        assert state.last_applied_commit == removed and state.refused == {}
        assert await served(service) == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    said = [r.getMessage() for r in caplog.records if r.name == WATCHER]  # one line, not one a rescan
    assert said == [f"{clone}/providers.d is not in commit {removed} (HEAD): no providers are served from it"]


async def test_a_git_sync_swap_to_a_commit_without_the_folder_empties_the_configuration(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    (sops_project.providers / "a.yaml").write_text(server_yaml("a", 9))
    (sops_project.providers / "routing.yaml").write_text(routing_yaml("a"))
    remote, author = make_remote(tmp_path, sops_project.root)
    sync = GitSync(tmp_path / "git", remote)
    sync.sync()
    async with serve(sops_project, root=sync.link, providers=sync.providers, rescan_s=60) as service:
        git(author.root, "rm", "-r", "-q", "providers.d")
        git(author.root, "commit", "-q", "-m", "drop every provider")
        author.push()
        removed = sync.sync()  # the old worktree, read last, is removed
        await eventually(lambda: service.registry.state.last_applied_commit == removed, timeout=1.0)
        assert service.registry.snapshot.providers == {} and service.registry.refused == {}
        removals = [e for e in service.events() if e.type == "provider.removed"]
        assert [(e.subject, e.commit) for e in removals] == [("a", removed)]
        author.providers.mkdir()
        back = author.commit({"a.yaml": server_yaml("a", 12), "routing.yaml": routing_yaml("a")})
        author.push()
        sync.sync()
        await eventually(lambda: service.registry.state.last_applied_commit == back, timeout=1.0)
        assert service.registry.snapshot.providers["a"].endpoint == "http://127.0.0.1:12/v1"


async def test_a_nested_folder_git_removed_with_the_folder_holding_it_is_empty_as_a_fresh_replica_has_it(
    sops_project: SopsProject, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--providers config/providers.d`: git removes every folder a commit empties, up to the
    repository's top, so `config/` goes with the folder. A write deleting the last provider was
    undone (409, `unreadable folder`); a commit doing so left `a` served for ever (while /readyz
    named that commit), where a fresh replica at that commit serves nothing."""
    git_init(sops_project.root)
    (sops_project.root / ".gitignore").write_text("var/\n")
    nested = replace(sops_project, providers=sops_project.root / "config" / "providers.d")
    nested.providers.mkdir(parents=True)
    write_server(nested, "a")
    commit_all(nested, "setup")
    caplog.set_level(logging.INFO, logger=WATCHER)
    async with serve(nested, rescan_s=60) as service:
        status, answer, _ = await call(service, "DELETE", "/servers/a")  # a commit, checked out
        assert status == 200, answer
        removed = answer["commit"]
        assert not (nested.root / "config").exists()  # git removed the folder holding it too
        state = service.registry.state
        assert state.last_applied_commit == removed == git(nested.root, "rev-parse", "HEAD")
        assert state.snapshot.providers == {} and state.refused == {}
        tags = await list_tags(service)
        clone = tmp_path / "fresh"
        git(tmp_path, "clone", "-q", str(nested.root), str(clone))
        async with serve(replace(nested, root=clone, providers=clone / "config" / "providers.d")) as fresh:
            assert fresh.registry.state.last_applied_commit == removed
            assert await served(fresh) == [] and await list_tags(fresh) == tags
        git(nested.root, "revert", "--no-edit", "HEAD")  # both made again by git: seen by a watch
        await eventually(lambda: set(service.registry.snapshot.providers) == {"a"}, timeout=3)
        shutil.rmtree(nested.root / "config")  # by hand, HEAD holding it: not a removal
        kept = {"config/providers.d/a.yaml": "unreadable folder"}
        await eventually(lambda: service.registry.refused == kept)
        assert set(service.registry.snapshot.providers) == {"a"}
    head = git(nested.root, "rev-parse", "HEAD")
    assert errors(caplog) == [
        f"cannot list {nested.providers}: No such file or directory"
        f" (commit {head[:12]} (HEAD) holds it); what was loaded from it stays"
    ]


# -- a folder that is there but cannot be listed ------------------------------------------------


@pytest.fixture
def unlistable(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[bool], None]]:
    """`set(True)` makes `providers.d` a folder that cannot be listed (mode 300: files can still be
    written in it, not listed), `set(False)` undoes it. No mode stops root, as the tests may run:
    then listing it fails as the OS fails it for another user (EACCES from `os.scandir`)."""
    folder = sops_project.providers
    denied = False
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if denied and os.fspath(path) in (os.fspath(folder), os.path.realpath(folder)):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "scandir", scandir)

    def set_(value: bool) -> None:
        nonlocal denied
        denied = value
        folder.chmod(0o300 if value else 0o755)

    yield set_
    folder.chmod(0o755)


async def readyz(service: Service) -> tuple[int, Any]:
    return await service.get("/readyz")


async def test_a_fresh_start_on_a_folder_it_cannot_list_is_not_ready_until_it_can(
    sops_project: SopsProject, unlistable: Callable[[bool], None]
) -> None:
    """A fresh replica whose `providers.d` was there but could not be listed (its mode, a mount
    not ready) served an empty configuration and said it was ready: no provider, no route, and
    a load balancer sending it traffic. It is 503 with the reason until the folder can be
    listed, then loads it within the second, as every folder that cannot be listed is rescanned."""
    write_server(sops_project, "a")
    write_routing(sops_project, ["a"])
    unlistable(True)
    async with serve(sops_project, wait_ready=False, rescan_s=60) as service:
        await eventually(lambda: service.registry.state.waiting is not None, timeout=5)
        for _ in range(3):
            await service.app[RELOADER].reload()
        status, body = await readyz(service)
        assert (status, body["error"]["type"]) == (503, "not_ready")
        assert body["error"]["message"] == (
            "the first load of the configuration is not complete: cannot list providers.d: Permission denied"
        )
        assert not service.registry.ready and service.registry.snapshot.providers == {}
        status, body = await service.get(API + "/providers")  # no clients read: no authentication
        assert (status, body["error"]["type"]) == (503, "not_ready")  # is not taken for none
        assert [e.type for e in service.events()] == ["service.started"]  # nothing was taken for removed
        unlistable(False)
        started = time.monotonic()
        await eventually(lambda: service.registry.ready, timeout=3)
        assert time.monotonic() - started < 2.5  # a rescan every second while it cannot be listed
        await eventually(lambda: service.app[LIMITS].ready.is_set(), timeout=3)  # read back after the load
        assert (await readyz(service))[0] == 200
        assert set(service.registry.snapshot.providers) == {"a"} and service.registry.refused == {}
        assert service.registry.state.waiting is None


async def test_a_restart_on_a_folder_it_cannot_list_records_no_removal(
    sops_project: SopsProject, unlistable: Callable[[bool], None]
) -> None:
    """At start the difference between the log and the files is recorded (docs/reference.md §5): read as
    an empty folder, one that could not be listed wrote every provider's `provider.removed`,
    then their `provider.added` once it could, as if they had gone and come back."""
    write_server(sops_project, "a")
    write_routing(sops_project, ["a"])
    async with serve(sops_project) as service:
        before = [e.type for e in service.events()]
    unlistable(True)
    async with serve(sops_project, wait_ready=False, rescan_s=60) as service:
        await eventually(lambda: service.registry.state.waiting is not None, timeout=5)
        unlistable(False)
        await eventually(lambda: service.registry.ready, timeout=3)
        after = [e.type for e in service.events()]
    assert after == [*before, "service.started"]


async def test_a_fresh_start_on_a_link_loop_in_place_of_the_folder_is_not_ready_until_it_is_a_folder(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    """Something that is there but cannot be listed, as any user (no simulation): a link that
    leads to itself (ELOOP), as a half-done deployment may leave it."""
    write_server(sops_project, "a")
    aside = tmp_path / "aside"
    sops_project.providers.rename(aside)
    sops_project.providers.symlink_to(sops_project.providers.name)  # providers.d -> providers.d
    async with serve(sops_project, wait_ready=False, rescan_s=60) as service:
        await eventually(lambda: service.registry.state.waiting is not None, timeout=5)
        status, body = await readyz(service)
        assert status == 503 and "cannot list providers.d: Too many levels of symbolic links" in str(body)
        sops_project.providers.unlink()
        aside.rename(sops_project.providers)
        await eventually(lambda: service.registry.ready, timeout=3)
        assert set(service.registry.snapshot.providers) == {"a"}


async def test_a_running_service_whose_folder_flips_unlistable_keeps_its_files_and_stays_ready(
    sops_project: SopsProject, unlistable: Callable[[bool], None]
) -> None:
    """Once ready, a folder that cannot be listed keeps the last good files (refused, the reason
    said), as a folder deleted by hand does, and `/readyz` stays 200; each time it can be listed
    again what changed meanwhile is loaded (the folder's mode changing is an event of its watch).
    No provider is ever recorded as removed."""
    write_server(sops_project, "a")
    write_routing(sops_project, ["a"])
    unreadable = {"providers.d/a.yaml": "unreadable folder", "providers.d/routing.yaml": "unreadable folder"}
    async with serve(sops_project, rescan_s=60) as service:
        for port in (8001, 8002, 8003):
            unlistable(True)
            await eventually(lambda: service.registry.refused == unreadable, timeout=3)
            status, body = await readyz(service)
            assert (status, body["degraded"]) == (200, True)
            assert service.registry.state.waiting is None
            write_server(
                sops_project, "a", f"http://127.0.0.1:{port}/v1"
            )  # changed while it cannot be listed
            unlistable(False)
            url = f"http://127.0.0.1:{port}/v1"
            await eventually(
                lambda url=url: service.registry.snapshot.providers["a"].endpoint == url, timeout=3
            )
            assert service.registry.refused == {}
        types = [e.type for e in service.events()]
    assert "provider.removed" not in types and types.count("provider.updated") == 3

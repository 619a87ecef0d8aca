"""The built-in pull (docs/reference.md §12) against a real remote: a bare repository, a
replica's clone, real git.

Pulls are run by the test (`Puller.pull`) where their count matters, and otherwise by the
service's own loop; nothing is slept for.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from service.errors import GitError
from service.http.context import EVENTS, PULLER
from service.journal.events import SyncFailed
from service.runtime.registry import Outcome
from service.runtime.scan import LINK_OUT
from service.runtime.sync import Puller, parse_pull
from service.vcs.commit import Committer
from service.vcs.gitrepo import GitRepo
from tests.conftest import Service, SopsProject, eventually, serve
from tests.support.replicas import (
    Checkout,
    GitSync,
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


@asynccontextmanager
async def replica(
    project: SopsProject, checkout: Checkout, interval_s: float = 60, **settings: Any
) -> AsyncIterator[Service]:
    async with serve(
        project,
        root=checkout.root,
        providers=checkout.providers,
        events=checkout.root / "var" / "events.jsonl",
        git_pull="origin/main",
        git_pull_interval_s=interval_s,
        **settings,
    ) as service:
        yield service


def puller(service: Service) -> Puller:
    return service.app[PULLER]


def mine_repo(service: Service) -> GitRepo:
    committer = puller(service).committer
    return committer.repo


def failures(service: Service) -> list[SyncFailed]:
    return [e for e in service.app[EVENTS].events() if isinstance(e, SyncFailed)]


async def test_a_push_is_pulled_and_applied_as_one_generation_under_its_commit(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine, interval_s=0.2) as service:
        outcomes: list[Outcome] = []
        service.registry.on_apply.append(outcomes.append)
        generation = service.registry.snapshot.generation
        # Routing and providers change together: half of the commit would be a refused batch.
        pushed = author.commit(
            {"spare.yaml": server_yaml("spare", 11), "gpu.yaml": None, "routing.yaml": routing_yaml("spare")}
        )
        author.push()
        # the state is set before the registry's thread calls `on_apply`: wait for both
        await eventually(
            lambda: service.registry.state.last_applied_commit == pushed and bool(outcomes), timeout=5
        )
        assert service.registry.snapshot.generation == generation + 1
        assert all(o.applied and o.refused == {} for o in outcomes)
        assert {frozenset(o.snapshot.providers) for o in outcomes} == {frozenset({"spare"})}
        assert mine.head() == pushed and git(mine.root, "status", "--porcelain") == ""
        added = [e for e in service.events() if e.type == "provider.added" and e.subject == "spare"]
        assert [e.commit for e in added] == [pushed]
        _, ready = await service.get("/readyz")
        assert ready["sync"] == {"status": "ok", "reason": None, "remote_commit": pushed}


async def test_requests_during_a_pull_make_one_more_pull_not_one_each(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    async with replica(sops_project, clone(bare, tmp_path / "replica")) as service:
        pull = puller(service)
        await eventually(lambda: pull.status.remote_commit is not None)  # the pull at the start is done
        results: list[str] = []
        pull.on_result = results.append
        async with pull.lock:  # the git lock held: the pull asked for now waits, as if running
            pull.request()
            # The loop took the request (it clears it just before it waits for the lock).
            await eventually(lambda: not pull._wanted.is_set())
            for _ in range(50):  # a flood while "it runs"
                pull.request()
            await asyncio.sleep(0.1)
        await eventually(lambda: len(results) == 2)
        await asyncio.sleep(0.3)
        assert results == ["unchanged", "unchanged"]  # the one running, and one more


async def test_a_diverged_branch_is_left_alone_reported_once_and_still_served(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    local = mine.commit({"gpu.yaml": server_yaml("gpu", 10)}, "a local commit, never pushed")
    theirs = author.commit({"gpu.yaml": server_yaml("gpu", 11)}, "the remote's commit")
    author.push()
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        for _ in range(3):
            assert await pull.pull() == "failed"
        assert mine.head() == local  # never reset
        assert service.registry.snapshot.providers["gpu"].endpoint == "http://127.0.0.1:10/v1"
        _, ready = await service.get("/readyz")
        assert ready["status"] == "ready" and ready["sync"]["status"] == "failed"
        assert ready["sync"]["remote_commit"] == theirs and "diverged" in ready["sync"]["reason"]
        assert len(failures(service)) == 1  # one event per distinct failure, not one per poll
        event = failures(service)[0]
        assert (event.subject, event.remote_commit, event.commit) == ("origin/main", theirs, local)
        _, metrics = await service.text("/metrics")
        counted = re.search(r"^switchboard_sync_failures_total (\d+)", metrics, re.M)
        assert counted is not None and int(counted[1]) >= 3
        # the remote moves on: a new failure (another remote commit), a new event
        author.commit({"gpu.yaml": server_yaml("gpu", 12)})
        author.push()
        assert await pull.pull() == "failed"
        assert len(failures(service)) == 2


async def test_a_force_push_is_a_branch_that_cannot_fast_forward_never_a_reset(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        served = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        assert await pull.pull() == "applied" and mine.head() == served
        git(author.root, "reset", "-q", "--hard", "HEAD~1")  # history rewritten on the remote
        rewritten = author.commit({"gpu.yaml": server_yaml("gpu", 66)}, "rewritten")
        author.push(force=True)
        assert await pull.pull() == "failed"
        assert mine.head() == served
        assert service.registry.snapshot.providers["gpu"].endpoint == "http://127.0.0.1:10/v1"
        assert pull.status.remote_commit == rewritten and "diverged" in (pull.status.reason or "")


async def test_local_commits_the_remote_lacks_are_reported(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    mine = clone(bare, tmp_path / "replica")
    local = mine.commit({"gpu.yaml": server_yaml("gpu", 10)}, "local only")
    async with replica(sops_project, mine) as service:
        assert await puller(service).pull() == "failed"
        assert "commits origin/main lacks" in (puller(service).status.reason or "")
        assert mine.head() == local


async def test_local_edits_block_the_fast_forward_until_they_are_gone(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        await eventually(lambda: pull.status.remote_commit is not None)
        (mine.providers / "routing.yaml").write_text(routing_yaml("gpu") + "# an edit on the replica\n")
        pushed = author.commit({"gpu.yaml": server_yaml("gpu", 11)})
        author.push()
        assert await pull.pull() == "failed"
        assert "providers.d/routing.yaml" in (pull.status.reason or "")
        assert mine.head() != pushed
        assert (mine.providers / "routing.yaml").read_text().endswith("# an edit on the replica\n")
        git(mine.root, "checkout", "--", "providers.d/routing.yaml")
        assert await pull.pull() == "applied"
        assert service.registry.state.last_applied_commit == pushed
        assert pull.status.status == "ok"


async def test_an_untracked_file_where_the_remote_adds_one_is_a_local_edit(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine) as service:
        (mine.providers / "spare.yaml").write_text(server_yaml("spare", 1))
        author.commit({"spare.yaml": server_yaml("spare", 2)})
        author.push()
        assert await puller(service).pull() == "failed"
        assert (mine.providers / "spare.yaml").read_text() == server_yaml("spare", 1)


async def test_an_unreachable_remote_is_one_failure_and_the_replica_serves_on(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    mine = clone(bare, tmp_path / "replica")
    bare.rename(tmp_path / "gone.git")
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        await eventually(lambda: pull.status.status == "failed")
        assert await pull.pull() == "failed"
        assert len(failures(service)) == 1 and "fetch" in failures(service)[0].reason
        status, _ = await service.get("/api/v1/llm-config/active/chat")
        assert status == 200


def test_the_pull_setting_is_remote_slash_branch() -> None:
    assert parse_pull("origin/main") == ("origin", "main")
    assert parse_pull("upstream/release/v2") == ("upstream", "release/v2")
    for bad in ("main", "/main", "origin/", "--upload-pack=x/main", "origin/-x", "origin/a..b", "origin/a b"):
        with pytest.raises(ValueError):
            parse_pull(bad)


async def test_executables_and_symlinks_are_checked_out_as_git_would_so_the_next_pull_runs(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """A pull used to write every file as a plain 0644 file: a script or a link anywhere in the
    repository then showed as a local edit, and no pull ever fast-forwarded again."""
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        script = author.root / "deploy" / "run.sh"
        script.parent.mkdir()
        script.write_text("#!/bin/sh\necho hi\n")
        script.chmod(0o755)
        (author.root / "deploy" / "latest").symlink_to("run.sh")
        git(author.root, "add", "-A")
        git(author.root, "commit", "-qm", "a script and a link")
        author.push()
        assert await pull.pull() == "applied"
        assert git(mine.root, "status", "--porcelain") == ""
        assert os.access(mine.root / "deploy" / "run.sh", os.X_OK)
        assert (mine.root / "deploy" / "latest").readlink() == Path("run.sh")
        # the link becomes a folder, the script stops being executable
        (author.root / "deploy" / "latest").unlink()
        (author.root / "deploy" / "latest").mkdir()
        (author.root / "deploy" / "latest" / "notes.md").write_text("notes\n")
        script.chmod(0o644)
        git(author.root, "add", "-A")
        git(author.root, "commit", "-qm", "a folder where the link was")
        author.push()
        assert await pull.pull() == "applied"
        assert git(mine.root, "status", "--porcelain") == ""
        pushed = author.commit({"gpu.yaml": server_yaml("gpu", 11)})
        author.push()
        assert await pull.pull() == "applied"
        assert service.registry.state.last_applied_commit == pushed and pull.status.status == "ok"


async def test_a_commit_of_thousands_of_files_is_pulled_in_a_few_git_calls(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """Two git calls a file made 3,000 files take 20 s (the writer's lock held), and naming them
    all on one command line fails past some tens of thousands."""
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        pages = author.root / "docs"
        pages.mkdir()
        for i in range(3000):
            (pages / f"page-{i:05d}.md").write_text(f"page {i}\n")
        git(author.root, "add", "-A")
        git(author.root, "commit", "-qm", "docs")
        author.push()
        calls: list[tuple[str, ...]] = []
        run = mine_repo(service).run

        def counted(*args: str, **kwargs: Any) -> bytes:
            calls.append(args)
            return run(*args, **kwargs)

        mine_repo(service).run = counted  # type: ignore[method-assign]
        assert await pull.pull() == "applied"
        assert len(calls) < 50
        assert git(mine.root, "status", "--porcelain") == ""
        assert (mine.root / "docs" / "page-02999.md").read_text() == "page 2999\n"


async def test_a_replica_stops_at_once_while_its_fetch_hangs_on_a_dead_remote(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """A thread waiting for git cannot be cancelled: a fetch from a remote that accepts and
    never answers kept `switchboard serve` alive after SIGTERM until git's 60 s timeout (and
    Kubernetes kills a pod 30 s after asking it to stop)."""
    bare, _ = remote
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await asyncio.sleep(3600)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mine = clone(bare, tmp_path / "replica")
    git(mine.root, "remote", "set-url", "origin", f"git://127.0.0.1:{port}/remote.git")
    env = replica_env(sops_project.identity.key_file, git_pull="origin/main", git_pull_interval_s="1")
    member = Replica("hung", mine.root, mine.providers, free_port(), env, tmp_path)
    try:
        async with replicas(member):
            await eventually(lambda: len(held) >= 1, timeout=5)  # the fetch is under way, and hangs
            status, _ = await member.get(f"{API}/active/chat")
            assert status == 200  # requests do not wait for it
            started = time.monotonic()
            await member.stop()
            assert time.monotonic() - started < 5, member.log()
            assert member.process is not None and member.process.returncode == 0, member.log()
    finally:
        server.close()
        for writer in held:
            writer.close()
    logged = [json.loads(line) for line in member.events_file.read_text().splitlines()]
    assert not [e for e in logged if e["type"] == "sync.failed"]  # stopping is not a failed pull


async def test_a_pulled_commit_that_deletes_the_providers_folder_is_an_empty_configuration(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """git removes a folder a commit empties, and so does the pull: the commit says there are no
    providers, as a replica cloned at it has none (docs/reference.md §4). The missing folder
    was taken for an unreadable one, and the last good files were served on, refused."""
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        shutil.rmtree(author.providers)
        git(author.root, "add", "-A")
        git(author.root, "commit", "-qm", "no more providers")
        author.push()
        assert await pull.pull() == "applied"
        removed = author.head()
        assert not mine.providers.exists() and git(mine.root, "status", "--porcelain") == ""
        state = service.registry.state
        assert state.last_applied_commit == removed and state.snapshot.providers == {}
        status, _ = await service.get(f"{API}/active/chat")
        assert status == 404
        _, ready = await service.get("/readyz")
        assert ready["degraded"] is False and ready["refused"] == []
        removals = [(e.subject, e.commit) for e in service.events() if e.type == "provider.removed"]
        assert removals == [("gpu", removed)]
        author.providers.mkdir()
        back = author.commit({"gpu.yaml": server_yaml("gpu", 12), "routing.yaml": routing_yaml("gpu")})
        author.push()
        assert await pull.pull() == "applied"
        assert service.registry.state.last_applied_commit == back
        assert service.registry.snapshot.providers["gpu"].endpoint == "http://127.0.0.1:12/v1"


async def test_a_commit_the_service_refuses_is_pulled_reported_and_the_last_good_served(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine) as service:
        served = service.registry.state.last_applied_commit
        bad = author.commit({"routing.yaml": routing_yaml("nope"), "gpu.yaml": "kind: ai_server\nid: gpu\n"})
        author.push()
        assert await puller(service).pull() == "applied"  # pulled; the service refuses it as any change
        state = service.registry.state
        assert (state.last_applied_commit, state.last_attempted_commit) == (served, bad)
        assert set(state.refused) == {"providers.d/gpu.yaml", "providers.d/routing.yaml"}
        status, route = await service.get(f"{API}/active/chat")
        assert status == 200 and route["primary"][0]["base_url"] == "http://127.0.0.1:9/v1"


async def test_a_remote_branch_deleted_is_one_failure_and_the_replica_serves_on(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        await eventually(lambda: pull.status.remote_commit is not None)
        git(author.root, "push", "-q", "origin", "HEAD:refs/heads/other")
        git(bare, "symbolic-ref", "HEAD", "refs/heads/other")
        git(author.root, "push", "-q", "origin", ":main")
        for _ in range(3):
            assert await pull.pull() == "failed"
        assert len(failures(service)) == 1 and "couldn't find remote ref" in failures(service)[0].reason
        assert mine.head() == git(author.root, "rev-parse", "HEAD")
        status, _ = await service.get(f"{API}/active/chat")
        assert status == 200


async def test_with_git_sync_the_pull_never_moves_its_worktree(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """With both git-sync and SWITCHBOARD_GIT_PULL (the Kubernetes manifest is one setting away
    from it), the pull fast-forwarded git-sync's detached worktree under it, and once git-sync
    had swapped to a new worktree and removed that one, every pull failed on a folder gone."""
    bare, author = remote
    sync = GitSync(tmp_path / "git", bare)
    first = sync.sync()
    settings = {
        "root": sync.link,
        "providers": sync.providers,
        "git_pull": "origin/main",
        "git_pull_interval_s": 0.1,
    }
    async with serve(sops_project, **settings) as service:
        assert PULLER not in service.app  # no pull: git-sync brings the commits
        second = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        await asyncio.sleep(0.5)
        assert git(sync.link.resolve(), "rev-parse", "HEAD") == first  # git-sync's worktree, untouched
        sync.sync()
        await eventually(lambda: service.registry.state.last_applied_commit == second, timeout=2)
        assert not failures(service)


async def test_a_detached_head_is_never_moved_by_the_pull(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    git(mine.root, "checkout", "-q", "--detach")
    detached = mine.head()
    async with replica(sops_project, mine) as service:
        await eventually(lambda: puller(service).status.status == "failed")  # the pull at the start
        author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        for _ in range(3):
            assert await puller(service).pull() == "failed"
        assert mine.head() == detached and "detached" in (puller(service).status.reason or "")
        assert len(failures(service)) == 2  # the remote moved once: one failure each, not one per pull


async def test_a_failure_whose_message_names_how_long_it_took_is_one_failure_not_one_per_poll(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote that cannot be reached says so with the time it waited (curl's `Failed to connect
    to host port 443 after 131 ms`), another time on each poll: still the same failure. (The
    transport is stood in for by GIT_SSH_COMMAND, which says what git says over https.)"""
    bare, _ = remote
    mine = clone(bare, tmp_path / "replica")
    git(mine.root, "remote", "set-url", "origin", "ssh://git.example.invalid/config.git")
    ssh = tmp_path / "ssh"
    ssh.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {tmp_path}/tries 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {tmp_path}/tries\n"
        "echo \"fatal: unable to access 'https://git.example.invalid/config.git/': Failed to connect to "
        'git.example.invalid port 443 after $((n * 1000 + 7)) ms: Timeout was reached" >&2\n'
        "exit 255\n"
    )
    ssh.chmod(0o755)
    monkeypatch.setenv("GIT_SSH_COMMAND", str(ssh))
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        await eventually(lambda: pull.status.status == "failed")
        for _ in range(3):
            assert await pull.pull() == "failed"
        assert int((tmp_path / "tries").read_text()) >= 4  # each poll asked, and was told another time
        await eventually(lambda: failures(service) or False)
        assert len(failures(service)) == 1 and "after 1007 ms" in failures(service)[0].reason
        _, ready = await service.get("/readyz")
        assert ready["sync"]["status"] == "failed"


async def test_a_token_in_the_remote_url_never_reaches_readyz_or_the_log(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """git names the remote's URL in its errors, and masks the user and password in it, but not
    a token in its query (`?private_token=`): it went into `/readyz`, which is public, and into
    the `sync.failed` event."""
    bare, _ = remote
    mine = clone(bare, tmp_path / "replica")
    secret = "glpat-SEKRET0123456789"
    git(mine.root, "remote", "set-url", "origin", f"http://127.0.0.1:1/config.git?private_token={secret}")
    async with replica(sops_project, mine) as service:
        # The status is set before the event is appended (in a thread): wait on each one read.
        await eventually(lambda: puller(service).status.status == "failed")
        _, ready = await service.get("/readyz")
        assert "unable to access" in ready["sync"]["reason"] and secret not in json.dumps(ready)
        reported = await eventually(lambda: failures(service) or False)
        assert all(secret not in e.reason for e in reported)


async def test_a_git_error_after_the_fetch_is_a_failed_pull_reported_not_a_silent_one(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A git error after the fetch (`git status` failing, say) went out of the pull as an
    exception: logged with a traceback at every interval, while `/readyz` said `ok`, no
    `sync.failed` was written and no failure was counted."""
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with replica(sops_project, mine) as service:
        pull = puller(service)
        await eventually(lambda: pull.status.remote_commit is not None)
        author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()

        def broken(*args: Any, **kwargs: Any) -> list[str]:
            raise GitError("git status failed: fatal: unknown index entry format 0x30000000")

        monkeypatch.setattr(Committer, "local_edits", broken)
        assert await pull.pull() == "failed"
        _, ready = await service.get("/readyz")
        assert ready["sync"]["status"] == "failed" and "unknown index entry" in ready["sync"]["reason"]
        assert len(failures(service)) == 1
        _, metrics = await service.text("/metrics")
        assert re.search(r"^switchboard_sync_failures_total [1-9]", metrics, re.M)


async def test_a_committed_link_out_of_the_repository_is_not_read(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """Whoever may push to the configuration repository (without the age identity) can commit
    `providers.d/x.yaml -> /any/file/of/the/replica`: git, git-sync and the pull check it out as
    a link, and the service reads whatever it names (another team's files, a mounted secret
    that parses as YAML, whose values a refusal may quote, or show by their mere existence)."""
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    outside = tmp_path / "elsewhere" / "stolen.yaml"
    outside.parent.mkdir()
    outside.write_text(server_yaml("stolen", 4))
    async with replica(sops_project, mine) as service:
        (author.providers / "stolen.yaml").symlink_to(outside)
        git(author.root, "add", "-A")
        git(author.root, "commit", "-qm", "a link out")
        author.push()
        assert await puller(service).pull() == "applied"
        assert "stolen" not in service.registry.snapshot.providers
        assert service.registry.refused == {"providers.d/stolen.yaml": LINK_OUT}
        [event] = [e for e in service.events() if e.type == "config.rejected"]
        assert event.file == "providers.d/stolen.yaml" and event.reason == LINK_OUT
        _, ready = await service.get("/readyz")
        assert ready["refused"] == [{"file": "providers.d/stolen.yaml", "reason": LINK_OUT}]
        assert str(outside) not in json.dumps(ready) and str(outside) not in service.events_file.read_text()

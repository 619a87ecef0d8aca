"""A write's answer is the truth (docs/reference.md §8): a 200 or 201 means committed, pushed where push is
on, and served; a commit the remote has but this service does not serve is a 409 that says
so, with its commit; nothing else that went wrong leaves a trace, local or remote, and git
failing is a 409 with git's reason, never a 500.

Real git throughout: a bare repository in tmp_path is the remote, colleagues are clones of it,
and the service runs as `switchboard serve` runs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from service.crypto.sops import Sops
from tests.conftest import (
    KEY_YAML,
    AgeIdentity,
    SopsProject,
    _write_sops_yaml,
    eventually,
    git,
    git_init,
    serve,
    write_atomically,
    write_routing,
    write_server,
)
from tests.http.test_write_api import CANARY, call, commit_all, head, other_clone
from tests.support.replicas import Checkout, GitSync
from tests.support.replicas import git as git_at

SPARE = {"id": "spare", "server_type": "vllm", "base_url": "http://127.0.0.1:11/v1", "purposes": ["chat"]}


@pytest.fixture
def repo(sops_project: SopsProject) -> SopsProject:
    """A git repository with a server `gpu` routed for chat, committed; var/ ignored."""
    root = sops_project.root
    git_init(root)
    (root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    commit_all(root)
    return sops_project


@pytest.fixture
def origin(repo: SopsProject, tmp_path: Path) -> Path:
    """A bare repository standing in for GitHub, with `repo`'s main pushed to it as origin."""
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    git(repo.root, "remote", "add", "origin", str(bare))
    git(repo.root, "push", "-q", "origin", "main")
    return bare


def without_identity(project: SopsProject) -> SopsProject:
    """`project` served by a service that holds no age identity: it encrypts, cannot decrypt."""
    return dataclasses.replace(project, sops=Sops(project_root=project.root))


def encrypted_for(identity: AgeIdentity, tmp_path: Path, provider_id: str) -> str:
    """An api_key file encrypted for `identity` alone."""
    other = tmp_path / f"elsewhere-{provider_id}"
    (other / "providers.d").mkdir(parents=True)
    _write_sops_yaml(other, identity.recipient)
    sops = Sops(age_key_file=identity.key_file, project_root=other)
    text = KEY_YAML.format(id=provider_id, key=CANARY).encode()
    return sops.encrypt(text, str(other / "providers.d" / f"{provider_id}.yaml")).decode()


def remote_head(bare: Path) -> str:
    return git(bare, "rev-parse", "main")


# -- 7: pushed, but refused here --------------------------------------------------------------------------


async def test_a_pushed_write_the_service_refuses_is_409_with_the_commit_the_remote_keeps(
    repo: SopsProject, origin: Path
) -> None:
    """Checked at HEAD a delete is fine, but someone's uncommitted routing edit names the
    provider, so the reload refuses the batch. The remote has the commit: it was a 200 with
    the old content; it is a 409 that names the commit, and local and remote stay one."""
    write_server(repo, "spare")
    commit_all(repo.root, "spare")
    git(repo.root, "push", "-q", "origin", "main")
    async with serve(repo, git_push="origin") as service:
        write_routing(repo, ["gpu", "spare"])  # uncommitted
        await eventually(
            lambda: service.registry.snapshot.routing.purposes["chat"].primary == ["gpu", "spare"]
        )
        status, answer, _ = await call(service, "DELETE", "/servers/spare")
        assert status == 409, answer
        error = answer["error"]
        assert error["commit"] == remote_head(origin) == head(repo.root)
        assert error["pushed"] is True
        assert "the remote keeps it" in error["message"] and "routing" in error["message"]
        assert git(origin, "log", "-1", "--format=%s", "main") == "delete ai_server spare"
        assert "spare" in service.registry.snapshot.providers  # still served: the write is not


async def test_a_pushed_key_the_service_cannot_decrypt_is_409_not_a_201_for_nothing(
    repo: SopsProject, origin: Path
) -> None:
    """A service without an identity encrypts for the public recipients, pushes, then cannot
    read what it wrote: the provider is not served, and the answer says the remote has it."""
    async with serve(without_identity(repo), git_push="origin") as service:
        body = {"id": "vendor", "provider": "openai", "api_key": CANARY, "purposes": ["chat"]}
        status, answer, _ = await call(service, "POST", "/api-keys", body)
        assert status == 409, answer
        assert answer["error"]["commit"] == remote_head(origin) == head(repo.root)
        assert "vendor" not in service.registry.snapshot.providers
        assert CANARY not in str(answer)


async def test_a_git_sync_replica_says_409_when_what_git_sync_brings_back_is_refused(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """git-sync brings the pushed commit back, and the file is refused: `last_applied_commit`
    reached the commit (the other files applied), which made it a 201 for a provider not served."""
    bare, _ = remote
    sync = GitSync(tmp_path / "git", bare)
    sync.sync()
    settings = {"root": sync.link, "providers": sync.providers, "git_push": str(bare)}
    async with serve(without_identity(sops_project), **settings) as service:

        async def git_sync() -> None:
            await eventually(
                lambda: git_at(bare, "log", "-1", "--format=%s", "main") == "create api_key vendor"
            )
            await asyncio.to_thread(sync.sync)

        body = {"id": "vendor", "provider": "openai", "api_key": CANARY, "purposes": ["chat"]}
        (status, answer, _), _ = await asyncio.gather(call(service, "POST", "/api-keys", body), git_sync())
        assert status == 409, answer
        assert answer["error"]["commit"] == git_at(bare, "rev-parse", "main")
        assert answer["error"]["pushed"] is True
        assert "vendor" not in service.registry.snapshot.providers


# -- 8: local and remote never diverge ----------------------------------------------------------------------


@pytest.mark.parametrize("colleague_pushed", [True, False])
async def test_a_branch_with_unpushed_commits_takes_no_write_and_the_remote_gets_nothing(
    repo: SopsProject, origin: Path, tmp_path: Path, colleague_pushed: bool
) -> None:
    """A commit made here and never pushed: the write was pushed on the remote's head anyway
    (409, but the remote had it; a retry was a 200 for a commit never applied), or pushed
    with the unpushed commit riding along. Neither: 409, and nothing moves anywhere."""
    write_server(repo, "mine")
    commit_all(repo.root, "mine, not pushed")
    if colleague_pushed:
        clone = other_clone(origin, tmp_path)
        write_atomically(clone / "providers.d" / "theirs.yaml", (repo.providers / "mine.yaml").read_text())
        commit_all(clone, "colleague adds theirs")
        git(clone, "push", "-q", "origin", "main")
    local, remote = head(repo.root), remote_head(origin)
    async with serve(repo, git_push="origin") as service:
        for _ in range(2):  # a retry is answered the same
            status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "ours"})
            assert status == 409, answer
            assert "commits the remote lacks" in answer["error"]["message"]
            assert "commit" not in answer["error"]
            assert (head(repo.root), remote_head(origin)) == (local, remote)
        assert service.registry.snapshot.providers["gpu"].name != "ours"
    assert git(repo.root, "status", "--porcelain") == ""


async def test_a_write_the_remote_already_holds_is_applied_before_it_is_answered(
    repo: SopsProject, origin: Path, tmp_path: Path
) -> None:
    """A colleague pushed the very change: drafted again on the remote's head it changes
    nothing, and was answered 200 with the remote's commit, never applied here."""
    clone = other_clone(origin, tmp_path)
    path = clone / "providers.d" / "gpu.yaml"
    path.write_text(path.read_text() + "name: ours\n")
    commit_all(clone, "colleague names gpu")
    git(clone, "push", "-q", "origin", "main")
    async with serve(repo, git_push="origin") as service:
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "ours"})
        assert status == 200, answer
        assert answer["commit"] == remote_head(origin) == head(repo.root)
        assert answer["name"] == "ours" and service.registry.snapshot.providers["gpu"].name == "ours"
        assert answer["generation"] == service.registry.snapshot.generation
        assert service.registry.state.last_applied_commit == answer["commit"]
    assert git(repo.root, "status", "--porcelain") == ""


async def test_a_change_to_nothing_with_push_is_checked_against_the_remote(
    repo: SopsProject, origin: Path
) -> None:
    """The asked-for state is committed here but was never pushed: a no-op write was a 200,
    "pushed where push is on", for what the remote does not have."""
    path = repo.providers / "gpu.yaml"
    path.write_text(path.read_text() + "name: ours\n")
    commit_all(repo.root, "named here, not pushed")
    async with serve(repo, git_push="origin") as service:
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "ours"})
        assert status == 409, answer
        assert "commits the remote lacks" in answer["error"]["message"]
        git(repo.root, "push", "-q", "origin", "main")
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "ours"})
        assert status == 200 and answer["commit"] == remote_head(origin) == head(repo.root), answer


async def test_a_change_to_nothing_that_is_not_served_is_409(repo: SopsProject) -> None:
    """The routing file in git already says it, but the service refuses that file (its
    provider lacks the purpose): answered as if served, from the last good version."""
    write_server(repo, "gpu", purposes="embeddings")
    commit_all(repo.root, "gpu for embeddings only: routing.yaml is refused")
    async with serve(repo) as service:
        assert "providers.d/routing.yaml" in service.registry.refused
        status, answer, _ = await call(service, "PUT", "/active/chat", {"primary": ["gpu"]})
    assert status == 409 and "already says this" in answer["error"]["message"], answer
    assert "lack `chat`" in answer["error"]["message"]


async def test_a_remote_that_moves_between_look_and_push_gets_the_write_on_top(
    repo: SopsProject, origin: Path, tmp_path: Path
) -> None:
    """The remote's branch moves after the push read it and before it updates it (a hook on
    the remote does it, once): the push is refused, drafted again on the new head, and lands."""
    clone = other_clone(origin, tmp_path)
    (clone / "providers.d" / "theirs.yaml").write_text(
        (repo.providers / "gpu.yaml").read_text().replace("id: gpu", "id: theirs")
    )
    theirs = commit_all(clone, "colleague adds theirs")
    git(clone, "push", "-q", "origin", "main:refs/heads/side")
    hook = origin / "hooks" / "pre-receive"
    hook.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e "{tmp_path}/moved" ]; then\n'
        f'  touch "{tmp_path}/moved"\n'
        f"  env -u GIT_QUARANTINE_PATH git update-ref refs/heads/main {theirs}\n"
        "fi\n"
    )
    hook.chmod(0o755)
    async with serve(repo, git_push="origin") as service:
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "ours"})
        assert status == 200, answer
        assert answer["commit"] == remote_head(origin) == head(repo.root)
        assert git(origin, "rev-parse", "main~1") == theirs
        assert {"gpu", "theirs"} <= set(service.registry.snapshot.providers)
    assert (tmp_path / "moved").exists()


async def test_two_replicas_writing_at_once_both_land_in_one_history(
    repo: SopsProject, origin: Path, tmp_path: Path
) -> None:
    """Two services on two clones of one remote, each writing at the same time: one push
    wins, the other is drafted again on it; both are answered 200 and serve what they said."""
    clone = other_clone(origin, tmp_path, "second")
    second = dataclasses.replace(
        repo,
        root=clone,
        providers=clone / "providers.d",
        sops=Sops(age_key_file=repo.identity.key_file, project_root=clone),
    )
    async with serve(repo, git_push="origin") as one, serve(second, git_push="origin") as two:
        for round_ in range(3):
            a, b = await asyncio.gather(
                call(one, "POST", "/servers", SPARE | {"id": f"a{round_}"}),
                call(two, "POST", "/servers", SPARE | {"id": f"b{round_}"}),
            )
            assert (a[0], b[0]) == (201, 201), (a, b)
            for service, (_, answer, _) in ((one, a), (two, b)):
                assert service.registry.state.last_applied_commit == answer["commit"]
                assert answer["id"] in service.registry.snapshot.providers
        log = git(origin, "log", "--format=%s", "main").splitlines()
        assert sorted(log[:6]) == sorted(f"create ai_server {x}{n}" for x in "ab" for n in range(3))
        assert int(git(origin, "rev-list", "--merges", "--count", "main")) == 0
    for root in (repo.root, clone):
        assert git(root, "status", "--porcelain") == ""
        assert git(origin, "merge-base", "--is-ancestor", head(root), "main") == ""


async def test_writes_at_once_on_one_replica_with_push_all_land_in_one_history(
    repo: SopsProject, origin: Path
) -> None:
    async with serve(repo, git_push="origin") as service:
        results = await asyncio.gather(
            *(call(service, "POST", "/servers", SPARE | {"id": f"s{i}"}) for i in range(5))
        )
        assert [r[0] for r in results] == [201] * 5, results
        assert head(repo.root) == remote_head(origin) == service.registry.state.last_applied_commit
        assert {f"s{i}" for i in range(5)} <= set(service.registry.snapshot.providers)
    assert int(git(origin, "rev-list", "--count", "main")) == 6
    assert git(repo.root, "status", "--porcelain") == ""


async def test_a_push_the_remote_refuses_for_good_is_tried_once(repo: SopsProject, origin: Path) -> None:
    """A protected branch is no race lost: the remote did not move, so the write was drafted
    again on the same head and pushed twice more, each time refused."""
    tries = origin / "tries"
    hook = origin / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\necho try >> {tries}\necho 'main is protected' >&2\nexit 1\n")
    hook.chmod(0o755)
    before = head(repo.root)
    async with serve(repo, git_push="origin") as service:
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "ours"})
    assert status == 409 and "the push was refused" in answer["error"]["message"], answer
    assert tries.read_text().split() == ["try"]
    assert (head(repo.root), remote_head(origin)) == (before, before)


# -- 9, 10: a route write changes only what it names ---------------------------------------------------------


async def test_the_old_form_keeps_a_fallback_whose_file_is_refused_right_now(
    repo: SopsProject, other_age_identity: AgeIdentity, tmp_path: Path
) -> None:
    """`backup` is valid in git, but this service cannot decrypt it: the routing file's
    fallback was dropped because the old form read it from what is served."""
    write_atomically(repo.providers / "backup.yaml", encrypted_for(other_age_identity, tmp_path, "backup"))
    write_server(repo, "gpu2")
    write_routing(repo, ["gpu"], fallbacks=["backup", "gpu2"])
    commit_all(repo.root, "backup")
    async with serve(repo) as service:
        assert "backup" in service.registry.snapshot.unavailable
        body = {"purpose": "chat", "provider_id": "gpu2"}
        status, answer, _ = await call(service, "POST", "/active", body)
        assert status == 200, answer
        assert [p["id"] for p in answer["primary"]] == ["gpu2"]
        assert answer["unavailable"] == ["backup"]
    routing = yaml.safe_load(git(repo.root, "show", "HEAD:providers.d/routing.yaml"))
    assert routing["purposes"]["chat"] == {"primary": ["gpu2"], "fallbacks": ["backup"]}


async def test_the_old_form_with_a_fallback_puts_it_first_and_keeps_the_fallbacks_listed(
    repo: SopsProject, other_age_identity: AgeIdentity, tmp_path: Path
) -> None:
    """`fallback_provider_id` replaced every fallback the routing file listed: the named one comes
    first, then those listed, in their order (`backup`, refused right now, included), but the
    named one and the new primary, each once (docs/reference.md §8)."""
    write_atomically(repo.providers / "backup.yaml", encrypted_for(other_age_identity, tmp_path, "backup"))
    for name in ("gpu2", "gpu3", "gpu4"):
        write_server(repo, name)
    write_routing(repo, ["gpu"], fallbacks=["gpu2", "backup", "gpu3", "gpu4"])
    commit_all(repo.root, "fallbacks")
    async with serve(repo) as service:
        assert "backup" in service.registry.snapshot.unavailable
        body = {"purpose": "chat", "provider_id": "gpu3", "fallback_provider_id": "gpu4"}
        status, answer, _ = await call(service, "POST", "/active", body)
        assert status == 200, answer
        assert [p["id"] for p in answer["primary"]] == ["gpu3"]
        assert [p["id"] for p in answer["fallbacks"]] == ["gpu4", "gpu2"]
        assert answer["unavailable"] == ["backup"]
        routing = yaml.safe_load(git(repo.root, "show", "HEAD:providers.d/routing.yaml"))
        assert routing["purposes"]["chat"] == {"primary": ["gpu3"], "fallbacks": ["gpu4", "gpu2", "backup"]}
        # the fallback named is the old primary, and the new primary was a fallback: each once
        body = {"purpose": "chat", "provider_id": "gpu2", "fallback_provider_id": "gpu3"}
        status, answer, _ = await call(service, "POST", "/active", body)
        assert status == 200, answer
        routing = yaml.safe_load(git(repo.root, "show", "HEAD:providers.d/routing.yaml"))
        assert routing["purposes"]["chat"] == {"primary": ["gpu2"], "fallbacks": ["gpu3", "gpu4", "backup"]}
        # the fallback named is the primary: no fallback is the primary
        body = {"purpose": "chat", "provider_id": "gpu4", "fallback_provider_id": "gpu4"}
        status, answer, _ = await call(service, "POST", "/active", body)
        assert status == 200, answer
        routing = yaml.safe_load(git(repo.root, "show", "HEAD:providers.d/routing.yaml"))
        assert routing["purposes"]["chat"] == {"primary": ["gpu4"], "fallbacks": ["gpu3", "backup"]}
        for bad in (5, ["gpu2"], {"id": "gpu2"}, True):
            body = {"purpose": "chat", "provider_id": "gpu", "fallback_provider_id": bad}
            status, answer, _ = await call(service, "POST", "/active", body)
            assert status == 422, (bad, answer)
            assert answer["error"]["problems"][0]["path"] == "fallback_provider_id", answer
        body = {"purpose": "chat", "provider_id": "gpu", "fallback_provider_id": None}  # as if left out
        status, answer, _ = await call(service, "POST", "/active", body)
        assert status == 200, answer
        routing = yaml.safe_load(git(repo.root, "show", "HEAD:providers.d/routing.yaml"))
        assert routing["purposes"]["chat"] == {"primary": ["gpu"], "fallbacks": ["gpu3", "backup"]}


async def test_the_old_form_keeps_the_fallbacks_a_colleague_pushed_meanwhile(
    repo: SopsProject, origin: Path, tmp_path: Path
) -> None:
    """Drafted again on the remote's head, the old form keeps the fallbacks there (not the
    ones this service served when the request came)."""
    write_server(repo, "gpu2")
    commit_all(repo.root, "gpu2")
    git(repo.root, "push", "-q", "origin", "main")
    clone = other_clone(origin, tmp_path)
    (clone / "providers.d" / "late.yaml").write_text(
        (repo.providers / "gpu.yaml").read_text().replace("id: gpu", "id: late")
    )
    (clone / "providers.d" / "routing.yaml").write_text(
        "kind: routing\npurposes:\n  chat:\n    primary: [gpu]\n    fallbacks: [late]\n"
    )
    commit_all(clone, "colleague adds a fallback")
    git(clone, "push", "-q", "origin", "main")
    async with serve(repo, git_push="origin") as service:
        status, answer, _ = await call(service, "POST", "/active", {"purpose": "chat", "provider_id": "gpu2"})
        assert status == 200, answer
        assert [p["id"] for p in answer["fallbacks"]] == ["late"]
    routing = yaml.safe_load(git(origin, "show", "main:providers.d/routing.yaml"))
    assert routing["purposes"]["chat"] == {"primary": ["gpu2"], "fallbacks": ["late"]}


async def test_a_route_is_not_written_over_a_provider_whose_file_is_named_routing(
    sops_project: SopsProject,
) -> None:
    root = sops_project.root
    git_init(root)
    (root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "routing")
    write_server(sops_project, "gpu")
    commit_all(root)
    data, before = (sops_project.providers / "routing.yaml").read_bytes(), head(root)
    async with serve(sops_project) as service:
        for method, path, body in (
            ("PUT", "/active/chat", {"primary": ["gpu"]}),
            ("POST", "/active", {"purpose": "chat", "provider_id": "gpu"}),
        ):
            status, answer, _ = await call(service, method, path, body)
            assert status == 409, answer
            assert "routing.yaml" in answer["error"]["message"]
        assert "routing" in service.registry.snapshot.providers
    assert (sops_project.providers / "routing.yaml").read_bytes() == data and head(root) == before


# -- 11: git failing is a 409 with git's reason, and nothing changes ---------------------------------------


def break_object_store(root: Path) -> None:
    """No new object can be written: every loose-object folder is a file (root ignores
    permissions, not this). The objects git has are packed first."""
    git(root, "repack", "-q", "-a", "-d")
    git(root, "prune-packed")
    objects = root / ".git" / "objects"
    for n in range(256):
        folder = objects / f"{n:02x}"
        if not folder.exists():
            folder.write_bytes(b"")


def mend_object_store(root: Path) -> None:
    for folder in (root / ".git" / "objects").glob("[0-9a-f][0-9a-f]"):
        if folder.is_file():
            folder.unlink()


@pytest.mark.parametrize("push", [False, True])
async def test_an_object_store_git_cannot_write_to_is_409_with_gits_reason(
    repo: SopsProject, origin: Path, push: bool
) -> None:
    before, data = head(repo.root), (repo.providers / "gpu.yaml").read_bytes()
    settings: dict[str, Any] = {"git_push": "origin"} if push else {}
    async with serve(repo, **settings) as service:
        break_object_store(repo.root)
        try:
            status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "no room"})
        finally:
            mend_object_store(repo.root)
        assert status == 409, answer
        assert "unable to create temporary file" in answer["error"]["message"]
        assert (head(repo.root), remote_head(origin)) == (before, before)
        assert (repo.providers / "gpu.yaml").read_bytes() == data
        assert git(repo.root, "status", "--porcelain") == ""
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "room again"})
        assert status == 200 and answer["name"] == "room again", answer


async def test_a_push_url_with_credentials_never_reaches_the_answer(repo: SopsProject) -> None:
    url = "http://bot:ghp-secret-token@127.0.0.1:9/o/r.git?private_token=glpat-secret"
    before = head(repo.root)
    async with serve(repo, git_push=url) as service:
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "ours"})
    assert status == 409, answer
    assert "secret" not in str(answer) and "****" in answer["error"]["message"]
    assert head(repo.root) == before and git(repo.root, "status", "--porcelain") == ""


async def test_a_write_record_git_cannot_keep_is_409_and_moves_nothing(repo: SopsProject) -> None:
    """The record a write keeps while it moves the branch cannot be written (a folder in its
    place; a full disk does the same): an OSError escaped as a 500."""
    before, data = head(repo.root), (repo.providers / "gpu.yaml").read_bytes()
    async with serve(repo) as service:
        record = repo.root / ".git" / "switchboard-write.json"
        record.mkdir()
        try:
            status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "unrecorded"})
        finally:
            record.rmdir()
        assert status == 409 and "could not record the write" in answer["error"]["message"], answer
        assert head(repo.root) == before and (repo.providers / "gpu.yaml").read_bytes() == data
        assert git(repo.root, "status", "--porcelain") == ""
        assert service.registry.snapshot.providers["gpu"].name != "unrecorded"


async def test_a_folder_where_a_write_puts_its_file_is_409_not_a_500(repo: SopsProject) -> None:
    (repo.providers / "spare.yaml").mkdir()
    (repo.providers / "spare.yaml" / "x").write_text("someone's")
    async with serve(repo) as service:
        status, answer, _ = await call(service, "POST", "/servers", SPARE)
    assert status == 409 and "local changes" in answer["error"]["message"], answer
    assert (repo.providers / "spare.yaml" / "x").read_text() == "someone's"


async def test_a_client_that_leaves_mid_write_does_not_cut_it_short(
    repo: SopsProject, origin: Path, tmp_path: Path
) -> None:
    """The client leaves while the push runs (its handler is cancelled): the push landed on
    the remote and nothing applied it here, the lock let the next write in while git ran.
    The write goes on to the end."""
    hook = origin / "hooks" / "pre-receive"
    hook.write_text(
        "#!/bin/sh\n"
        f'touch "{tmp_path}/started"\n'
        f'for i in $(seq 100); do [ -e "{tmp_path}/go" ] && exit 0; sleep 0.1; done\n'
        "exit 1\n"
    )
    hook.chmod(0o755)
    async with serve(repo, git_push="origin") as service:
        server = service.runner.server
        assert server is not None
        before = len(server.connections)
        leaving = aiohttp.ClientSession()
        url = service.url + "/api/v1/llm-config/servers/gpu"
        request = asyncio.create_task(leaving.patch(url, json={"name": "ours"}))
        await eventually(lambda: (tmp_path / "started").exists())
        request.cancel()
        await leaving.close()
        await eventually(lambda: len(server.connections) == before)  # the server saw it leave
        (tmp_path / "go").touch()

        def served() -> bool:
            state = service.registry.state
            return (
                state.last_applied_commit == remote_head(origin)
                and state.snapshot.providers["gpu"].name == "ours"
            )

        await eventually(served, timeout=10)
        assert head(repo.root) == remote_head(origin) and git(repo.root, "status", "--porcelain") == ""
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "next"})
        assert status == 200 and answer["commit"] == remote_head(origin) == head(repo.root), answer


def mount_tmpfs(target: Path, size: str) -> bool:
    target.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True, check=False
    )
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB file system (a tmpfs), where mounting one is allowed (root, CAP_SYS_ADMIN)."""
    disk = tmp_path / "disk"
    try:
        if not mount_tmpfs(disk, "4m"):
            pytest.skip("mounting a tmpfs is not allowed here")
    except FileNotFoundError:
        pytest.skip("no mount command")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_a_full_disk_is_409_with_the_reason_and_the_write_undone(
    sops_project: SopsProject, small_disk: Path, age_identity: AgeIdentity
) -> None:
    root = small_disk / "project"
    (root / "providers.d").mkdir(parents=True)
    _write_sops_yaml(root, age_identity.recipient)
    project = SopsProject(
        root, root / "providers.d", Sops(age_key_file=age_identity.key_file, project_root=root), age_identity
    )
    git_init(root)
    (root / ".gitignore").write_text("var/\nfill\n")
    write_server(project, "gpu")
    write_routing(project, ["gpu"])
    commit_all(root)
    before, data = head(root), (project.providers / "gpu.yaml").read_bytes()
    async with serve(project, events=sops_project.root / "events.jsonl") as service:
        fill = root / "fill"
        with fill.open("wb") as out, pytest.raises(OSError, match="No space left"):
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        try:
            status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "x" * 2000})
        finally:
            fill.unlink()
        assert status == 409, answer
        assert "space" in answer["error"]["message"]  # git's "Out of diskspace", or the OS's "No space left"
        assert head(root) == before and (project.providers / "gpu.yaml").read_bytes() == data
        assert git(root, "status", "--porcelain") == ""
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "room"})
        assert status == 200, answer

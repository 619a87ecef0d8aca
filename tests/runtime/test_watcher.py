"""The watcher under the ways files really change: bursts, races, symlinks, editors' droppings."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import watchfiles

from service.cli.main import cli
from service.http.context import EVENTS, RELOADER
from service.journal.replay import replay
from service.runtime import scan, watcher
from service.vcs.gitrepo import GitRepo
from tests.conftest import (
    AgeIdentity,
    Service,
    SopsProject,
    eventually,
    serve,
    write_atomically,
    write_server,
)
from tests.support.replicas import GitSync, git, make_remote, routing_yaml, server_yaml
from tests.support.tampering import TAMPERS, URL, Tamper, encrypted_vendor, provider_yaml

SERVER = "kind: ai_server\nid: {id}\nserver_type: vllm\nbase_url: http://127.0.0.1:{port}/v1\n"


def urls(service: Service) -> dict[str, str]:
    return {i: p.endpoint for i, p in service.registry.snapshot.providers.items()}


async def test_a_burst_of_a_hundred_changes_ends_in_the_right_state(running_service: Service) -> None:
    service, providers = running_service, running_service.project.providers
    expected = {"gpu": "http://127.0.0.1:9/v1"}
    for i in range(50):  # plain in-place writes, as scripts do: the watcher may see them half done
        (providers / f"b{i:02d}.yaml").write_text(SERVER.format(id=f"b{i:02d}", port=1000 + i))
    for i in range(50):
        (providers / f"b{i:02d}.yaml").write_text(SERVER.format(id=f"b{i:02d}", port=2000 + i))
        expected[f"b{i:02d}"] = f"http://127.0.0.1:{2000 + i}/v1"

    def settled() -> None:
        assert urls(service) == expected
        assert service.registry.refused == {}

    await eventually(settled)
    assert replay(service.app[EVENTS].events()) == service.registry.snapshot.view()


async def test_a_file_deleted_while_the_folder_is_read_is_taken_as_gone(
    running_service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, project = running_service, running_service.project
    write_server(project, "victim")
    await eventually(lambda: "victim" in service.registry.snapshot.providers)
    real_scandir = os.scandir

    def scandir_then_delete(path: Any) -> Iterator[os.DirEntry[str]]:
        entries = list(real_scandir(path))
        if Path(path) == project.providers:  # listed, then gone before it is read
            (project.providers / "victim.yaml").unlink(missing_ok=True)
        return iter(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_delete)
    write_server(project, "other")
    await eventually(lambda: set(service.registry.snapshot.providers) == {"gpu", "other"})
    monkeypatch.undo()
    write_server(project, "after")  # the watcher goes on
    await eventually(lambda: "after" in service.registry.snapshot.providers)
    assert service.registry.refused == {}


async def test_symlinks_inside_the_repository_are_followed_and_dangling_ones_skipped(
    running_service: Service,
) -> None:
    service, project = running_service, running_service.project
    providers = project.providers
    shared = project.root / "shared"  # in the repository, beside providers.d/
    shared.mkdir()
    (shared / "linked.yaml").write_text(SERVER.format(id="linked", port=3000))
    (providers / "linked.yaml").symlink_to(
        Path("..") / "shared" / "linked.yaml"
    )  # relative, as git makes them
    (providers / "dangling.yaml").symlink_to(shared / "missing.yaml")
    (providers / "folder.yaml").symlink_to(shared, target_is_directory=True)
    await eventually(lambda: "linked" in service.registry.snapshot.providers)
    assert service.registry.snapshot.providers["linked"].endpoint == "http://127.0.0.1:3000/v1"
    assert service.registry.refused == {}

    # retargeting the link is a change of the file
    (shared / "moved.yaml").write_text(SERVER.format(id="linked", port=3001))
    tmp_link = providers / ".linked.yaml.tmp"
    tmp_link.symlink_to(shared / "moved.yaml")
    tmp_link.replace(providers / "linked.yaml")
    await eventually(lambda: urls(service)["linked"] == "http://127.0.0.1:3001/v1")

    (providers / "linked.yaml").unlink()
    await eventually(lambda: "linked" not in service.registry.snapshot.providers)


CANARY_PATH_SECRET = "sk-outside-the-repository-0b1c2d3e"


@pytest.mark.parametrize("where", ["outside", "dangling-outside", "git-config", "chain"])
async def test_a_link_out_of_the_repository_is_refused_unread(
    running_service: Service, tmp_path: Path, where: str
) -> None:
    """docs/reference.md §4: a file of providers.d/ that is a link resolving outside the repository is
    refused with a `config.rejected` event saying so, whether or not its target exists (its
    existence is no more told than its content); so is one into the repository's `.git`."""
    service, project = running_service, running_service.project
    providers = project.providers
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.yaml"
    secret.write_text(SERVER.format(id="stolen", port=4000) + f"name: {CANARY_PATH_SECRET}\n")
    (project.root / ".git").mkdir()
    (project.root / ".git" / "config").write_text(SERVER.format(id="gitcfg", port=4001))
    target = {
        "outside": secret,
        "dangling-outside": outside / "missing.yaml",
        "git-config": Path("..") / ".git" / "config",
    }.get(where)
    if where == "chain":  # inside at first sight, out in the end
        (project.root / "hop.yaml").symlink_to(secret)
        target = Path("..") / "hop.yaml"
    assert target is not None
    seq = service.app[EVENTS].last_seq
    (providers / "stolen.yaml").symlink_to(target)
    await eventually(lambda: "providers.d/stolen.yaml" in service.registry.refused)
    assert service.registry.refused == {"providers.d/stolen.yaml": scan.LINK_OUT}
    assert set(service.registry.snapshot.providers) == {"gpu"}
    [event] = service.app[EVENTS].events()[seq:]
    assert (event.type, event.file, event.reason) == (
        "config.rejected",
        "providers.d/stolen.yaml",
        scan.LINK_OUT,
    )
    assert CANARY_PATH_SECRET not in service.events_file.read_text()
    assert str(outside) not in service.events_file.read_text()

    # pointed back inside, it is read as any file
    (project.root / "inside.yaml").write_text(SERVER.format(id="stolen", port=4002))
    (providers / "stolen.yaml").unlink()
    (providers / "stolen.yaml").symlink_to(Path("..") / "inside.yaml")
    await eventually(lambda: urls(service).get("stolen") == "http://127.0.0.1:4002/v1")
    assert service.registry.refused == {}


async def test_a_link_out_is_refused_under_head_only_once_committed(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    """docs/reference.md §5: `commit` is HEAD when the file is committed unchanged there,
    otherwise null with `uncommitted`. A link out, refused unread, is attributed by what git
    holds for it (its target): it was taken as a file removed, so under HEAD, never committed."""
    root = sops_project.root
    git(root, "init", "-q", "-b", "main")
    write_server(sops_project, "gpu")
    git(root, "add", "providers.d")
    git(root, "commit", "-q", "-m", "initial")
    outside = tmp_path / "outside.yaml"
    outside.write_text(SERVER.format(id="stolen", port=4000))
    async with serve(sops_project) as service:
        seq = service.app[EVENTS].last_seq
        (sops_project.providers / "stolen.yaml").symlink_to(outside)
        await eventually(lambda: "providers.d/stolen.yaml" in service.registry.refused)
        [event] = service.app[EVENTS].events()[seq:]
        assert (event.type, event.commit, event.author, event.uncommitted) == (
            "config.rejected",
            None,
            None,
            True,
        )
    git(root, "add", "providers.d")
    git(root, "commit", "-q", "-m", "the link")
    head = git(root, "rev-parse", "HEAD")
    async with serve(sops_project) as service:
        *_, event = [e for e in service.app[EVENTS].events() if e.type == "config.rejected"]
        assert event.seq > seq + 1  # recorded at this start
        assert (event.file, event.commit, event.uncommitted) == ("providers.d/stolen.yaml", head, False)
        assert event.author == "Switchboard Tests <tests@switchboard.invalid>"


async def test_a_link_inside_is_under_head_while_it_and_its_target_are_committed_unchanged(
    sops_project: SopsProject,
) -> None:
    """docs/reference.md §5: a file of providers.d/ that is a link inside the repository, committed
    with what it leads to, is HEAD's (it was always `uncommitted`: git holds a link's target, not
    the content read through it); an edit of the target not yet committed makes it uncommitted."""
    root = sops_project.root
    git(root, "init", "-q", "-b", "main")
    (root / "shared").mkdir()
    (root / "shared" / "gpu.yaml").write_text(SERVER.format(id="gpu", port=4000))
    (sops_project.providers / "gpu.yaml").symlink_to(Path("..") / "shared" / "gpu.yaml")
    git(root, "add", "providers.d", "shared")
    git(root, "commit", "-q", "-m", "a shared server")
    head = git(root, "rev-parse", "HEAD")
    async with serve(sops_project, rescan_s=0.1) as service:  # a target's edit is seen by a rescan
        [added] = [e for e in service.app[EVENTS].events() if e.type == "provider.added"]
        assert (added.commit, added.uncommitted) == (head, False)
        assert added.author == "Switchboard Tests <tests@switchboard.invalid>"
        seq = service.app[EVENTS].last_seq
        (root / "shared" / "gpu.yaml").write_text(SERVER.format(id="gpu", port=4001))
        await eventually(lambda: urls(service)["gpu"] == "http://127.0.0.1:4001/v1")
        [updated] = service.app[EVENTS].events()[seq:]
        assert (updated.type, updated.commit, updated.uncommitted) == ("provider.updated", None, True)

    # refused, a link inside is attributed the same way (what it leads to is read for that alone)
    (root / "shared" / "gpu.yaml").write_text(SERVER.format(id="gpu", port=4002) + "typo: 1\n")
    git(root, "commit", "-q", "-am", "a typo")
    head = git(root, "rev-parse", "HEAD")
    async with serve(sops_project) as service:
        *_, rejected = [e for e in service.app[EVENTS].events() if e.type == "config.rejected"]
        assert (rejected.file, rejected.commit, rejected.uncommitted) == ("providers.d/gpu.yaml", head, False)


async def test_a_providers_folder_that_is_itself_a_link_out_is_refused_whole(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    """`providers.d` committed as a link to a folder of the replica: every file is refused."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "stolen.yaml").write_text(SERVER.format(id="stolen", port=4000))
    sops_project.providers.rmdir()
    sops_project.providers.symlink_to(elsewhere, target_is_directory=True)
    async with serve(sops_project, root=sops_project.root, providers=sops_project.providers) as service:
        assert service.registry.snapshot.providers == {}
        assert service.registry.refused == {"providers.d/stolen.yaml": scan.LINK_OUT}


async def test_editor_droppings_and_other_names_are_ignored(running_service: Service) -> None:
    service, providers = running_service, running_service.project.providers
    seq = service.app[EVENTS].last_seq
    for name in (".gpu.yaml.swp", "gpu.yaml~", "gpu.yaml.bak", "gpu.yaml.tmp", ".hidden.yaml", "notes.txt"):
        (providers / name).write_text("not: [yaml")
    write_server(running_service.project, "marker")  # a change that is seen, after the others
    await eventually(lambda: "marker" in service.registry.snapshot.providers)
    assert [(e.type, e.subject) for e in service.app[EVENTS].events()[seq:]] == [("provider.added", "marker")]
    assert service.registry.refused == {}


async def test_a_broken_edit_keeps_the_last_good_version_until_fixed(running_service: Service) -> None:
    service, project = running_service, running_service.project
    write_server(project, "kept")
    await eventually(lambda: "kept" in service.registry.snapshot.providers)
    (project.providers / "kept.yaml").write_text("kind: ai_server\nid: [\n")
    await eventually(lambda: "providers.d/kept.yaml" in service.registry.refused)
    assert "kept" in service.registry.snapshot.providers
    write_server(project, "kept", "http://127.0.0.1:4000/v1")
    await eventually(lambda: urls(service).get("kept") == "http://127.0.0.1:4000/v1")
    assert service.registry.refused == {}


async def test_a_file_over_the_limit_is_refused_from_its_size_without_being_read(
    running_service: Service,
) -> None:
    service = running_service
    with (service.project.providers / "huge.yaml").open("wb") as f:
        f.write(b"kind: clients\nclients:\n")
        f.truncate(64 << 20)  # sparse: 64 MiB on paper, nothing on disk
    tracemalloc.start()
    try:
        await service.app[RELOADER].reload()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert service.registry.refused == {
        "providers.d/huge.yaml": "line 1: file is 67,108,864 bytes; the limit is 1,048,576 (1 MiB)"
    }
    assert peak < 8 << 20  # the head it reads, not the file
    assert service.registry.state.auth_required  # its head says what it is: a clients file


# -- git-sync: the folder behind a link swapped to a new worktree per commit (docs/reference.md §12) ---------


async def test_a_git_sync_swap_is_applied_at_once_as_one_generation_under_the_new_head(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    (sops_project.providers / "gpu.yaml").write_text(server_yaml("gpu", 9))
    (sops_project.providers / "routing.yaml").write_text(routing_yaml("gpu"))
    remote, author = make_remote(tmp_path, sops_project.root)
    sync = GitSync(tmp_path / "git", remote)
    first = sync.sync()
    async with serve(sops_project, root=sync.link, providers=sync.providers, rescan_s=60) as service:
        assert service.registry.state.last_applied_commit == first
        seen: list[tuple[frozenset[str], str | None]] = []
        service.registry.on_apply.append(
            lambda o: seen.append((frozenset(o.snapshot.providers), service.registry.last_applied_commit))
        )
        generation = service.registry.snapshot.generation
        # Three files change together: a mix of the two worktrees would show as a refused batch
        # (routing naming a provider not there yet) or a snapshot with only some of them.
        second = author.commit(
            {"spare.yaml": server_yaml("spare", 11), "gpu.yaml": None, "routing.yaml": routing_yaml("spare")}
        )
        author.push()
        started = time.monotonic()
        sync.sync(keep_old=True)  # nothing changes in the folder watched before: only the link

        def swapped() -> None:
            assert service.registry.state.last_applied_commit == second

        await eventually(swapped, timeout=1.0)
        assert time.monotonic() - started < 1.0
        state = service.registry.state
        assert set(state.snapshot.providers) == {"spare"} and state.refused == {}
        assert state.snapshot.generation == generation + 1
        assert [providers for providers, _ in seen] == [frozenset({"spare"})] * len(seen)
        changes = [e for e in service.events() if e.type in ("provider.added", "provider.removed")][-2:]
        assert {(e.type, e.subject, e.commit) for e in changes} == {
            ("provider.added", "spare", second),
            ("provider.removed", "gpu", second),
        }
        _, body = await service.get("/api/v1/llm-config/active/chat")
        assert body["commit"] == second and [p["id"] for p in body["primary"]] == ["spare"]

        # and the next swap too: the watch follows the link, not the folder it pointed at
        third = author.commit({"spare.yaml": server_yaml("spare", 12)})
        author.push()
        sync.sync(keep_old=True)
        await eventually(lambda: service.registry.state.last_applied_commit == third, timeout=1.0)
        assert service.registry.snapshot.providers["spare"].endpoint == "http://127.0.0.1:12/v1"


async def test_a_swap_in_the_middle_of_a_scan_is_scanned_again_never_mixed(
    sops_project: SopsProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (sops_project.providers / "a.yaml").write_text(server_yaml("a", 1))
    (sops_project.providers / "b.yaml").write_text(server_yaml("b", 1))
    remote, author = make_remote(tmp_path, sops_project.root)
    sync = GitSync(tmp_path / "git", remote)
    sync.sync()
    second = author.commit({"a.yaml": server_yaml("a", 2), "b.yaml": server_yaml("b", 2)})
    author.push()
    git(sync.root, "fetch", "-q", "origin", "main")
    async with serve(sops_project, root=sync.link, providers=sync.providers, rescan_s=60) as service:
        real_read = scan.read_limited
        swapped: list[bool] = []

        def read_then_swap(path: Path, limit: int, *, follow: bool = True) -> tuple[bytes, int | None]:
            data = real_read(path, limit, follow=follow)
            if not swapped:  # the first file read, then the link moves on under the scan
                swapped.append(True)
                sync.publish(second)
            return data

        monkeypatch.setattr(scan, "read_limited", read_then_swap)
        await service.app[RELOADER].reload()
        snapshot = service.registry.snapshot
        assert swapped
        assert {p.endpoint for p in snapshot.providers.values()} == {"http://127.0.0.1:2/v1"}
        assert service.registry.last_applied_commit == second


@pytest.mark.parametrize("when", ["before the apply", "during the apply"])
async def test_a_worktree_git_sync_removes_under_a_reload_is_never_applied_without_its_commit(
    sops_project: SopsProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """git-sync removes the old worktree as soon as the link moves on. One removed between the
    scan and the apply (or during it) was applied with no commit: `last_applied_commit`
    null, and events saying a change made by a commit was `uncommitted`."""
    (sops_project.providers / "a.yaml").write_text(server_yaml("a", 1))
    remote, author = make_remote(tmp_path, sops_project.root)
    sync = GitSync(tmp_path / "git", remote)
    sync.sync()
    second = author.commit({"a.yaml": server_yaml("a", 2)})
    third = author.commit({"a.yaml": server_yaml("a", 3)})
    author.push()
    git(sync.root, "fetch", "-q", "origin", "main")
    async with serve(sops_project, root=sync.link, providers=sync.providers, rescan_s=60) as service:
        seq = service.app[EVENTS].last_seq
        swapped: list[str] = []

        def swap() -> None:
            if not swapped:
                swapped.append(sync.publish(third))  # and the worktree just read is removed

        if when == "before the apply":
            real_scan = scan.Scanner.scan

            def scan_then_swap(self: scan.Scanner, known: Mapping[str, str | None]) -> Any:
                found = real_scan(self, known)
                swap()
                return found

            monkeypatch.setattr(scan.Scanner, "scan", scan_then_swap)
        else:
            blob_ids = GitRepo.blob_ids

            def swap_then_list(
                self: GitRepo, rev: str, folder: str, *, links: bool = False
            ) -> dict[str, str]:
                swap()
                return blob_ids(self, rev, folder, links=links)

            monkeypatch.setattr(GitRepo, "blob_ids", swap_then_list)
        sync.publish(second)
        await eventually(lambda: service.registry.state.last_applied_commit == third, timeout=3)
        assert swapped
        changes = [e for e in service.events() if e.seq > seq and e.type == "provider.updated"]
        assert changes and all(e.commit in (second, third) and not e.uncommitted for e in changes)
        assert changes[-1].commit == third
        assert service.registry.snapshot.providers["a"].endpoint == "http://127.0.0.1:3/v1"


# -- a file changed outside sops (docs/reference.md §2.4) -------------------------------------------

VENDOR = "providers.d/vendor.yaml"


async def _write_encrypted(service: Service, text: str) -> Path:
    project = service.project
    path = project.providers / "vendor.yaml"
    data = project.sops.encrypt(text.encode(), str(path))
    return write_atomically(path, data.decode())


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda t: t.name)
async def test_a_key_holding_file_changed_outside_sops_is_refused_and_the_old_version_kept(
    running_service: Service, tamper: Tamper
) -> None:
    """sops' MAC lets each of these through (checked here), yet the file kept the MAC of the
    version it replaces while its data changed: only an edit without the identity does that."""
    service, project = running_service, running_service.project
    path = await _write_encrypted(service, provider_yaml("vendor", tamper))
    await eventually(lambda: urls(service).get("vendor") == URL)
    tampered = tamper.apply(path.read_text())
    assert project.sops.decrypt(tampered.encode(), str(path))  # the MAC passes
    seq = service.app[EVENTS].last_seq
    write_atomically(path, tampered)
    await eventually(lambda: VENDOR in service.registry.refused)
    reason = service.registry.refused[VENDOR]
    assert "MAC mismatch: the file was changed without sops: its MAC is the previous version's, but" in reason
    assert "(sops' MAC does not cover names or where values begin and end)" in reason
    assert urls(service)["vendor"] == URL
    assert service.registry.snapshot.providers["vendor"].enabled is ("enabled" not in tamper.before)
    _, ready = await service.get("/readyz")
    assert {"file": VENDOR, "reason": reason} in ready["refused"]
    assert [(e.type, e.file, e.reason) for e in service.app[EVENTS].events()[seq:]] == [  # type: ignore[attr-defined]
        ("config.rejected", VENDOR, reason)
    ]
    await _write_encrypted(service, tamper.apply(provider_yaml("vendor", tamper)))  # the same change, by sops
    await eventually(lambda: service.registry.refused == {})
    assert urls(service)["vendor"] == tamper.url
    assert service.registry.snapshot.providers["vendor"].enabled


async def test_a_change_made_through_switchboard_edit_is_taken(
    running_service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, tamper = running_service, TAMPERS[0]
    path = await _write_encrypted(service, provider_yaml("vendor", tamper))
    await eventually(lambda: urls(service).get("vendor") == URL)
    editor = tmp_path / "editor.py"
    editor.write_text(
        "import sys, pathlib\np = pathlib.Path(sys.argv[1])\n"
        f"p.write_text(p.read_text().replace({tamper.before!r}, {tamper.after!r}))\n"
    )
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(service.project.identity.key_file))
    assert cli("--root", str(service.project.root), "edit", str(path)) == 0
    await eventually(lambda: urls(service).get("vendor") == tamper.url)
    assert service.registry.refused == {}


async def test_a_comment_or_formatting_changed_outside_sops_is_taken(running_service: Service) -> None:
    service, tamper = running_service, TAMPERS[0]
    path = await _write_encrypted(service, provider_yaml("vendor", tamper))
    await eventually(lambda: urls(service).get("vendor") == URL)
    text = path.read_text().replace("name: GPU box\n", "name: 'GPU box'  # the big one\n")
    write_atomically(path, "# the vendor's key, for the team\n" + text)
    await service.app[RELOADER].reload()
    assert service.registry.refused == {}
    assert service.registry.snapshot.files[VENDOR].data == path.read_bytes()


async def test_a_key_holding_file_renamed_and_changed_outside_sops_is_refused(
    running_service: Service,
) -> None:
    """Another name is no way round: the MAC is still that of a version the service loaded."""
    service, project = running_service, running_service.project
    text = f"kind: ai_server\nserver_type: vllm\nid: vendor\nname: 2 GPU box\nbase_url: {URL}\n"
    path = await _write_encrypted(service, text + "api_key: sk-vendor-5d80aaaa\n")
    await eventually(lambda: urls(service).get("vendor") == URL)
    renamed = path.read_text().replace("id: vendor\nname: 2 GPU box\n", "id: vendor2\nname: ' GPU box'\n")
    assert project.sops.decrypt(renamed.encode(), str(path))  # the MAC passes
    path.unlink()
    write_atomically(path.with_name("vendor2.yaml"), renamed)
    await eventually(lambda: "providers.d/vendor2.yaml" in service.registry.refused)
    reason = service.registry.refused["providers.d/vendor2.yaml"]
    assert (
        "MAC mismatch: the file was changed without sops: "
        f"its MAC is that of {VENDOR}, but `id` and `name` differ" in reason
    )
    assert "vendor2" not in service.registry.snapshot.providers


async def test_a_file_without_a_key_changed_by_hand_is_taken(running_service: Service) -> None:
    service = running_service
    write_server(service.project, "gpu", "http://127.0.0.1:4000/v1")
    await eventually(lambda: urls(service).get("gpu") == "http://127.0.0.1:4000/v1")
    assert service.registry.refused == {}


async def test_a_change_cut_from_an_older_versions_mac_is_refused_and_a_revert_is_taken(
    running_service: Service,
) -> None:
    """Every version loaded since the start counts, not only the one served now."""
    service, tamper = running_service, TAMPERS[0]
    path = await _write_encrypted(service, provider_yaml("vendor", tamper))
    await eventually(lambda: urls(service).get("vendor") == URL)
    first = path.read_text()
    await _write_encrypted(service, provider_yaml("vendor", tamper).replace("GPU box", "GPU box 2"))
    await eventually(lambda: service.registry.snapshot.providers["vendor"].name == "GPU box 2")
    write_atomically(path, tamper.apply(first))
    await eventually(lambda: VENDOR in service.registry.refused)
    assert (
        "MAC mismatch: the file was changed without sops: its MAC is the previous version's"
        in service.registry.refused[VENDOR]
    )
    assert urls(service)["vendor"] == URL
    write_atomically(path, first)  # a revert, as git makes it
    await eventually(lambda: service.registry.refused == {})
    assert service.registry.snapshot.providers["vendor"].name == "GPU box"


async def test_the_same_change_written_over_http_is_taken(sops_project: SopsProject) -> None:
    """A write over HTTP re-encrypts the file through sops: its MAC is new (docs/reference.md §8)."""
    project, tamper = sops_project, TAMPERS[0]
    git(project.root, "init", "-q", "-b", "main")
    git(project.root, "config", "commit.gpgsign", "false")
    (project.root / ".gitignore").write_text("var/\n")
    write_server(project, "gpu")
    (project.providers / "routing.yaml").write_text(routing_yaml("gpu"))
    path = encrypted_vendor(project, tamper)
    git(project.root, "add", "-A")
    git(project.root, "commit", "-qm", "setup")
    before = path.read_bytes()
    async with serve(project) as service:
        assert urls(service)["vendor"] == URL
        headers = {"Content-Type": "application/merge-patch+json"}
        patch = {"base_url": "https://llm.com", "name": "pany.com/v1GPU box"}
        url = f"{service.url}/api/v1/llm-config/servers/vendor"
        async with service.http.patch(url, json=patch, headers=headers) as response:
            assert response.status == 200, await response.text()
        await eventually(lambda: urls(service).get("vendor") == "https://llm.com")
        assert service.registry.refused == {}
        assert path.read_bytes() != before


async def test_two_files_of_one_reload_sharing_a_mac_are_both_refused(sops_project: SopsProject) -> None:
    """A new file and a tampered copy under another name, seen in one reload (at the start, or
    pulled together): neither MAC is known yet, and which one sops wrote cannot be told."""
    project = sops_project
    write_server(project, "gpu")
    text = f"kind: ai_server\nserver_type: vllm\nid: vendor\nname: 2 GPU box\nbase_url: {URL}\n"
    path = project.providers / "vendor.yaml"
    data = project.sops.encrypt((text + "api_key: sk-vendor-5d80aaaa\n").encode(), str(path))
    write_atomically(path, data.decode())
    renamed = path.read_text().replace("id: vendor\nname: 2 GPU box\n", "id: vendor2\nname: ' GPU box'\n")
    assert project.sops.decrypt(renamed.encode(), str(path))  # the MAC passes
    write_atomically(path.with_name("vendor2.yaml"), renamed)
    async with serve(project) as service:
        refused = service.registry.refused
        assert sorted(refused) == [VENDOR, "providers.d/vendor2.yaml"]
        assert all("MAC mismatch: the file was changed without sops" in r for r in refused.values()), refused
        assert "vendor" not in urls(service) and "vendor2" not in urls(service)


async def test_past_the_cap_the_seal_of_a_file_loaded_now_is_kept(
    running_service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unchanged file's seal is the oldest; forgetting it first would let a change outside
    sops through once enough other versions were loaded (docs/reference.md §2.4)."""
    monkeypatch.setattr(watcher, "_MAX_SEALS", 2)
    service, project, tamper = running_service, running_service.project, TAMPERS[0]
    path = await _write_encrypted(service, provider_yaml("vendor", tamper))
    await eventually(lambda: urls(service).get("vendor") == URL)
    other = project.providers / "other.yaml"
    for n in range(4):  # four versions of another key-holding file, each with a MAC of its own
        text = provider_yaml("other", tamper, key=f"sk-other-{n}-5d80aaaa1111")
        write_atomically(other, project.sops.encrypt(text.encode(), str(other)).decode())
        await eventually(lambda: urls(service).get("other") == URL)
        await service.app[RELOADER].reload()
        assert service.registry.snapshot.files["providers.d/other.yaml"].data == other.read_bytes()
    write_atomically(path, tamper.apply(path.read_text()))
    await eventually(lambda: VENDOR in service.registry.refused)
    assert urls(service)["vendor"] == URL


async def test_writes_through_sops_and_a_rollback_are_taken(
    running_service: Service, other_age_identity: AgeIdentity
) -> None:
    """`sops updatekeys` keeps the MAC and rewraps the data key (the recipients are not
    compared); `sops rotate` makes a new MAC; a version loaded before, restored byte for byte
    (a rollback, git checkout of an older commit), carries its own MAC with its own data."""
    service, project, tamper = running_service, running_service.project, TAMPERS[0]
    path = await _write_encrypted(service, provider_yaml("vendor", tamper))
    await eventually(lambda: urls(service).get("vendor") == URL)
    first = path.read_bytes()
    sops_yaml = project.root / ".sops.yaml"
    recipient = project.identity.recipient
    sops_yaml.write_text(
        sops_yaml.read_text().replace(recipient, f"{recipient},{other_age_identity.recipient}")
    )
    project.sops.updatekeys(path)
    assert other_age_identity.recipient in path.read_text()
    await eventually(lambda: service.registry.snapshot.files[VENDOR].data == path.read_bytes())
    project.sops.rotate(path)
    await eventually(lambda: service.registry.snapshot.files[VENDOR].data == path.read_bytes())
    await _write_encrypted(service, tamper.apply(provider_yaml("vendor", tamper)))
    await eventually(lambda: urls(service).get("vendor") == tamper.url)
    write_atomically(path, first.decode())  # the rollback
    await eventually(lambda: urls(service).get("vendor") == URL)
    assert service.registry.refused == {}


async def test_a_folder_that_cannot_be_watched_is_rescanned_every_second_and_watched_once_it_can(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A watch that cannot be set (a folder the service's user may not read, the OS's limit of
    inotify watches or instances reached: watchfiles raises PermissionError or OSError) killed
    the watcher: nothing was ever reloaded again, and /readyz said nothing. Simulated (the
    tests may run as root, whom chmod 000 does not stop): the error is what watchfiles raises."""
    write_server(sops_project, "a")
    real_awatch = watchfiles.awatch
    refusing = True

    async def refused(paths: tuple[Path, ...]) -> AsyncIterator[set[Any]]:
        raise PermissionError(f"Permission denied (os error 13) about {[str(p) for p in paths]}")
        yield set()  # pragma: no cover - an async generator, as awatch is, failing as it does

    def awatch(*paths: Path, **kwargs: Any) -> AsyncIterator[set[Any]]:
        return refused(paths) if refusing else real_awatch(*paths, **kwargs)

    monkeypatch.setattr(watcher, "awatch", awatch)
    caplog.set_level(logging.INFO, logger="service.runtime.watcher")
    async with serve(sops_project, rescan_s=60) as service:  # the first load, without a watch
        assert set(service.registry.snapshot.providers) == {"a"}
        write_server(sops_project, "b")
        await eventually(lambda: "b" in service.registry.snapshot.providers, timeout=3)  # a rescan
        assert service.registry.refused == {}
        refusing = False
        await asyncio.sleep(1.5)  # the next try sets the watch
        started = time.monotonic()
        write_server(sops_project, "c")
        await eventually(lambda: "c" in service.registry.snapshot.providers, timeout=3)
        assert time.monotonic() - started < 0.9  # seen by the watch
    said = [r for r in caplog.records if r.name == "service.runtime.watcher" and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in said] == [
        f"cannot watch {sops_project.providers}: Permission denied (os error 13) about"
        f" ['{sops_project.providers}']; it is rescanned every second"
    ]
    assert all(r.exc_info is None for r in said)

"""Attributor: the commit and author of each file's current content (docs/reference.md §5), from real git."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.config.snapshot import NO_GIT, Attribution
from service.vcs.attribution import Attributor
from service.vcs.gitrepo import GitRepo
from tests.conftest import git, git_init

ME = "Switchboard Tests <tests@switchboard.invalid>"
ADA = "Ada Lovelace <ada@switchboard.invalid>"


def commit(root: Path, message: str, author: str | None = None) -> str:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message, *(["--author", author] if author else []))
    return git(root, "rev-parse", "HEAD")


def server(provider_id: str, url: str = "http://gpu:8000/v1") -> bytes:
    return f"kind: ai_server\nid: {provider_id}\nserver_type: vllm\nbase_url: {url}\n".encode()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """`providers.d/` of a repository with `a.yaml` committed by Ada."""
    git_init(tmp_path)
    providers = tmp_path / "providers.d"
    providers.mkdir()
    (providers / "a.yaml").write_bytes(server("a"))
    commit(tmp_path, "add a", author=ADA)
    return providers


def current(*paths: Path) -> dict[Path, bytes | None]:
    """Each path with its content now (None: it is gone), as the watcher hands them over."""
    return {p: p.read_bytes() if p.exists() else None for p in paths}


def test_a_file_committed_unchanged_is_heads_commit_and_its_author(folder: Path) -> None:
    attributor = Attributor(folder)
    head = git(folder, "rev-parse", "HEAD")
    assert attributor.head() == head
    path = folder / "a.yaml"
    assert attributor.attribute(current(path)) == {path: Attribution(head, ADA, False, head)}


def test_an_edited_file_is_uncommitted_with_the_last_author(folder: Path) -> None:
    path = folder / "a.yaml"
    path.write_bytes(server("a", "http://elsewhere:8000/v1"))
    assert Attributor(folder).attribute(current(path)) == {path: Attribution(None, ADA, True)}


def test_a_new_file_is_uncommitted_without_an_author(folder: Path) -> None:
    path = folder / "b.yaml"
    path.write_bytes(server("b"))
    assert Attributor(folder).attribute(current(path)) == {path: Attribution(None, None, True)}


def test_a_removed_file_is_uncommitted_until_the_removal_is(folder: Path) -> None:
    path = folder / "a.yaml"
    path.unlink()
    attributor = Attributor(folder)
    assert attributor.attribute({path: None}) == {path: Attribution(None, ADA, True)}
    head = commit(folder, "drop a")
    assert attributor.attribute({path: None}) == {path: Attribution(head, ME, False, head)}


def test_the_author_and_the_change_are_of_the_last_commit_touching_the_file(folder: Path) -> None:
    first = git(folder, "rev-parse", "HEAD")
    (folder / "b.yaml").write_bytes(server("b"))
    head = commit(folder, "add b")
    a, b = folder / "a.yaml", folder / "b.yaml"
    assert Attributor(folder).attribute(current(a, b)) == {
        a: Attribution(head, ADA, False, first),
        b: Attribution(head, ME, False, head),
    }


def test_outside_a_repository_everything_is_null(tmp_path: Path) -> None:
    folder = tmp_path / "providers.d"
    folder.mkdir()
    (folder / "a.yaml").write_bytes(server("a"))
    attributor = Attributor(folder)
    assert attributor.repo is None
    assert attributor.head() is None
    assert attributor.attribute(current(folder / "a.yaml")) == {folder / "a.yaml": NO_GIT}
    assert (NO_GIT.commit, NO_GIT.author, NO_GIT.uncommitted) == (None, None, False)


def test_a_repository_without_commits_is_uncommitted(tmp_path: Path) -> None:
    git_init(tmp_path)
    folder = tmp_path / "providers.d"
    folder.mkdir()
    (folder / "a.yaml").write_bytes(server("a"))
    attributor = Attributor(folder)
    assert attributor.head() is None
    assert attributor.attribute(current(folder / "a.yaml")) == {
        folder / "a.yaml": Attribution(None, None, True)
    }


def test_a_folder_that_does_not_exist_yet_belongs_to_the_repository_around_it(tmp_path: Path) -> None:
    git_init(tmp_path)
    (tmp_path / "README").write_text("top\n")
    head = commit(tmp_path, "first")
    attributor = Attributor(tmp_path / "providers.d")
    assert attributor.repo is not None
    assert attributor.head() == head


def test_a_folder_followed_where_it_is_not_is_the_worktree_theres(folder: Path, tmp_path: Path) -> None:
    """git-sync's worktree of a commit without `providers.d/`: its HEAD is the commit served."""
    other = tmp_path.parent / f"{tmp_path.name}-worktree"
    git(tmp_path, "worktree", "add", "-q", "--detach", str(other))
    git(other, "rm", "-r", "-q", "providers.d")
    removed = commit(other, "drop every provider")
    attributor = Attributor(folder)
    attributor.follow(other / "providers.d")
    assert attributor.repo is not None and attributor.head() == removed
    assert attributor.attribute_batch({}).changed == removed


def test_a_folder_reached_through_a_symlink_is_attributed(folder: Path, tmp_path: Path) -> None:
    link = tmp_path.parent / f"{tmp_path.name}-link"
    link.symlink_to(tmp_path, target_is_directory=True)
    path = link / "providers.d" / "a.yaml"
    head = git(folder, "rev-parse", "HEAD")
    assert Attributor(link / "providers.d").attribute(current(path)) == {
        path: Attribution(head, ADA, False, head)
    }


def test_a_batch_of_many_files_is_attributed_file_by_file_in_four_git_calls(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = git(folder, "rev-parse", "HEAD")
    ids = [f"p{i:03d}" for i in range(300)]
    for provider_id in ids:
        (folder / f"{provider_id}.yaml").write_bytes(server(provider_id))
    head = commit(folder, "three hundred providers")
    for provider_id in ids[:100]:  # edited, not committed
        (folder / f"{provider_id}.yaml").write_bytes(server(provider_id, "http://moved:8000/v1"))
    for provider_id in ids[100:150]:  # removed, not committed
        (folder / f"{provider_id}.yaml").unlink()
    for provider_id in ("new1", "new2"):
        (folder / f"{provider_id}.yaml").write_bytes(server(provider_id))
    paths = [folder / f"{name}.yaml" for name in (*ids, "new1", "new2", "a")]

    attributor = Attributor(folder)
    assert attributor.repo is not None
    calls: list[str] = []
    run = GitRepo.run

    def counted(self: GitRepo, *args: str, **kwargs: Any) -> bytes:
        calls.append(args[0])
        return run(self, *args, **kwargs)

    monkeypatch.setattr(GitRepo, "run", counted)  # the worktree's and its git directory's calls
    found = attributor.attribute(current(*paths))

    assert len(calls) == 4, calls  # HEAD, HEAD's blob ids, a walk of the log, one of its first parents
    assert list(found) == paths
    edited, removed, unchanged = ids[:100], ids[100:150], ids[150:]
    for provider_id in edited + removed:
        assert found[folder / f"{provider_id}.yaml"] == Attribution(None, ME, True), provider_id
    for provider_id in unchanged:
        assert found[folder / f"{provider_id}.yaml"] == Attribution(head, ME, False, head), provider_id
    assert found[folder / "new1.yaml"] == found[folder / "new2.yaml"] == Attribution(None, None, True)
    assert found[folder / "a.yaml"] == Attribution(head, ADA, False, first)


def test_a_batch_names_the_last_commit_that_touched_each_file_and_the_folder(
    folder: Path, tmp_path: Path
) -> None:
    first = git(folder, "rev-parse", "HEAD")
    (folder / "b.yaml").write_bytes(server("b"))
    added = commit(folder, "add b")
    (tmp_path / "README").write_text("not configuration\n")
    commit(tmp_path, "a readme")  # outside the folder: nothing changed there
    a, b = folder / "a.yaml", folder / "b.yaml"
    batch = Attributor(folder).attribute_batch(current(a, b))
    assert (batch.files[a].changed, batch.files[b].changed, batch.changed) == (first, added, added)
    b.unlink()
    removed = commit(folder, "drop b")
    batch = Attributor(folder).attribute_batch(current(a, b))
    assert (batch.files[a].changed, batch.files[b].changed, batch.changed) == (first, removed, removed)
    a.write_bytes(server("a", "http://elsewhere:8000/v1"))  # not committed: no change commit
    assert Attributor(folder).attribute_batch(current(a)).files[a] == Attribution(None, ADA, True)


def test_a_change_merged_from_a_branch_is_dated_by_its_merge(folder: Path, tmp_path: Path) -> None:
    """A replica that fetched the branch but serves the commit before the merge must see the
    tag's commit as ahead, not as another history: the merge is on the line it serves."""
    git(tmp_path, "checkout", "-q", "-b", "side")
    (folder / "b.yaml").write_bytes(server("b"))
    commit(folder, "add b on a branch", author=ADA)
    git(tmp_path, "checkout", "-q", "-")
    (tmp_path / "README").write_text("meanwhile\n")
    commit(tmp_path, "a readme")
    git(tmp_path, "merge", "-q", "--no-edit", "side")
    merge = git(tmp_path, "rev-parse", "HEAD")
    b = folder / "b.yaml"
    batch = Attributor(folder).attribute_batch(current(b))
    assert batch.files[b] == Attribution(merge, ADA, False, merge)  # the author is still the branch's
    assert batch.changed == merge


def test_a_link_changed_through_its_target_is_dated_by_the_targets_commit(
    folder: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "b.yaml").write_bytes(server("b"))
    (folder / "b.yaml").symlink_to("../shared/b.yaml")
    added = commit(folder, "link b")
    b = folder / "b.yaml"
    (shared / "other.txt").write_text("beside the target, not configuration\n")
    commit(tmp_path, "beside")
    batch = Attributor(folder).attribute_batch(current(b))
    assert (batch.files[b].changed, batch.changed) == (added, added)
    (shared / "b.yaml").write_bytes(server("b", "http://moved:8000/v1"))
    moved = commit(tmp_path, "move b's target")
    batch = Attributor(folder).attribute_batch(current(b))
    assert (batch.files[b].commit, batch.files[b].changed, batch.changed) == (moved, moved, moved)


@pytest.mark.parametrize("name", ["café.yaml", "a b.yaml", 'q"uote.yaml', "tab\there.yaml"])
def test_a_name_git_quotes_is_dated_by_its_own_commit_not_head(
    folder: Path, tmp_path: Path, name: str
) -> None:
    """`git log --name-only` quotes such names (core.quotePath): read as they were, the file
    was never found in the walk and its tag took HEAD, so every commit, even outside the
    folder, changed it and woke the queries held on it."""
    odd = folder / name
    odd.write_bytes(server("odd"))
    added = commit(folder, "add odd", author=ADA)
    (tmp_path / "README").write_text("not configuration\n")
    commit(tmp_path, "a readme")
    batch = Attributor(folder).attribute_batch(current(odd))
    assert (batch.files[odd].changed, batch.files[odd].author, batch.changed) == (added, ADA, added)


def test_a_batch_without_files_names_the_commit_that_emptied_the_folder(folder: Path, tmp_path: Path) -> None:
    """An empty folder is dated by git's log, not by the files a replica saw go: one started
    after the removal (a clone, which has no `providers.d/` at all) has none to attribute."""
    (folder / "a.yaml").unlink()
    removed = commit(folder, "drop a")
    (tmp_path / "README").write_text("not configuration\n")
    commit(tmp_path, "a readme")
    assert Attributor(folder).attribute_batch({}).changed == removed
    folder.rmdir()
    assert Attributor(folder).attribute_batch({}).changed == removed


def test_a_folder_that_never_held_a_file_is_dated_by_the_first_commit(tmp_path: Path) -> None:
    """Nothing in it ever changed: the first commit of the line, which every later commit keeps."""
    git_init(tmp_path)
    (tmp_path / "README").write_text("top\n")
    first = commit(tmp_path, "first")
    (tmp_path / "README").write_text("top, again\n")
    head = commit(tmp_path, "second")
    attributor = Attributor(tmp_path / "providers.d")
    assert attributor.head() == head
    assert attributor.attribute_batch({}).changed == first

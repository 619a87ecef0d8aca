"""absence: whether git says a missing `providers.d/` is the configuration, asked of real git."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from service.vcs.absence import Absence, absence
from service.vcs.gitrepo import GitRepo
from tests.conftest import git, git_init
from tests.vcs.test_attribution import commit, server


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """`providers.d/` of a repository, with `a.yaml` committed."""
    root = tmp_path / "repo"
    root.mkdir()
    git_init(root)
    providers = root / "providers.d"
    providers.mkdir()
    (providers / "a.yaml").write_bytes(server("a"))
    commit(root, "add a")
    return providers


def test_a_folder_removed_by_a_commit_is_confirmed_at_that_commit(folder: Path) -> None:
    git(folder.parent, "rm", "-r", "-q", "providers.d")
    removed = commit(folder.parent, "drop every provider")
    assert not folder.exists()  # git removed the folder its last file left
    assert absence(folder, ["a.yaml"]) == Absence(removed)


def test_a_folder_deleted_by_hand_while_head_holds_it_is_not(folder: Path) -> None:
    head = git(folder.parent, "rev-parse", "HEAD")
    shutil.rmtree(folder)
    found = absence(folder, ["a.yaml"])
    assert (found.confirmed, found.commit) == (False, head)
    assert found.doubt == f"commit {head[:12]} (HEAD) holds it"


def test_a_folder_holding_it_that_goes_while_git_is_asked_is_looked_past(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`config/providers.d` deleted by hand with `config` while git is asked in `config`: that
    ask fails (its folder went), and the working tree is found from the folder above, not
    taken as "not in a git working tree" (a race CI met once)."""
    root = tmp_path / "repo"
    nested = root / "config" / "providers.d"
    nested.mkdir(parents=True)
    git_init(root)
    (nested / "a.yaml").write_bytes(server("a"))
    head = commit(root, "add a")
    shutil.rmtree(nested)
    find = GitRepo.find

    def racing(path: Path, **kwargs: Any) -> GitRepo | None:
        if path.name == "config":
            shutil.rmtree(path)  # gone while git is asked there
        return find(path, **kwargs)

    monkeypatch.setattr(GitRepo, "find", staticmethod(racing))
    found = absence(nested, ["a.yaml"])
    assert (found.commit, found.doubt) == (head, f"commit {head[:12]} (HEAD) holds it")


def test_a_removal_staged_but_not_committed_is_not(folder: Path) -> None:
    git(folder.parent, "rm", "-r", "-q", "providers.d")
    assert not absence(folder).confirmed  # HEAD still holds it


def test_files_staged_then_deleted_by_hand_are_not(folder: Path) -> None:
    other = folder.parent / "config"
    other.mkdir()
    (other / "b.yaml").write_bytes(server("b"))
    git(folder.parent, "add", "config")  # staged, never committed
    shutil.rmtree(other)
    assert absence(other).doubt == "the git index holds files of it"


@pytest.mark.parametrize("rule", ["providers.d/", "providers.d/*", "*.yaml"])
def test_a_folder_git_ignores_is_not(folder: Path, rule: str) -> None:
    """A folder filled by another tool, kept out of git: git cannot say it was removed."""
    git(folder.parent, "rm", "-r", "-q", "--cached", "providers.d")
    (folder.parent / ".gitignore").write_text(f"{rule}\n")
    commit(folder.parent, "providers.d is kept out of git")
    shutil.rmtree(folder)
    assert absence(folder, ["a.yaml"]).doubt == "git ignores it: git does not hold it"


def test_outside_git_or_before_the_first_commit_it_is_not(tmp_path: Path) -> None:
    assert absence(tmp_path / "providers.d") == Absence(None, "not in a git working tree")
    git_init(tmp_path)
    assert absence(tmp_path / "providers.d") == Absence(None, "the repository has no commit yet")


def test_a_link_to_the_worktree_is_followed(folder: Path, tmp_path: Path) -> None:
    """git-sync's `current`: the folder is asked of the worktree the link leads to."""
    git(folder.parent, "rm", "-r", "-q", "providers.d")
    removed = commit(folder.parent, "drop every provider")
    (tmp_path / "current").symlink_to(folder.parent)
    assert absence(tmp_path / "current" / "providers.d") == Absence(removed)


def test_a_folder_no_commit_ever_held_is_not(folder: Path) -> None:
    """Made and deleted by hand (or by another tool) beside what git holds, not ignored: git did
    not remove it, so its last good files are kept (a review found it taken as removed)."""
    other = folder.parent / "untracked.d"
    other.mkdir()
    (other / "b.yaml").write_bytes(server("b"))
    shutil.rmtree(other)
    head = git(folder.parent, "rev-parse", "HEAD")
    found = absence(other, ["b.yaml"])
    assert (found.confirmed, found.commit) == (False, head)
    assert found.doubt == f"no commit up to {head[:12]} (HEAD) ever held it: git did not remove it"


def test_without_git_on_path_the_doubt_says_so(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not "not in a git working tree": the operator is told what to install."""
    git(folder.parent, "rm", "-r", "-q", "providers.d")
    commit(folder.parent, "drop every provider")
    monkeypatch.setenv("PATH", str(folder.parent / "nothing-here"))
    assert absence(folder) == Absence(None, "git is not installed (no `git` on PATH)")

"""The write mode: where a write goes."""

from __future__ import annotations

from pathlib import Path

from service.runtime.delivery import resolve_mode
from service.settings import Settings
from service.vcs.gitrepo import GitRepo
from tests.conftest import git_init


def test_the_mode_follows_git_unless_set(tmp_path: Path) -> None:
    inside = tmp_path / "repo"
    inside.mkdir()
    git_init(inside)
    repo = GitRepo.find(inside)
    assert resolve_mode(Settings(root=inside), repo) == "commit"
    assert resolve_mode(Settings(root=inside, write_mode="branch"), repo) == "branch"
    assert resolve_mode(Settings(root=tmp_path, write_mode="commit"), None) == "off"

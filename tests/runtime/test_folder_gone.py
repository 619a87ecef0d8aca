"""The watcher when `providers.d/` itself goes (docs/reference.md §4).

git removes a folder a commit empties: after `git rm` of every file and a commit (a pull, a
checkout, a git-sync worktree of such a commit) there is no `providers.d/`, and the
configuration is empty, as a replica started fresh at that commit serves it. A folder missing
while the commit served still holds it (deleted by hand), or outside git, is no removal: its
files are refused and their last good versions stay. Real git, a real watcher, a real service.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator

import pytest

from service.http.context import RELOADER
from tests.conftest import Service, SopsProject, eventually, git_init, serve, write_routing, write_server
from tests.http.test_push import API, get
from tests.http.test_tag_holds import commit_all

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

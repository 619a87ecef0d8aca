"""The commit part of a tag (docs/reference.md §6): where the answer's configuration last changed,
not the commit served. A commit of one provider leaves another provider's tag as it was (304,
and a query held on it stays held); a commit outside `providers.d/` leaves every tag as it was."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from service.http.context import RELOADER
from service.http.tags import parse
from tests.conftest import Service, SopsProject, eventually, git, git_init, serve, write_routing, write_server
from tests.http.test_push import API, get
from tests.http.test_tag_holds import commit_all

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def two(sops_project: SopsProject) -> AsyncIterator[Service]:
    """A service on a git repository with `a` and `b` routed for chat, committed."""
    git_init(sops_project.root)
    (sops_project.root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "a")
    write_server(sops_project, "b")
    write_routing(sops_project, ["a", "b"])
    commit_all(sops_project, "setup")
    async with serve(sops_project) as service:
        yield service


def commit_of(tag: str) -> str:
    parts = parse(tag)
    assert parts is not None, tag
    return parts.commit


async def applied(service: Service, commit: str) -> None:
    await service.app[RELOADER].reload()  # a commit that changes no file is seen at the next rescan
    await eventually(lambda: service.registry.state.last_applied_commit == commit, 10)


async def tags_now(service: Service) -> dict[str, str]:
    paths = ("/providers/a", "/providers/b", "/active/chat", "/providers", "/active")
    return {p: (await get(service, API + p)).headers["ETag"] for p in paths}


async def test_a_commit_of_one_provider_leaves_the_others_tag_as_it_was(two: Service) -> None:
    setup = git(two.project.root, "rev-parse", "HEAD")
    before = await tags_now(two)
    assert {commit_of(t) for t in before.values()} == {setup}
    held = asyncio.create_task(
        get(two, f"{API}/providers/b?wait=3s", {"If-None-Match": before["/providers/b"]})
    )
    await asyncio.sleep(0.3)
    write_server(two.project, "a", base_url="http://127.0.0.1:7011/v1")
    change = commit_all(two.project, "move a")
    await applied(two, change)
    after = await tags_now(two)
    assert after["/providers/b"] == before["/providers/b"]
    assert commit_of(after["/providers/a"]) == change and after["/providers/a"] != before["/providers/a"]
    for listed in ("/active/chat", "/providers", "/active"):  # they show `a`
        assert commit_of(after[listed]) == change, listed
    # the body still says what is served
    assert (await get(two, API + "/providers/b")).json()["commit"] == change
    started = time.monotonic()
    assert not held.done()  # the reload woke it, and it held on: b's answer is what its tag says
    answer = await asyncio.wait_for(held, 10)
    assert answer.status == 304 and answer.headers["ETag"] == before["/providers/b"]
    assert time.monotonic() - started > 1.5
    answer = await get(two, API + "/providers/b", {"If-None-Match": before["/providers/b"]})
    assert answer.status == 304


async def test_a_commit_outside_the_providers_folder_changes_no_tag(two: Service) -> None:
    readme = await _held_through_a_readme(two, tags_now)
    assert (await get(two, API + "/active/chat")).json()["commit"] == readme


async def test_the_lists_change_with_the_folder_a_removal_included_the_routes_with_what_they_show(
    two: Service,
) -> None:
    """A list of providers changes with any file of the folder, a removal too (which file went,
    and when, is not in the files left). A route shows its routing and the providers it names:
    a provider routed nowhere, added or removed, leaves its tag as it was, and a query held on
    it holds (docs/reference.md §6: the commit at which the answer's configuration last changed)."""
    setup = git(two.project.root, "rev-parse", "HEAD")
    route = (await get(two, API + "/active/chat")).headers["ETag"]
    held_route = asyncio.create_task(get(two, f"{API}/active/chat?wait=2s", {"If-None-Match": route}))
    write_server(two.project, "c")
    added = commit_all(two.project, "add c, routed nowhere")
    await applied(two, added)
    before = await tags_now(two)
    assert commit_of(before["/providers"]) == added
    assert before["/active/chat"] == route and commit_of(before["/active"]) == setup
    assert commit_of(before["/providers/a"]) != added
    answer = await asyncio.wait_for(held_route, 10)
    assert (answer.status, answer.headers["ETag"]) == (304, route)
    held = asyncio.create_task(get(two, f"{API}/providers?wait=20s", {"If-None-Match": before["/providers"]}))
    await asyncio.sleep(0.3)
    (two.project.providers / "c.yaml").unlink()
    removed = commit_all(two.project, "drop c")
    answer = await asyncio.wait_for(held, 10)
    assert answer.status == 200 and [p["id"] for p in answer.json()["providers"]] == ["a", "b"]
    await applied(two, removed)
    after = await tags_now(two)
    assert commit_of(after["/providers"]) == removed
    assert after["/active/chat"] == route and commit_of(after["/active"]) == setup
    assert after["/providers/a"] == before["/providers/a"] and after["/providers/b"] == before["/providers/b"]
    write_routing(two.project, ["b", "a"])
    reordered = commit_all(two.project, "b first")
    await applied(two, reordered)
    assert commit_of((await get(two, API + "/active/chat")).headers["ETag"]) == reordered


async def test_a_tag_of_a_provider_changed_on_a_replica_ahead_holds(two: Service) -> None:
    """Another replica applied a commit that changed `b`: its tag of `b` names that commit, which
    this replica has not applied; it holds, never answering with the older `b`."""
    project = two.project
    old = (await get(two, API + "/providers/b")).headers["ETag"]
    git(project.root, "checkout", "-q", "-b", "ahead")
    write_server(project, "b", base_url="http://127.0.0.1:7012/v1")
    ahead = commit_all(project)
    git(project.root, "checkout", "-q", "main")
    await asyncio.sleep(0.5)  # the checkout back is applied
    assert (await get(two, API + "/providers/b")).headers["ETag"] == old
    theirs = f'W/"{"0" * 40}.{ahead}.{"1" * 24}"'
    answer = await get(two, f"{API}/providers/b?wait=800ms", {"If-None-Match": theirs})
    assert answer.status == 304 and answer.headers["ETag"] == theirs
    git(project.root, "merge", "-q", "--ff-only", "ahead")
    await applied(two, ahead)
    answer = await get(two, API + "/providers/b", {"If-None-Match": old})
    assert answer.status == 200 and commit_of(answer.headers["ETag"]) == ahead


async def test_a_tag_of_a_provider_added_on_a_replica_ahead_holds_not_404(two: Service) -> None:
    """Another replica applied a commit adding `c` (or re-adding it after its removal): its tag
    of `c` names that commit. Here `c` is not known yet: a 404 at once would be older content,
    the consumer would see `c` and then lose it. It holds, then 304; once applied, `c`."""
    project = two.project
    git(project.root, "checkout", "-q", "-b", "ahead")
    write_server(project, "c")
    ahead = commit_all(project, "add c")
    blob = git(project.root, "rev-parse", f"{ahead}:providers.d/c.yaml")
    git(project.root, "checkout", "-q", "main")
    await asyncio.sleep(0.5)  # the checkout back is applied
    assert (await get(two, API + "/providers/c")).status == 404
    theirs = f'W/"{blob}.{ahead}.{"1" * 24}"'
    started = time.monotonic()
    answer = await get(two, f"{API}/providers/c?wait=800ms", {"If-None-Match": theirs})
    assert answer.status == 304 and answer.headers["ETag"] == theirs
    assert time.monotonic() - started >= 0.7
    held = asyncio.create_task(get(two, f"{API}/providers/c?wait=10s", {"If-None-Match": theirs}))
    await asyncio.sleep(0.3)
    assert not held.done()
    git(project.root, "merge", "-q", "--ff-only", "ahead")
    await applied(two, ahead)
    answer = await asyncio.wait_for(held, 10)
    assert answer.status == 200 and answer.json()["id"] == "c"
    # a tag of an older commit, or made up, for an id that is not there: 404 at once, as before
    old = f'W/"{blob}.{git(project.root, "rev-parse", "HEAD~1")}.{"1" * 24}"'
    started = time.monotonic()
    assert (await get(two, f"{API}/providers/zz?wait=5s", {"If-None-Match": old})).status == 404
    assert time.monotonic() - started < 2


LISTS = ("/providers", "/api-keys", "/servers", "/active")
"""The answers an empty `providers.d/` still gives: lists, built from no file."""


async def list_tags(service: Service) -> dict[str, str]:
    return {p: (await get(service, API + p)).headers["ETag"] for p in LISTS}


async def emptied(service: Service) -> str:
    """Every file of `providers.d/` removed in one commit, applied; that commit."""
    for name in ("a", "b", "routing"):
        (service.project.providers / f"{name}.yaml").unlink()
    removed = commit_all(service.project, "drop every file")
    await applied(service, removed)
    return removed


async def test_an_emptied_folder_keeps_the_tag_of_its_emptying_through_other_commits(two: Service) -> None:
    """With no file left, the lists were tagged with the commit served: every commit, even a
    README's, changed them and woke every query held on them."""
    removed = await emptied(two)
    assert {commit_of(t) for t in (await list_tags(two)).values()} == {removed}
    readme = await _held_through_a_readme(two, list_tags)
    assert (await get(two, API + "/active")).json()["commit"] == readme  # the body says what is served


async def test_a_replica_started_on_an_emptied_folder_gives_the_running_replicas_tags(
    two: Service, tmp_path: Path
) -> None:
    """A replica started at a commit after the emptying has no removal to attribute (a clone has
    no `providers.d/` at all): it dates the empty folder by git's log, as the running one does."""
    removed = await emptied(two)
    (two.project.root / "README.md").write_text("not configuration\n")
    readme = commit_all(two.project, "a readme")
    await applied(two, readme)
    running = await list_tags(two)
    assert {commit_of(t) for t in running.values()} == {removed}
    clone = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(two.project.root), str(clone))
    fresh_project = replace(two.project, root=clone, providers=clone / "providers.d")
    async with serve(fresh_project) as fresh:
        assert fresh.registry.state.last_applied_commit == readme
        assert await list_tags(fresh) == running


async def _held_through_a_readme(two: Service, tags: Callable[[Service], Awaitable[dict[str, str]]]) -> str:
    """Hold a query on each answer `tags` gives, commit a README: no tag moves, no held query
    ends before its wait, each then 304. The README's commit."""
    before = await tags(two)
    held = [
        asyncio.create_task(get(two, f"{API}{path}?wait=2s", {"If-None-Match": tag}))
        for path, tag in before.items()
    ]
    await asyncio.sleep(0.3)
    (two.project.root / "README.md").write_text("not configuration\n")
    readme = commit_all(two.project, "a readme")
    await applied(two, readme)
    assert await tags(two) == before
    assert not any(task.done() for task in held)
    answers = await asyncio.wait_for(asyncio.gather(*held), 10)
    assert [a.status for a in answers] == [304] * len(answers)
    return readme

"""A hostile review of queries held on a tag (docs/reference.md §9, §12; issue 19): tags from
the future or from nowhere, a history rolled back or rewritten, replicas whose histories
differ, and a balancer that cuts a held query off and sends it on to another replica. Real
services on port 0, real git."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from service.http.changes import CHANGES
from service.http.tags import MAX_TAGS
from tests.conftest import Service, SopsProject, eventually, git, serve, write_server
from tests.http.test_push import API, get
from tests.http.test_tag_holds import commit_all, committed, retagged

__all__ = ["committed"]  # the fixture, used here

pytestmark = pytest.mark.timeout(60)


def served(service: Service) -> str | None:
    return service.registry.state.last_applied_commit


async def change(service: Service, port: int) -> tuple[str, str]:
    """Commit `gpu` on another port; (the commit, the tag of `…/active/chat` once applied)."""
    write_server(service.project, "gpu", base_url=f"http://127.0.0.1:{port}/v1")
    commit = commit_all(service.project, f"port {port}")
    await eventually(lambda: served(service) == commit, 10)
    return commit, (await get(service, API + "/active/chat")).headers["ETag"]


async def test_a_rollback_reaches_a_consumer_holding_the_abandoned_commit(committed: Service) -> None:
    """The remote's branch reset to an older commit (git-sync follows a force-push): the commit the
    consumer holds is a descendant of what is served, but this replica served it and left it. It
    will not come back: answered at once with the rolled-back content, not held (304) forever."""
    first = served(committed)
    assert first is not None
    _, abandoned = await change(committed, 7101)
    git(committed.project.root, "reset", "-q", "--hard", first)
    await eventually(lambda: served(committed) == first, 10)
    started = time.monotonic()
    answer = await get(committed, f"{API}/active/chat?wait=5s", {"If-None-Match": abandoned})
    assert answer.status == 200, answer.status
    assert answer.json()["primary"][0]["base_url"] == "http://127.0.0.1:9/v1"
    assert time.monotonic() - started < 2


async def test_a_rewritten_history_applied_here_answers_a_tag_of_the_old_one_at_once(
    committed: Service,
) -> None:
    first = served(committed)
    assert first is not None
    _, old = await change(committed, 7102)
    git(committed.project.root, "reset", "-q", "--hard", first)
    write_server(committed.project, "gpu", base_url="http://127.0.0.1:7103/v1")
    rewritten = commit_all(committed.project, "rewritten")
    await eventually(lambda: served(committed) == rewritten, 10)
    started = time.monotonic()
    answer = await get(committed, f"{API}/active/chat?wait=5s", {"If-None-Match": old})
    assert answer.status == 200 and time.monotonic() - started < 2
    assert answer.json()["primary"][0]["base_url"] == "http://127.0.0.1:7103/v1"


async def test_a_tag_of_a_rewritten_history_the_repository_holds_is_answered_at_once(
    committed: Service,
) -> None:
    """A tag naming a commit the repository holds that is not an ancestor of what it serves (a
    rewritten history), and that this replica never served, is a differing tag like any other
    (docs/reference.md §9): answered at once, not held as if it were ahead."""
    project = committed.project
    first = served(committed)
    assert first is not None
    await change(committed, 7104)
    # the other history: a commit beside the served one, which this repository holds
    git(project.root, "checkout", "-q", "-b", "other", first)
    write_server(project, "gpu", base_url="http://127.0.0.1:7105/v1")
    elsewhere = commit_all(project, "the other history")
    git(project.root, "checkout", "-q", "main")
    await eventually(lambda: served(committed) not in (first, elsewhere), 10)
    await asyncio.sleep(0.3)
    ours = (await get(committed, API + "/active/chat")).headers["ETag"]
    theirs = retagged(ours, commit=elsewhere, digest="3" * 24)
    started = time.monotonic()
    answer = await get(committed, f"{API}/active/chat?wait=5s", {"If-None-Match": theirs})
    assert answer.status == 200 and answer.headers["ETag"] == ours
    assert time.monotonic() - started < 2


async def test_made_up_commits_cannot_starve_a_consumer_of_a_change(committed: Service) -> None:
    """A flood of tags naming made-up commits uses up git's lookups; a consumer whose tag names
    the commit served before a change must still get the change at once."""
    old = (await get(committed, API + "/active/chat")).headers["ETag"]
    await change(committed, 7106)
    flood = [retagged(old, commit=f"{i:040x}") for i in range(1, 80)]
    held = [
        asyncio.create_task(get(committed, f"{API}/active/chat?wait=3s", {"If-None-Match": t})) for t in flood
    ]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    answer = await get(committed, f"{API}/active/chat?wait=3s", {"If-None-Match": old})
    took = time.monotonic() - started
    assert answer.status == 200 and took < 1.5, (answer.status, took)
    assert answer.json()["primary"][0]["base_url"] == "http://127.0.0.1:7106/v1"
    assert {a.status for a in await asyncio.gather(*held)} == {304}


@pytest.mark.parametrize(
    "header",
    [
        # a well-formed tag of the served commit with a made-up blob: differs, answered at once
        "blob",
        # many tags, the current one past the first MAX_TAGS: not looked at, answered at once
        "many",
        # the longest header aiohttp takes: answered, never a 500
        "huge",
    ],
)
async def test_made_up_blobs_many_tags_and_huge_headers_are_answered_at_once(
    committed: Service, header: str
) -> None:
    ours = (await get(committed, API + "/active/chat")).headers["ETag"]
    commit = served(committed)
    assert commit is not None
    if header == "blob":
        value = f'W/"{"e" * 40}.{commit}.{"0" * 24}"'
    elif header == "many":
        value = ", ".join([f'W/"{i:040x}.-.{i:x}"' for i in range(MAX_TAGS)] + [ours])
    else:
        value = ", ".join(['W/"' + "-." * 2 + "a" * 64 + '"'] * 110)
    started = time.monotonic()
    answer = await get(committed, f"{API}/active/chat?wait=5s", {"If-None-Match": value})
    assert answer.status == 200 and answer.headers["ETag"] == ours
    assert time.monotonic() - started < 2


async def test_a_header_past_aiohttps_limit_is_a_400_not_a_500(committed: Service) -> None:
    answer = await get(committed, f"{API}/active/chat?wait=1s", {"If-None-Match": "a" * 20_000})
    assert answer.status == 400


async def test_a_held_query_cut_off_frees_its_slot_and_resumes_on_another_replica(
    sops_project: SopsProject, committed: Service
) -> None:
    """A balancer switches replica mid-hold: the query held on one replica is cut off (its slot
    freed at once, nothing answered), and the same tag asked of another replica holds there,
    then gets the change."""
    first = committed
    var = sops_project.root / "var"
    async with serve(
        sops_project, replica="b", events=var / "b.jsonl", usage_spool=var / "b-spool"
    ) as second:
        tag = (await get(first, API + "/active/chat")).headers["ETag"]
        assert (await get(second, API + "/active/chat")).headers["ETag"] == tag  # one commit, one tag
        async with aiohttp.ClientSession() as http:
            cut = asyncio.create_task(
                http.get(f"{first.url}{API}/active/chat?wait=30s", headers={"If-None-Match": tag})
            )
            await eventually(lambda: first.app[CHANGES].held == 1, 5)
            cut.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cut
        await eventually(lambda: first.app[CHANGES].held == 0, 5)
        resumed = asyncio.create_task(get(second, f"{API}/active/chat?wait=20s", {"If-None-Match": tag}))
        await eventually(lambda: second.app[CHANGES].held == 1, 5)
        write_server(sops_project, "gpu", base_url="http://127.0.0.1:7107/v1")
        commit = commit_all(sops_project, "after the switch")
        answer = await asyncio.wait_for(resumed, 10)
        assert answer.status == 200
        assert answer.json()["primary"][0]["base_url"] == "http://127.0.0.1:7107/v1"
        assert answer.json()["commit"] == commit
        assert first.app[CHANGES].held == 0 and second.app[CHANGES].held == 0

"""Queries held on a tag (docs/reference.md §9): `If-None-Match` with `?wait=` holds until the
answer differs from the tag, never answers with content older than the tag's commit, and never
answers at once a tag that differs only in health and that this replica never gave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from service.http.tags import TAGS, parse
from tests.conftest import Service, SopsProject, eventually, git, git_init, serve, write_routing, write_server
from tests.http.test_push import API, get

pytestmark = pytest.mark.timeout(60)


def commit_all(root: SopsProject, message: str = "change") -> str:
    git(root.root, "add", "-A")
    git(root.root, "commit", "-qm", message)
    return git(root.root, "rev-parse", "HEAD")


@pytest.fixture
async def committed(sops_project: SopsProject) -> AsyncIterator[Service]:
    """A service on a git repository with `gpu` routed for chat, committed."""
    git_init(sops_project.root)
    (sops_project.root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    commit_all(sops_project, "setup")
    async with serve(sops_project) as service:
        yield service


def retagged(tag: str, *, commit: str | None = None, digest: str | None = None) -> str:
    parts = parse(tag)
    assert parts is not None, tag
    return f'W/"{parts.blob}.{commit or parts.commit}.{digest or parts.hash}"'


async def test_a_held_tag_is_answered_when_the_configuration_changes(committed: Service) -> None:
    first = await get(committed, API + "/active/chat")
    tag = first.headers["ETag"]
    assert tag.startswith('W/"')
    held = asyncio.create_task(get(committed, f"{API}/active/chat?wait=30s", {"If-None-Match": tag}))
    await asyncio.sleep(0.3)
    assert not held.done()
    write_server(committed.project, "gpu", base_url="http://127.0.0.1:7001/v1")
    commit = commit_all(committed.project)
    answer = await asyncio.wait_for(held, 10)
    assert answer.status == 200 and answer.headers["ETag"] != tag
    assert answer.json()["primary"][0]["base_url"] == "http://127.0.0.1:7001/v1"
    assert answer.json()["commit"] == commit and parse(answer.headers["ETag"]).commit == commit  # type: ignore[union-attr]


async def test_a_current_tag_holds_for_the_wait_then_is_304(committed: Service) -> None:
    tag = (await get(committed, API + "/providers/gpu")).headers["ETag"]
    started = time.monotonic()
    answer = await get(committed, f"{API}/providers/gpu?wait=700ms", {"If-None-Match": tag})
    assert answer.status == 304 and answer.headers["ETag"] == tag
    assert time.monotonic() - started >= 0.6


async def test_a_measurement_or_a_circuit_moving_wakes_no_held_tag(committed: Service) -> None:
    from service.gateway.health import CheckResult
    from service.http.context import HEALTH

    health = committed.app[HEALTH]
    health.checked("gpu", CheckResult(True, 3.0, "ok: 1 model listed"))  # unknown -> healthy, at once
    tag = (await get(committed, API + "/active/chat")).headers["ETag"]
    held = asyncio.create_task(get(committed, f"{API}/active/chat?wait=1s", {"If-None-Match": tag}))
    await asyncio.sleep(0.2)
    health.checked("gpu", CheckResult(True, 9.0, "ok: 2 models listed"))  # latency, checked_at
    for _ in range(5):
        health.failed("gpu", "HTTP 502")  # the circuit opens: this replica's own
    assert health.get("gpu").circuit == "open"
    answer = await asyncio.wait_for(held, 5)
    assert answer.status == 304
    body = (await get(committed, API + "/active/chat")).json()["primary"][0]["health"]
    assert (body["status"], body["circuit"], body["latency_ms"]) == ("healthy", "open", 9.0)


async def test_a_confirmed_health_change_answers_a_held_tag(committed: Service) -> None:
    from service.gateway.health import CheckResult
    from service.http.context import HEALTH

    health = committed.app[HEALTH]
    health.checked("gpu", CheckResult(True, 3.0, "ok"))
    tag = (await get(committed, API + "/active/chat")).headers["ETag"]
    held = asyncio.create_task(get(committed, f"{API}/active/chat?wait=20s", {"If-None-Match": tag}))
    await asyncio.sleep(0.2)
    health.checked("gpu", CheckResult(False, 3.0, "HTTP 503"))
    await asyncio.sleep(0.2)
    assert not held.done()  # one result: not confirmed
    health.checked("gpu", CheckResult(False, 3.0, "HTTP 503"))
    answer = await asyncio.wait_for(held, 5)
    assert answer.status == 200
    assert answer.json()["primary"][0]["health"]["status"] == "unhealthy"
    assert answer.json()["primary"][0]["health"]["reason"] == "HTTP 503"


async def test_a_tag_from_the_future_holds_and_never_steps_back(committed: Service) -> None:
    """A tag naming a commit this replica has not applied (a replica that is behind, or a made-up
    commit): answering would show older content. Held, then 304 with the client's own tag."""
    tag = (await get(committed, API + "/active/chat")).headers["ETag"]
    future = retagged(tag, commit="f" * 40, digest="0" * 24)
    started = time.monotonic()
    answer = await get(committed, f"{API}/active/chat?wait=800ms", {"If-None-Match": future})
    assert answer.status == 304 and answer.headers["ETag"] == future and answer.body == b""
    assert time.monotonic() - started >= 0.7
    # without `wait`, the same: never the older content
    assert (await get(committed, f"{API}/active/chat", {"If-None-Match": future})).status == 304


async def test_a_tag_from_the_future_sent_with_an_index_never_steps_back(committed: Service) -> None:
    """`?index=N` answers at once when N is not this replica's index, and at shutdown; a tag this
    replica has not applied, sent with it, still never gets older content (docs/reference.md §9:
    "A replica never answers a tag with older content", and shutdown's "304 for a tag whose
    commit it has not applied"): 304 with the client's own tag. It was 200 with the old content."""
    first = await get(committed, API + "/active/chat")
    index = int(first.headers["X-Switchboard-Index"])
    future = retagged(first.headers["ETag"], commit="f" * 40, digest="0" * 24)
    started = time.monotonic()
    elsewhere = await get(
        committed, f"{API}/active/chat?index={index + 5}&wait=30s", {"If-None-Match": future}
    )
    assert time.monotonic() - started < 2
    assert elsewhere.status == 304 and elsewhere.headers["ETag"] == future and elsewhere.body == b""
    held = asyncio.create_task(
        get(committed, f"{API}/active/chat?index={index}&wait=300s", {"If-None-Match": future})
    )
    await asyncio.sleep(0.5)
    assert not held.done()
    await committed.stop()
    answer = await asyncio.wait_for(held, 10)
    assert answer.status == 304 and answer.headers["ETag"] == future and answer.body == b""


async def test_a_tag_of_a_commit_not_applied_yet_holds_until_it_is(committed: Service) -> None:
    """The replica's clone has the commit (fetched) but serves an older one: the query holds until
    it applies it, then answers with it."""
    project = committed.project
    old = (await get(committed, API + "/active/chat")).headers["ETag"]
    # A commit made beside the served tree (the files stay as they are): this replica has the
    # object but has not applied it.
    git(project.root, "checkout", "-q", "-b", "ahead")
    write_server(project, "gpu", base_url="http://127.0.0.1:7002/v1")
    ahead = commit_all(project)
    git(project.root, "checkout", "-q", "main")
    await eventually(lambda: committed.registry.state.last_applied_commit != ahead, 5)
    await asyncio.sleep(0.3)  # the checkout back is applied
    assert (await get(committed, API + "/active/chat")).headers["ETag"] == old
    # Another replica's tag of that commit (its hash made up here: health seen differently, so
    # that even once applied the query holds for its wait, as a tag never given does).
    theirs = retagged(old, commit=ahead, digest="1" * 24)
    held = asyncio.create_task(get(committed, f"{API}/active/chat?wait=3s", {"If-None-Match": theirs}))
    await asyncio.sleep(0.5)
    assert not held.done()
    git(project.root, "merge", "-q", "--ff-only", "ahead")
    await eventually(lambda: committed.registry.state.last_applied_commit == ahead, 5)
    answer = await asyncio.wait_for(held, 10)
    assert answer.status == 200 and answer.json()["primary"][0]["base_url"] == "http://127.0.0.1:7002/v1"
    assert parse(answer.headers["ETag"]).commit == ahead  # type: ignore[union-attr]


async def test_a_tag_of_an_older_commit_is_answered_at_once(committed: Service) -> None:
    old = (await get(committed, API + "/active/chat")).headers["ETag"]
    write_server(committed.project, "gpu", base_url="http://127.0.0.1:7003/v1")
    commit = commit_all(committed.project)
    await eventually(lambda: committed.registry.state.last_applied_commit == commit, 10)
    started = time.monotonic()
    answer = await get(committed, f"{API}/active/chat?wait=20s", {"If-None-Match": old})
    assert answer.status == 200 and time.monotonic() - started < 2


async def test_health_this_replica_never_gave_holds_for_the_wait_then_answers(committed: Service) -> None:
    """Another replica saw health differently (without Redis): its tag differs only in the hash.
    Answering at once would bounce the consumer between the two; it holds, then is answered."""
    tag = (await get(committed, API + "/active/chat")).headers["ETag"]
    other = retagged(tag, digest="2" * 24)
    started = time.monotonic()
    answer = await get(committed, f"{API}/active/chat?wait=800ms", {"If-None-Match": other})
    assert answer.status == 200 and answer.headers["ETag"] == tag
    assert time.monotonic() - started >= 0.7
    # a tag it gave, whose health has since changed, is answered at once
    assert committed.app[TAGS].given(tag)


@pytest.mark.parametrize(
    "garbage",
    [
        'W/"nonsense"',
        '"' + "a" * 5000 + '"',
        'W/"-.-.zz"',
        "*, ,,,",
        'W/"' + "0" * 40 + "." + "1" * 40 + '.x"',
    ],
)
async def test_a_garbage_tag_is_answered_never_a_500_nor_a_loop(committed: Service, garbage: str) -> None:
    started = time.monotonic()
    answer = await get(committed, f"{API}/active/chat?wait=1s", {"If-None-Match": garbage})
    if garbage.startswith("*"):
        assert answer.status == 304  # `*`: any current answer matches
    else:
        assert answer.status == 200 and answer.headers["ETag"].startswith('W/"')
        assert time.monotonic() - started < 0.9


async def test_many_made_up_commits_keep_git_to_its_rate(committed: Service) -> None:
    """Each new commit named in a tag is asked of git once; a flood of made-up ones, past
    the rate, is held without asking (holding is safe), and nothing fails."""
    tag = (await get(committed, API + "/active/chat")).headers["ETag"]
    tags = [retagged(tag, commit=f"{i:040x}") for i in range(60)]
    answers = await asyncio.gather(
        *(get(committed, f"{API}/active/chat?wait=300ms", {"If-None-Match": t}) for t in tags)
    )
    assert {a.status for a in answers} == {304}


async def test_shutdown_answers_queries_held_on_a_tag_at_once(committed: Service) -> None:
    """Shutdown answers each held query at once: with 200 and the current content, or 304 for a
    tag whose commit this replica has not applied (docs/reference.md §9)."""
    tag = (await get(committed, API + "/active/chat")).headers["ETag"]
    future = retagged(tag, commit="f" * 40, digest="0" * 24)
    other = retagged(tag, digest="2" * 24)  # health this replica never gave
    held = [
        asyncio.create_task(get(committed, f"{API}/active/chat?wait=300s", {"If-None-Match": t}))
        for t in (future, other)
    ]
    await asyncio.sleep(0.5)
    assert not any(h.done() for h in held)
    started = time.monotonic()
    await committed.stop()
    ahead, unseen = await asyncio.wait_for(asyncio.gather(*held), 10)
    assert time.monotonic() - started < 5
    assert ahead.status == 304 and ahead.headers["ETag"] == future and ahead.body == b""
    assert unseen.status == 200 and unseen.headers["ETag"] == tag and unseen.json()["purpose"] == "chat"


async def test_shutdown_answers_a_query_held_on_the_current_tag_with_the_content(committed: Service) -> None:
    """A consumer holding on the tag it has (the usual case: nothing changed) gets 200 and the
    current content at shutdown, as every held query does, not a 304 that would leave it
    asking this replica again; with `?index=` and the same tag alike (docs/reference.md §9)."""
    first = await get(committed, API + "/active/chat")
    tag, index = first.headers["ETag"], first.headers["X-Switchboard-Index"]
    held = [
        asyncio.create_task(get(committed, f"{API}/active/chat?wait=300s", {"If-None-Match": tag})),
        asyncio.create_task(
            get(committed, f"{API}/active/chat?index={index}&wait=300s", {"If-None-Match": tag})
        ),
        asyncio.create_task(get(committed, f"{API}/providers/gpu?wait=300s", {"If-None-Match": "*"})),
    ]
    await asyncio.sleep(0.5)
    assert not any(h.done() for h in held)
    started = time.monotonic()
    await committed.stop()
    on_tag, on_index, on_star = await asyncio.wait_for(asyncio.gather(*held), 10)
    assert time.monotonic() - started < 5
    for answer in (on_tag, on_index):
        assert answer.status == 200, answer.status
        assert answer.headers["ETag"] == tag and answer.json() == first.json()
    assert on_star.status == 200 and on_star.json()["id"] == "gpu"

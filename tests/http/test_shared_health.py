"""Shared health (docs/reference.md §12): with Redis, a status one replica confirms is shown by
every replica within a second, so they give one tag; circuits stay each replica's own; what
Redis carries that is not a replica's signed note is ignored.

Two services in this process, each with its own event log, serve one project and share Debian's
real `redis-server`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from service.gateway.health import CheckResult
from service.http.context import FANOUT, HEALTH
from service.runtime.fanout import channel_of
from service.runtime.messages import HealthNote, parse_health
from service.vcs.gitrepo import blob_sha
from tests.conftest import Service, SopsProject, eventually, serve, write_routing, write_server
from tests.http.test_push import API, get
from tests.support.replicas import Checkout, RedisServer, clone, git, server_yaml

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def pair(project: SopsProject, url: str) -> AsyncIterator[tuple[Service, Service]]:
    write_server(project, "gpu")
    write_routing(project, ["gpu"])
    var = project.root / "var"
    async with (
        serve(project, replica="a", redis_url=url, events=var / "a.jsonl", usage_spool=var / "a-spool") as a,
        serve(project, replica="b", redis_url=url, events=var / "b.jsonl", usage_spool=var / "b-spool") as b,
    ):
        await eventually(lambda: a.app[FANOUT].connected and b.app[FANOUT].connected, 10)
        yield a, b


def changes(service: Service) -> list[Any]:
    return [e for e in service.events() if e.type == "provider.health_changed"]


async def status(service: Service) -> tuple[str, str | None]:
    health = (await get(service, API + "/providers/gpu")).json()["health"]
    return health["status"], health["reason"]


async def test_a_status_one_replica_confirms_is_shown_by_the_other_within_a_second(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    async with pair(sops_project, redis_server.url) as (a, b):
        a.app[HEALTH].checked("gpu", CheckResult(False, 2.0, "HTTP 503"))  # after unknown: at once
        confirmed = time.monotonic()
        await eventually(lambda: b.app[HEALTH].get("gpu").confirmed == ("unhealthy", "HTTP 503"), 5)
        took = time.monotonic() - confirmed
        assert await status(b) == ("unhealthy", "HTTP 503")
        tag_a = (await get(a, API + "/active/chat")).headers["ETag"]
        tag_b = (await get(b, API + "/active/chat")).headers["ETag"]
        a.app[HEALTH].checked("gpu", CheckResult(True, 2.0, "ok"))
        a.app[HEALTH].checked("gpu", CheckResult(True, 2.0, "ok"))
        await eventually(lambda: b.app[HEALTH].get("gpu").status == "healthy", 5)
        events_b = await eventually(lambda: len(changes(b)) == 2 and changes(b), 5)
    assert took < 1.0
    assert tag_a == tag_b  # one commit, one health: one tag, whatever the logs hold
    assert [e.changes["status"]["new"] for e in events_b] == ["unhealthy", "healthy"]  # type: ignore[attr-defined]


async def test_circuits_stay_each_replicas_own(sops_project: SopsProject, redis_server: RedisServer) -> None:
    async with pair(sops_project, redis_server.url) as (a, b):
        for _ in range(5):
            a.app[HEALTH].failed("gpu", "HTTP 502")
        assert a.app[HEALTH].get("gpu").circuit == "open"
        await asyncio.sleep(0.5)
        assert b.app[HEALTH].get("gpu").circuit == "closed"
        assert (await get(a, API + "/active/chat")).headers["ETag"] == (
            await get(b, API + "/active/chat")
        ).headers["ETag"]


async def forge(url: str, message: Any) -> None:
    client = redis.Redis.from_url(url)
    try:
        data = message if isinstance(message, bytes | str) else json.dumps(message)
        await client.publish(channel_of(url), data)
    finally:
        await client.aclose()


async def test_forged_and_malformed_health_notes_are_ignored(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    """Anyone who can publish on Redis but does not hold the age identity cannot move a
    replica's health: unsigned, wrongly signed, malformed, future-dated notes, or notes about
    a provider or a version of it this replica does not serve, are dropped."""
    async with pair(sops_project, redis_server.url) as (a, b):
        b.app[HEALTH].checked("gpu", CheckResult(True, 1.0, "ok"))
        blob = blob_sha((sops_project.providers / "gpu.yaml").read_bytes())
        now = time.time()
        note = HealthNote("gpu", blob, "unhealthy", "forged", now)
        forged = [
            note.signed("x", "intruder", None),  # unsigned
            note.signed("x", "intruder", b"not the key"),  # signed with another key
            HealthNote("gpu", blob, "unhealthy", "late", now + 3600).signed("x", "i", b"k"),
            {"kind": "health", "provider": "gpu", "status": "unhealthy"},
            {"kind": "health", "provider": "../etc", "blob": blob, "status": "down", "at": now},
            b"\xff\xfe not json",
            "[" * 10_000,
            "x" * 100_000,
        ]
        for message in forged:
            await forge(redis_server.url, message)
        # A message larger than any reply Redis sends here ends the session (by design: the
        # fan-out's bounded parser), which starts again; wait for it before the real notes.
        await asyncio.sleep(0.3)
        await eventually(lambda: b.app[FANOUT].connected, 10)
        # a real note, signed as the replicas sign, about another version of the file: ignored too
        key = a.app[FANOUT].health_key
        assert key is not None
        other = HealthNote("gpu", "0" * 40, "unhealthy", "old version", now).signed("a", "x", key)
        await forge(redis_server.url, other)
        # and one that is right, to know the others were heard before it
        right = HealthNote("gpu", blob, "unhealthy", "HTTP 503", time.time()).signed("a", "x", key)
        await forge(redis_server.url, right)
        await eventually(lambda: b.app[HEALTH].get("gpu").confirmed == ("unhealthy", "HTTP 503"), 5)
        events = await eventually(lambda: changes(b) or False, 5)
        assert (await get(b, "/readyz")).status == 200
    reasons = [e.reason for e in events]  # type: ignore[attr-defined]
    assert reasons == ["HTTP 503"]


def test_a_note_is_checked_field_by_field() -> None:
    now = time.time()
    good = HealthNote("gpu", "a" * 40, "unhealthy", "HTTP 503", now)
    assert parse_health(good.signed("r", "i", b"k"), b"k", now) == (good, "i")
    assert parse_health(good.signed("r", "i", b"k"), b"other", now) is None
    assert parse_health(good.signed("r", "i", None), b"k", now) is None
    bad_reason = HealthNote("gpu", "a" * 40, "unhealthy", "line\nbreak", now)
    assert parse_health(bad_reason.signed("r", "i", None), None, now) is None
    unknown = HealthNote("gpu", "a" * 40, "unknown", None, now)
    assert parse_health(unknown.signed("r", "i", None), None, now) is None
    nan = json.dumps({**json.loads(good.signed("r", "i", None)), "at": float("nan")})
    assert parse_health(nan, None, now) is None
    # confirmed long ago and sent now (told to a replica that joined): news; sent long ago: a replay
    old = HealthNote("gpu", "a" * 40, "unhealthy", "HTTP 503", now - 86_400)
    assert parse_health(old.signed("r", "i", b"k", now), b"k", now) == (old, "i")
    assert parse_health(old.signed("r", "i", b"k"), b"k", now) is None
    assert parse_health(good.signed("r", "i", b"k", now - 3600), b"k", now) is None
    # what the status says of the key: `refused` goes with unhealthy, `works` with healthy
    refused = HealthNote("gpu", "a" * 40, "unhealthy", "HTTP 401", now, "refused")
    assert parse_health(refused.signed("r", "i", b"k"), b"k", now) == (refused, "i")
    for status, key in (("healthy", "refused"), ("unhealthy", "works"), ("healthy", "yes")):
        odd = HealthNote("gpu", "a" * 40, status, None, now, key)
        assert parse_health(odd.signed("r", "i", b"k"), b"k", now) is None


async def test_a_refused_key_is_shared_as_one_and_only_a_request_through_it_clears_it(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    """§7: "Only a request through it that succeeds clears [a refused key]: a check that lists
    models may succeed with a revoked key". Shared, a refusal was a plain `unhealthy`: another
    replica's checks (a public models list) confirmed `healthy` over it, and the replica whose
    key was refused adopted that, showing the revoked key healthy (to `…/litellm` too)."""
    async with pair(sops_project, redis_server.url) as (a, b):
        a.app[HEALTH].refuse("gpu", "HTTP 401: invalid api key")
        await eventually(lambda: b.app[HEALTH].get("gpu").status == "unhealthy", 5)
        await asyncio.sleep(1.1)  # past b's adoption of a second: b's own word would be heard
        for _ in range(2):  # b's checks: the models list answers, the key is still revoked
            b.app[HEALTH].checked("gpu", CheckResult(True, 1.0, "ok", models=("m",)))
        await asyncio.sleep(1.5)
        assert a.app[HEALTH].get("gpu").confirmed == ("unhealthy", "HTTP 401: invalid api key")
        assert b.app[HEALTH].get("gpu").confirmed == ("unhealthy", "HTTP 401: invalid api key")
        b.app[HEALTH].succeeded("gpu", 0.1)  # a request through it, on b, worked: the key does
        await eventually(lambda: a.app[HEALTH].get("gpu").status == "healthy", 5)
        assert b.app[HEALTH].get("gpu").status == "healthy"


async def test_a_flood_of_notes_adopts_at_most_one_a_second_and_the_last_wins(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    async with pair(sops_project, redis_server.url) as (a, b):
        key = a.app[FANOUT].health_key
        blob = blob_sha((sops_project.providers / "gpu.yaml").read_bytes())
        client = redis.Redis.from_url(redis_server.url)
        try:
            for i in range(200):
                state = "unhealthy" if i % 2 == 0 else "healthy"
                note = HealthNote(
                    "gpu", blob, state, f"flap {i}" if state == "unhealthy" else None, time.time()
                )
                await client.publish(channel_of(redis_server.url), note.signed("a", "x", key))
        finally:
            await client.aclose()
        await asyncio.sleep(2.5)
        events = [e for e in b.events() if e.type == "provider.health_changed"]
        assert b.app[HEALTH].get("gpu").status == "healthy"  # the last note published
    assert len(events) <= 4


async def test_a_replica_that_starts_later_shows_what_the_others_confirmed_long_before(
    sops_project: SopsProject, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "All replicas show one health status per provider within 1 s": a replica that joins (a
    new pod, a restart) is told what the others show, however long ago they confirmed it, and
    does not show `unknown` (and give another tag) until its own checks find out. Notes are
    dated twice: when the status was confirmed (the newest wins) and when the note was sent
    (what a replayed note is refused by)."""
    monkeypatch.setattr("service.runtime.messages.PAST_S", 0.5)  # "long before", without a wait
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    var = sops_project.root / "var"
    url = redis_server.url
    async with serve(
        sops_project, replica="a", redis_url=url, events=var / "a.jsonl", usage_spool=var / "a-s"
    ) as a:
        await eventually(lambda: a.app[FANOUT].connected, 10)
        a.app[HEALTH].checked("gpu", CheckResult(False, 2.0, "HTTP 503"))
        await asyncio.sleep(1.0)  # past PAST_S: the note a published then is no news to anyone now
        async with serve(
            sops_project, replica="b", redis_url=url, events=var / "b.jsonl", usage_spool=var / "b-s"
        ) as b:
            await eventually(lambda: b.app[FANOUT].connected, 10)
            joined = time.monotonic()
            await eventually(lambda: b.app[HEALTH].get("gpu").confirmed == ("unhealthy", "HTTP 503"), 5)
            assert time.monotonic() - joined < 1.0
            assert (await get(a, API + "/active/chat")).headers["ETag"] == (
                await get(b, API + "/active/chat")
            ).headers["ETag"]


async def test_a_replica_that_catches_up_to_the_others_commit_after_joining_is_told_then(
    sops_project: SopsProject, redis_server: RedisServer, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """A replica that joins on an older commit (a checkout behind, git-sync not yet swapped) is
    told the others' statuses for versions of the files it does not serve, and ignores them. Once
    it serves their commit, the provider whose file changed is `unknown` there (reset, §7): it is
    told again then, and does not show `unknown` (another tag) for ever with checks off."""
    bare, author = remote
    old = author.head()
    author.commit({"gpu.yaml": server_yaml("gpu", 9) + "# tuned\n"})
    author.push()
    url, var = redis_server.url, tmp_path / "var"
    first, second = clone(bare, tmp_path / "a"), clone(bare, tmp_path / "b")
    git(second.root, "reset", "-q", "--hard", old)
    places = [{"root": c.root, "providers": c.providers} for c in (first, second)]
    async with serve(sops_project, replica="a", redis_url=url, events=var / "a.jsonl", **places[0]) as a:
        await eventually(lambda: a.app[FANOUT].connected, 10)
        a.app[HEALTH].checked("gpu", CheckResult(False, 2.0, "HTTP 503"))
        async with serve(sops_project, replica="b", redis_url=url, events=var / "b.jsonl", **places[1]) as b:
            await eventually(lambda: b.app[FANOUT].connected, 10)
            await asyncio.sleep(1.5)  # told, for a version of gpu.yaml it does not serve: ignored
            assert b.app[HEALTH].get("gpu").status == "unknown"
            git(second.root, "merge", "-q", "--ff-only", "origin/main")  # b catches up
            caught_up = time.monotonic()

            async def serving() -> None:
                _, ready = await b.get("/readyz")
                assert ready["last_applied_commit"] == first.head()

            await eventually(serving, 5)
            await eventually(lambda: b.app[HEALTH].get("gpu").confirmed == ("unhealthy", "HTTP 503"), 5)
            assert time.monotonic() - caught_up < 2.5
            assert (await get(a, API + "/active/chat")).headers["ETag"] == (
                await get(b, API + "/active/chat")
            ).headers["ETag"]

"""`switchboard serve --workers N` (docs/reference.md §3.2) with real processes: a leader and a
follower on one port (SO_REUSEPORT), Debian's `redis-server` sharing the limits, a local
stand-in vendor. Every connection is a new one, so the kernel spreads them over both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from service.cli.main import cli
from service.cli.serve import adopt_follower_spools
from service.cli.workers import gone
from service.settings import Settings
from service.usage.encoding import encode
from service.usage.ledger import Ledger
from service.usage.spool import Spool
from service.usage.stores import open_store
from tests.conftest import SopsProject, until
from tests.support.replicas import RedisServer, replicas
from tests.support.upstreams import FakeUpstream
from tests.support.workers import (
    API,
    LIMITED,
    LOAD,
    READER,
    ROUNDS,
    alive,
    awaitable,
    chat,
    chat_answers,
    children,
    chunked_chat,
    configure,
    fresh,
    leader,
    listening,
    private_folder,
    relayed_then_asked,
    replayed,
    restarted,
    route,
    worker_metrics,
    worker_requests,
)
from tests.usage.conftest import record
from tests.usage.test_ledger import stored_ids

pytestmark = pytest.mark.timeout(180)


async def test_two_workers_serve_one_port_as_one_service(
    sops_project: SopsProject, tmp_path: Path, redis_server: RedisServer
) -> None:
    async with FakeUpstream(name="a") as a, FakeUpstream(name="b") as b:
        configure(sops_project, a, b)
        member = leader(sops_project, tmp_path, redis_server)
        async with replicas(member):
            assert member.process is not None
            await until(lambda: awaitable(len(children(member.process.pid)) == 1), 20, "a follower")
            folder = private_folder(member)
            await listening(folder)

            # both accept connections, and /metrics (the leader's) counts every answer
            answers = [await chat(member, LOAD) for _ in range(ROUNDS)]
            assert [s for s, _, _ in answers] == [200] * ROUNDS
            assert all(h["x-switchboard-provider"] == "a" for _, h, _ in answers)
            by_follower = await worker_requests(folder)
            assert 0 < by_follower < ROUNDS, "the kernel gave the follower none (or all) of 40 connections"
            _, _, text = await fresh(member, "GET", "/metrics", READER)
            assert chat_answers(text.decode()) == ROUNDS

            # the API answers the same whichever worker the connection landed on: the leader's
            tags = set()
            for _ in range(20):
                status, headers, _ = await fresh(member, "GET", f"{API}/active", READER)
                assert status == 200
                tags.add(headers["etag"])
            assert len(tags) == 1
            audits = set()
            for _ in range(20):
                status, headers, body = await fresh(member, "GET", f"{API}/audit", READER)
                assert status == 200
                audits.add((headers["etag"], headers.get("x-switchboard-index"), body))
            assert len(audits) == 1
            for _ in range(10):  # relayed calls first, then the API on the same connection: the leader's
                assert await relayed_then_asked(member) == (200, 200, tags.pop() if len(tags) == 1 else None)
                tags = {(await fresh(member, "GET", f"{API}/active", READER))[1]["etag"]}
            last = len(member.events_file.read_text().splitlines())
            streams = {await replayed(member, last) for _ in range(10)}
            assert len(streams) == 1

            # a call the fast path leaves to aiohttp (a chunked body, 512 KiB) is piped to the leader whole
            for _ in range(6):
                status, headers, body = await fresh(
                    member,
                    "POST",
                    "/v1/chat/completions",
                    LOAD,
                    data=chunked_chat(),
                    headers={"Content-Type": "application/json"},
                )
                assert status == 200 and headers["x-switchboard-provider"] == "a", body

            # an rpm of 5 across both workers is 5
            statuses = [(await chat(member, LIMITED))[0] for _ in range(12)]
            assert statuses.count(200) == 5 and statuses.count(429) == 7, statuses

            # a change of the files is served by both within the reload budget
            route(sops_project, "b")

            async def moved() -> bool:
                found = [(await chat(member, LOAD))[1]["x-switchboard-provider"] for _ in range(10)]
                return set(found) == {"b"}

            assert await until(moved, 10, "both workers route to b") < 5

            # one writer of the event log: the leader's start, not the follower's
            lines = [yaml.safe_load(line) for line in member.events_file.read_text().splitlines()]
            assert [e["type"] for e in lines].count("service.started") == 1
            assert len({e["seq"] for e in lines}) == len(lines)

            # a follower killed is started again, and serves; the merged counts do not go down
            _, _, text = await fresh(member, "GET", "/metrics", READER)
            counted = chat_answers(text.decode())
            (follower,) = children(member.process.pid)
            os.kill(follower, signal.SIGKILL)
            await until(lambda: awaitable(restarted(member, follower)), 20, "the follower started again")
            await until(
                lambda: awaitable((folder / "worker-1.sock").exists()), 20, "the follower listening again"
            )
            assert [(await chat(member, LOAD))[0] for _ in range(10)] == [200] * 10
            _, _, text = await fresh(member, "GET", "/metrics", READER)
            assert chat_answers(text.decode()) >= counted + 10
            (follower,) = children(member.process.pid)

            # SIGTERM to the leader stops both
            await member.stop(signal.SIGTERM)
            assert member.process.returncode == 0, member.log()
            await until(lambda: awaitable(not alive(follower)), 20, "the follower stopped")
            assert not folder.exists()


async def test_a_follower_ends_with_its_leader_even_one_starting(
    sops_project: SopsProject, tmp_path: Path, redis_server: RedisServer
) -> None:
    async with FakeUpstream(name="a") as a:
        configure(sops_project, a)
        member = leader(sops_project, tmp_path, redis_server)
        async with replicas(member):
            assert member.process is not None
            await until(lambda: awaitable(len(children(member.process.pid)) == 1), 20, "a follower")
            (follower,) = children(member.process.pid)
            folder = private_folder(member)
            await listening(folder)
            await member.stop(signal.SIGKILL)
            await until(lambda: awaitable(not alive(follower)), 20, "the follower gone with its leader")
            assert not folder.exists()  # the leader's private folder, which it had no time to remove
        member = leader(sops_project, tmp_path, redis_server)
        await member.start()  # killed while its follower starts: the follower does not stay
        assert member.process is not None
        await until(lambda: awaitable(len(children(member.process.pid)) == 1), 20, "a follower")
        (follower,) = children(member.process.pid)
        await member.stop(signal.SIGKILL)
        await until(lambda: awaitable(not alive(follower)), 20, "the starting follower gone with its leader")
        await until(lambda: awaitable(not private_folder(member).exists()), 10, "the leader's folder removed")


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_fewer_than_one_worker_is_refused(
    workers: str, sops_project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("--root", str(sops_project.root), "serve", "--workers", workers) == 2
    assert "SWITCHBOARD_WORKERS" in capsys.readouterr().err


def test_workers_without_redis_are_refused_in_one_line(
    sops_project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SWITCHBOARD_REDIS_URL", raising=False)
    assert cli("--root", str(sops_project.root), "serve", "--workers", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SWITCHBOARD_REDIS_URL" in err and "shared" in err


async def test_a_budget_a_follower_exhausts_is_one_event_in_the_leaders_log_and_no_token_is_logged(
    sops_project: SopsProject, tmp_path: Path, redis_server: RedisServer
) -> None:
    async with FakeUpstream(name="a") as a:
        configure(sops_project, a)
        priced = yaml.safe_load((sops_project.providers / "a.yaml").read_text())
        priced["pricing"] = {"*": {"input": "0", "output": "1000000"}}  # 1 USD a token out
        (sops_project.providers / "a.yaml").write_text(yaml.safe_dump(priced))
        clients = yaml.safe_load((sops_project.providers / "clients.yaml").read_text())
        clients["clients"][0]["limits"] = {"budget": {"usd": "1", "period": "day"}}
        (sops_project.providers / "clients.yaml").write_text(yaml.safe_dump(clients))
        member = leader(sops_project, tmp_path, redis_server)
        async with replicas(member):
            assert member.process is not None
            folder = private_folder(member)
            await listening(folder)

            async def the_follower_refused() -> bool:
                await chat(member, LIMITED)
                text = await worker_metrics(folder)
                return any("chat" in line and 'status="429"' in line for line in text.splitlines())

            await until(the_follower_refused, 20, "a refusal by the follower")
            for _ in range(6):  # and more, landing on either
                await chat(member, LIMITED)

            async def written() -> bool:
                return '"budget.exhausted"' in member.events_file.read_text()

            await until(written, 10, "budget.exhausted in the log")
            await asyncio.sleep(0.5)
            lines = [yaml.safe_load(line) for line in member.events_file.read_text().splitlines()]
            exhausted = [e for e in lines if e["type"] == "budget.exhausted"]
            assert [(e["subject"], e["kind"]) for e in exhausted] == [("limited", "client")]

            # the private surfaces are not on TCP: the leader's `/events` of followers is not a route there
            status, _, _ = await fresh(
                member, "POST", "/events", READER, json={"subject": "x", "kind": "client"}
            )
            assert status in (401, 403, 404, 405)
        log = (tmp_path / "leader.log").read_text()  # the leader's lines and its follower's
        assert "worker-1" in log
        for token in (LIMITED, LOAD, READER):
            assert token not in log


async def test_a_key_refused_is_one_health_event_and_both_workers_know_it(
    sops_project: SopsProject, tmp_path: Path, redis_server: RedisServer
) -> None:
    async with FakeUpstream(name="a") as a:
        configure(sops_project, a)
        member = leader(sops_project, tmp_path, redis_server)
        async with replicas(member):
            assert member.process is not None
            folder = private_folder(member)
            await listening(folder)
            a.fail(401)  # the upstream refuses the key: `unhealthy` at once, a confirmed status
            for _ in range(10):
                await chat(member, LOAD)

            def unhealthy(text: str) -> bool:
                return 'switchboard_provider_healthy{provider="a"} 0.0' in text

            async def both_know() -> bool:
                _, _, text = await fresh(member, "GET", "/metrics", READER)
                return unhealthy(text.decode()) and unhealthy(await worker_metrics(folder))

            await until(both_know, 10, "both workers show `a` unhealthy")
            await asyncio.sleep(1.5)  # a note adopted late would write a second event by now
            lines = [yaml.safe_load(line) for line in member.events_file.read_text().splitlines()]
            changed = [e for e in lines if e["type"] == "provider.health_changed" and e["subject"] == "a"]
            assert [e["changes"]["status"]["new"] for e in changed] == ["unhealthy"], changed


def test_a_leader_is_gone_once_dead_even_before_its_followers_are_given_another_parent() -> None:
    """A leader killed with threads running dies thread by thread: its main thread, a zombie,
    sends its followers SIGTERM (PR_SET_PDEATHSIG) while its other threads still make it their
    parent (`getppid()` unchanged); a follower that stops must see it gone all the same, and
    remove its private folder, which no one else will."""
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        until_dead = time.monotonic() + 10
        while "Z" not in Path(f"/proc/{dead.pid}/stat").read_text().rpartition(")")[2].split()[0]:
            assert time.monotonic() < until_dead
            time.sleep(0.01)
        assert not gone(running.pid)
        assert gone(dead.pid)  # a zombie: dead, not yet reaped
    finally:
        running.kill()
        running.wait()
        dead.wait()
    assert gone(dead.pid)


async def test_the_spools_of_followers_no_longer_started_are_stored_by_the_leader(tmp_path: Path) -> None:
    """A follower's usage spool is `<spool>/worker-K`, drained by the follower K started next. A
    leader started with fewer workers (or one) has no follower K: what such a spool holds (a
    follower killed, the database down) is moved into the leader's own spool at its start, and
    stored once; a spool a process still holds is left to it."""
    spool = tmp_path / "spool"
    records = {k: [record(id=f"w{k}-{i}") for i in range(3)] for k in (1, 2, 3)}
    for k, made in records.items():
        worker = Spool(spool / f"worker-{k}")
        for r in made:
            worker.append(encode(r))
        if k != 3:
            worker.close()  # left as a follower killed leaves it
        else:
            held = worker  # a process still runs with it
    (spool / "worker-1" / "000000000007.stored").write_bytes(encode(records[1][0]))  # stored already
    leaders = Spool(spool)
    leaders.append(encode(record(id="leader")))
    leaders.close()
    try:
        db = str(tmp_path / "usage.db")
        settings = Settings(usage_spool=spool, usage_db=db, workers=2)
        adopt_follower_spools(settings)  # a leader with follower 1: 2 and 3 are no one's
        assert sorted(p.name for p in (spool / "worker-1").glob("0*")) == [
            "000000000001.jsonl",
            "000000000007.stored",
        ]
        assert not (spool / "worker-2").exists()
        ledger = Ledger(open_store(db, tmp_path), spool, retry_max_s=0.2)
        await ledger.start()
        try:
            await ledger.flush()
        finally:
            await ledger.stop()
        expected = ["leader", *(r.id for r in records[2])]
        assert sorted(stored_ids(db, tmp_path)) == sorted(expected)
    finally:
        held.close()
    settings = settings.model_copy(update={"workers": 1})
    adopt_follower_spools(settings)  # back to one process: every follower's spool is the leader's
    assert not (spool / "worker-1").exists() and not (spool / "worker-3").exists()
    ledger = Ledger(open_store(db, tmp_path), spool, retry_max_s=0.2)
    await ledger.start()
    try:
        await ledger.flush()
    finally:
        await ledger.stop()
    stored = stored_ids(db, tmp_path)
    assert sorted(stored) == sorted(["leader", *(r.id for rs in records.values() for r in rs)])


async def test_at_a_stop_each_request_in_flight_is_answered_whichever_worker_holds_it(
    sops_project: SopsProject, tmp_path: Path, redis_server: RedisServer
) -> None:
    """SIGTERM to the leader: as one process does, every request in flight is answered before
    the stop, those a follower relays and those it pipes to the leader (a chunked body)."""
    async with FakeUpstream(name="a") as a:
        configure(sops_project, a)
        member = leader(sops_project, tmp_path, redis_server)
        async with replicas(member):
            folder = private_folder(member)
            await listening(folder)
            a.latency_s = 2.0

            async def piped() -> int:
                headers = {"Content-Type": "application/json"}
                return (
                    await fresh(
                        member, "POST", "/v1/chat/completions", LOAD, data=chunked_chat(), headers=headers
                    )
                )[0]

            async def relayed() -> int:
                return (await chat(member, LOAD))[0]

            in_flight = [asyncio.create_task(piped()) for _ in range(8)]
            in_flight += [asyncio.create_task(relayed()) for _ in range(4)]
            await asyncio.sleep(1)
            assert member.process is not None
            member.process.send_signal(signal.SIGTERM)
            statuses = await asyncio.gather(*in_flight, return_exceptions=True)
            assert statuses == [200] * 12
            await member.process.wait()
            assert member.process.returncode == 0, member.log()
            assert not folder.exists()


async def test_a_connection_piped_and_closed_leaves_no_open_file_in_the_follower(
    sops_project: SopsProject, tmp_path: Path, redis_server: RedisServer
) -> None:
    """The leader closes a connection once it answered (`Connection: close`), the client then
    closes its end: both ends of the pipe close, none is left half-closed for good (two file
    descriptors of the follower per connection)."""
    async with FakeUpstream(name="a") as a:
        configure(sops_project, a)
        member = leader(sops_project, tmp_path, redis_server)
        async with replicas(member):
            assert member.process is not None
            folder = private_folder(member)
            await listening(folder)
            (follower,) = children(member.process.pid)
            before = len(list(Path(f"/proc/{follower}/fd").iterdir()))
            for _ in range(40):
                assert (await fresh(member, "GET", f"{API}/active", READER))[0] == 200
            # about half landed on the follower (the kernel spreads new connections)

            async def closed() -> bool:
                return len(list(Path(f"/proc/{follower}/fd").iterdir())) < before + 6

            await until(closed, 5, "the follower's pipes closed")

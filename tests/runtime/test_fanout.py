"""The Redis fan-out (docs/reference.md §12) with Debian's real `redis-server`, and with servers
that misbehave.

Two services in this process share a Redis; a fake TCP server stands in for a Redis that
hangs or answers garbage. Whatever Redis does, requests are answered at once and the
background thread never lets an exception out.
"""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from service.http.context import FANOUT, PULLER
from service.runtime.fanout import CHECKS_PER_S, MAX_PEERS, MESSAGES_PER_S, Fanout
from service.runtime.messages import Beat, parse_beat
from tests.conftest import Service, SopsProject, eventually, serve
from tests.support.replicas import Checkout, RedisServer, clone, git, routing_yaml, server_yaml

API = "/api/v1/llm-config"


@asynccontextmanager
async def member(
    project: SopsProject, checkout: Checkout, name: str, **settings: Any
) -> AsyncIterator[Service]:
    async with serve(
        project,
        root=checkout.root,
        providers=checkout.providers,
        events=checkout.root / "var" / "events.jsonl",
        replica=name,
        git_pull="origin/main",
        git_pull_interval_s=3600,  # only the start, the hook and the fan-out pull
        **settings,
    ) as service:
        yield service


async def metric_is(service: Service, name: str, value: float) -> None:
    assert await service.metric(name) == value


async def replicas(service: Service) -> dict[str, Any]:
    status, body = await service.get(f"{API}/replicas")
    assert status == 200
    return dict(body)


# -- with a real Redis -------------------------------------------------------------------------------


async def test_replicas_see_each_other_and_a_commit_one_applies_is_pulled_by_the_other(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, redis_server: RedisServer
) -> None:
    bare, author = remote
    async with (
        member(sops_project, clone(bare, tmp_path / "a"), "a", redis_url=redis_server.url) as a,
        member(sops_project, clone(bare, tmp_path / "b"), "b", redis_url=redis_server.url) as b,
    ):

        async def both_listed() -> None:
            body = await replicas(a)
            assert body["shared"] is True
            assert [r["replica"] for r in body["replicas"]] == ["a", "b"]

        await eventually(both_listed, timeout=6)
        pushed = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        started = time.monotonic()
        await a.app[PULLER].pull()  # as a webhook to `a` would: b hears of it from a
        await eventually(lambda: b.registry.state.last_applied_commit == pushed, timeout=2)
        assert time.monotonic() - started < 2

        async def converged() -> None:
            listed = (await replicas(b))["replicas"]
            assert {r["commit"] for r in listed} == {pushed} and all(r["ready"] for r in listed)

        await eventually(converged, timeout=5)


async def test_redis_killed_mid_run_changes_nothing_but_the_shared_flag(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, redis_server: RedisServer
) -> None:
    bare, _ = remote
    async with member(sops_project, clone(bare, tmp_path / "a"), "a", redis_url=redis_server.url) as a:
        await eventually(lambda: a.app[FANOUT].connected, timeout=5)
        redis_server.stop()
        await eventually(lambda: not a.app[FANOUT].connected, timeout=8)
        await answered_at_once(a)
        body = await replicas(a)
        assert body["shared"] is False and [r["replica"] for r in body["replicas"]] == ["a"]
        # The gauge is set just after the flag, from the fan-out's thread: waited on, not raced.
        await eventually(lambda: metric_is(a, "switchboard_fanout_connected", 0.0))


async def test_without_redis_the_replica_lists_itself_alone(sops_project: SopsProject) -> None:
    (sops_project.providers / "gpu.yaml").write_text(server_yaml("gpu", 9))
    async with serve(sops_project, replica="solo") as service:
        body = await replicas(service)
        assert body["shared"] is False
        [own] = body["replicas"]
        state = service.registry.state
        assert own["replica"] == "solo" and own["ready"] is True
        assert own["generation"] == state.snapshot.generation and own["commit"] == state.last_applied_commit


# -- Redis that misbehaves -------------------------------------------------------------------------


@asynccontextmanager
async def fake_redis(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        for writer in list(_writers):
            writer.close()
        _writers.clear()


_writers: list[asyncio.StreamWriter] = []


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _writers.append(writer)
    await asyncio.sleep(3600)  # takes the connection, reads nothing, answers nothing


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _writers.append(writer)
    try:
        while await reader.read(4096):
            writer.write(b"\x00\xffnot RESP at all\r\n*-7\r\n$99999999999\r\n:nan\r\n")
            await writer.drain()
    except ConnectionError:
        pass


async def answered_at_once(service: Service) -> None:
    """A round of requests, each answered well within 0.5 s."""
    for path in ("/readyz", f"{API}/active/chat", f"{API}/replicas", "/metrics"):
        for _ in range(5):
            started = time.monotonic()
            async with service.http.get(service.url + path) as response:
                assert response.status == 200, path
                await response.read()
            assert time.monotonic() - started < 0.5, path


@pytest.mark.parametrize("handler", [hang, garbage], ids=["hanging", "garbage"])
async def test_a_redis_that_hangs_or_answers_garbage_holds_no_request_up(
    sops_project: SopsProject,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> None:
    (sops_project.providers / "gpu.yaml").write_text(server_yaml("gpu", 9))
    (sops_project.providers / "routing.yaml").write_text(routing_yaml("gpu"))
    async with fake_redis(handler) as url, serve(sops_project, replica="r", redis_url=url) as service:
        fanout = service.app[FANOUT]
        deadline = time.monotonic() + 3  # several sessions fail and start again meanwhile
        while time.monotonic() < deadline:
            await answered_at_once(service)
        assert not fanout.connected
        assert fanout._thread is not None and fanout._thread.is_alive()  # no exception got out
        body = await replicas(service)
        assert body["shared"] is False and [r["replica"] for r in body["replicas"]] == ["r"]
        started = time.monotonic()
    assert time.monotonic() - started < 5  # and it stops promptly


# -- what is heard -------------------------------------------------------------------------------------


def test_only_well_formed_heartbeats_are_heard() -> None:
    good = {"replica": "a", "instance": "i", "commit": "a" * 40, "generation": 3, "ready": True}
    assert parse_beat(json.dumps(good).encode()) == (Beat("a", "a" * 40, 3, True), "i")
    assert parse_beat(json.dumps(good | {"commit": None})) is not None
    for bad in (
        b"\xff\xfe",
        b"[]",
        b"null",
        b"[" * 100_000,
        json.dumps(good | {"commit": "HEAD~1"}).encode(),
        json.dumps(good | {"commit": "--upload-pack=touch /tmp/x"}).encode(),
        json.dumps(good | {"replica": ""}).encode(),
        json.dumps(good | {"replica": "a\nb"}).encode(),
        json.dumps(good | {"generation": True}).encode(),
        json.dumps(good | {"generation": -1}).encode(),
        json.dumps(good | {"ready": "yes"}).encode(),
        json.dumps(good | {"padding": "x" * 5000}).encode(),
    ):
        assert parse_beat(bad) is None, bad[:60]


async def test_a_flood_of_made_up_replicas_is_bounded_and_a_bad_commit_pulls_nothing() -> None:
    asked: list[str] = []
    fanout = Fanout(
        "redis://127.0.0.1:1/0",
        lambda: Beat("me", "b" * 40, 1, True),
        knows=lambda commit: False,
        on_new=asked.append,
    )
    for i in range(MAX_PEERS + 50):
        beat = {"replica": f"r{i}", "instance": "x", "commit": None, "generation": 1, "ready": True}
        await fanout._hear(json.dumps(beat).encode())
    assert len(fanout.peers) == MAX_PEERS
    await fanout._hear(
        b'{"replica": "r1", "instance": "x", "commit": "not-a-commit", "generation": 1, "ready": 1}'
    )
    await fanout._hear(
        json.dumps({"replica": "r1", "instance": "x", "commit": "c" * 40, "generation": 2, "ready": True})
    )
    await fanout._hear(
        json.dumps({"replica": "r2", "instance": "x", "commit": "c" * 40, "generation": 2, "ready": True})
    )
    assert asked == ["c" * 40]  # asked for once, not once per replica that names it


async def test_made_up_commits_cannot_keep_git_busy() -> None:
    looked_up: list[str] = []

    def knows(commit: str) -> bool:
        looked_up.append(commit)
        return False

    fanout = Fanout(
        "redis://127.0.0.1:1/0", lambda: Beat("me", None, 1, True), knows=knows, on_new=lambda c: None
    )
    for i in range(500):  # a flood, well within a second
        beat = {"replica": "liar", "instance": "x", "commit": f"{i:040x}", "generation": 1, "ready": True}
        await fanout._hear(json.dumps(beat).encode())
    assert len(looked_up) == CHECKS_PER_S


# -- a server that announces more than Redis ever sends ------------------------------------------------


async def _command(reader: asyncio.StreamReader) -> list[bytes] | None:
    line = await reader.readline()
    if not line.startswith(b"*"):
        return None
    args = []
    for _ in range(int(line[1:])):
        await reader.readline()
        args.append((await reader.readline()).strip())
    return args


def huge_reply(header: bytes, filler: bytes, sent: list[int]) -> Callable[..., Awaitable[None]]:
    """A RESP3 server that answers HELLO and SUBSCRIBE, then pushes a message whose data
    announces `header` and streams `filler` (at most 256 MB); `sent` counts what it got out."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _writers.append(writer)
        channel = b"switchboard:replicas"
        try:
            while (args := await _command(reader)) is not None:
                name = args[0].upper()
                if name == b"HELLO":
                    writer.write(b"%1\r\n+server\r\n+redis\r\n")
                elif name == b"SUBSCRIBE":
                    channel = args[1]
                    writer.write(b">3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel))
                    writer.write(
                        b">3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n%s\r\n" % (len(channel), channel, header)
                    )
                    chunk = filler * ((1 << 20) // len(filler))
                    for _ in range(256):
                        writer.write(chunk)
                        await writer.drain()
                        sent[0] += len(chunk)
                    return
                elif name == b"PUBLISH":
                    writer.write(b":1\r\n")
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except ConnectionError:
            pass

    return handle


@pytest.mark.parametrize(
    ("header", "filler"), [(b"$1500000000", b"x"), (b"*100000000", b":1\r\n")], ids=["string", "array"]
)
async def test_a_reply_larger_than_redis_sends_is_cut_off_not_buffered(header: bytes, filler: bytes) -> None:
    """redis-py buffers whatever length a reply announces: `$1500000000` followed by a stream
    of bytes made the fan-out thread hold gigabytes before its timeout came."""
    sent = [0]
    tracemalloc.start()
    try:
        async with fake_redis(huge_reply(header, filler, sent)) as url:
            fanout = Fanout(
                url, lambda: Beat("me", None, 1, True), knows=lambda c: True, on_new=lambda c: None
            )
            fanout.start()
            try:
                await asyncio.sleep(2)  # past the socket timeout: the client has given up either way
            finally:
                await asyncio.to_thread(fanout.stop)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the client hung up at the header, not gigabytes later


async def test_a_redis_that_hangs_leaves_no_unretrieved_task_errors_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`asyncio.wait_for` around redis-py's own timeout (both 1 s) left the inner task's
    TimeoutError unretrieved: a traceback logged by asyncio for every session that failed."""
    async with fake_redis(hang) as url:
        fanout = Fanout(
            url, lambda: Beat("me", None, 1, True), knows=lambda c: True, on_new=lambda c: None, timeout_s=0.2
        )
        fanout.start()
        try:
            await asyncio.sleep(3)
        finally:
            await asyncio.to_thread(fanout.stop)
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


async def test_deployments_on_two_databases_of_one_redis_do_not_hear_each_other(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis' pub/sub ignores the database number: two deployments sharing a Redis each on a
    database of its own (`/0`, `/1`) listed each other's replicas and pulled for each other's
    commits."""
    bare, _ = remote
    first, second = redis_server.url, redis_server.url.removesuffix("/0") + "/1"
    async with (
        member(sops_project, clone(bare, tmp_path / "a"), "a", redis_url=first) as a,
        member(sops_project, clone(bare, tmp_path / "b"), "b", redis_url=second) as b,
        member(sops_project, clone(bare, tmp_path / "c"), "c", redis_url=second) as c,
    ):
        await eventually(lambda: a.app[FANOUT].connected and b.app[FANOUT].connected, timeout=5)

        async def listed(service: Service, names: list[str]) -> None:
            assert [r["replica"] for r in (await replicas(service))["replicas"]] == names

        await eventually(lambda: listed(b, ["b", "c"]), timeout=6)
        await asyncio.sleep(2.5)  # more than a heartbeat
        await listed(a, ["a"])
        await listed(c, ["b", "c"])


async def test_a_flood_of_messages_is_read_at_a_bounded_rate(redis_server: RedisServer) -> None:
    """Whoever may publish on the channel could keep the fan-out thread parsing messages as
    fast as Redis delivers them, and every request then waited its turn for the interpreter
    lock (requests' p99 went from 0.5 ms to 30-50 ms under a `redis-benchmark` flood). It reads at
    most MESSAGES_PER_S a second; Redis holds the rest (or drops a subscriber that lags)."""
    heard: list[float] = []
    fanout = Fanout(redis_server.url, lambda: Beat("me", None, 1, True), knows=bool, on_new=lambda c: None)
    hear = fanout._hear

    async def counted(data: Any) -> None:
        heard.append(time.monotonic())
        await hear(data)

    fanout._hear = counted  # type: ignore[method-assign]
    fanout.start()
    try:
        await eventually(lambda: fanout.connected, timeout=5)
        publisher = redis.Redis.from_url(redis_server.url)
        async with publisher.pipeline(transaction=False) as pipe:
            for i in range(5 * MESSAGES_PER_S):
                made_up = {"replica": f"r{i % 500}", "instance": "x", "commit": None, "generation": 1}
                pipe.publish(fanout.channel, json.dumps(made_up | {"ready": True}))
            await pipe.execute()
        await publisher.aclose()
        await asyncio.sleep(1.5)  # into the next second, when reading goes on
    finally:
        await asyncio.to_thread(fanout.stop)
    first = heard[0]
    assert len([t for t in heard if t - first < 1.0]) <= MESSAGES_PER_S + 5
    assert len(heard) > MESSAGES_PER_S and len(fanout.peers) > 100  # what was read was heard


async def test_made_up_commits_and_a_peer_posing_as_this_replica_move_nothing(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, redis_server: RedisServer
) -> None:
    """What a peer announces only ever asks for a pull, and a pull only fast-forwards to what the
    remote's branch has: a commit of another branch, an older one or one that exists nowhere
    moves nothing, and a peer using this replica's name is not listed over it."""
    bare, author = remote
    first = author.head()
    mine = clone(bare, tmp_path / "a")
    other = author.commit({"gpu.yaml": server_yaml("gpu", 66)}, "on another branch")
    git(author.root, "push", "-q", "origin", "HEAD:refs/heads/other")
    git(author.root, "reset", "-q", "--hard", first)
    ahead = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
    author.push()
    git(mine.root, "pull", "-q", "--ff-only", "origin", "main")
    async with member(sops_project, mine, "a", redis_url=redis_server.url) as a:
        await eventually(lambda: a.app[FANOUT].connected, timeout=5)
        assert a.registry.state.last_applied_commit == ahead

        async def pulled(at_least: float) -> None:
            assert await a.metric("switchboard_pulls_total") >= at_least

        await eventually(lambda: pulled(1))  # the pull at the start, done
        before = await a.metric("switchboard_pulls_total")
        publisher = redis.Redis.from_url(redis_server.url)
        try:
            for name, commit in (("b", other), ("c", first), ("d", "e" * 40), ("a", other), ("a", None)):
                beat = {"replica": name, "instance": "forged", "commit": commit, "generation": 99}
                await publisher.publish(a.app[FANOUT].channel, json.dumps(beat | {"ready": True}))
        finally:
            await publisher.aclose()
        await eventually(lambda: {p.beat.replica for p in a.app[FANOUT].live()} == {"b", "c", "d"}, timeout=3)
        await eventually(lambda: pulled(before + 1), timeout=5)  # asked for by the unknown commits
        assert mine.head() == ahead and a.registry.state.last_applied_commit == ahead
        assert a.app[PULLER].status.status == "ok"
        own = [r for r in (await replicas(a))["replicas"] if r["replica"] == "a"]
        assert len(own) == 1 and own[0]["commit"] == ahead


# -- who is listed, and for how long (docs/reference.md §12) -----------------------------------------


async def test_a_replica_that_stops_leaves_the_list_within_ten_seconds_and_each_entry_has_its_fields(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, redis_server: RedisServer
) -> None:
    """`…/replicas` lists "every replica heard from in the last 10 s", each as `replica`,
    `commit`, `generation`, `ready`, `seen_at`: one that stopped is gone from the list once it
    has not been heard from for 10 s (and not long after: heartbeats are every 2 s)."""
    bare, _ = remote
    async with member(sops_project, clone(bare, tmp_path / "a"), "a", redis_url=redis_server.url) as a:
        async with member(sops_project, clone(bare, tmp_path / "b"), "b", redis_url=redis_server.url) as b:

            async def both() -> None:
                assert [r["replica"] for r in (await replicas(a))["replicas"]] == ["a", "b"]

            await eventually(both, timeout=6)
            body = await replicas(a)
            assert set(body) == {"replicas", "shared"} and body["shared"] is True
            for entry in body["replicas"]:
                assert set(entry) == {"replica", "commit", "generation", "ready", "seen_at"}
                seen = datetime.fromisoformat(entry["seen_at"].replace("Z", "+00:00"))
                assert abs((datetime.now(UTC) - seen).total_seconds()) < 10
            (_, other) = body["replicas"]
            assert other["commit"] == b.registry.state.last_applied_commit and other["ready"] is True
        stopped = time.monotonic()

        async def alone() -> None:
            assert [r["replica"] for r in (await replicas(a))["replicas"]] == ["a"]

        await eventually(alone, timeout=20)
        assert time.monotonic() - stopped > 5  # heard from until it stopped, listed about 10 s more


async def test_redis_back_after_an_outage_shares_again_and_fans_out_again(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis away for a while, then back (empty, as after a restart): the replicas reconnect by
    themselves, list each other again (`"shared": true`), and a commit one applies is pulled
    by the other at once again."""
    bare, author = remote
    async with (
        member(sops_project, clone(bare, tmp_path / "a"), "a", redis_url=redis_server.url) as a,
        member(sops_project, clone(bare, tmp_path / "b"), "b", redis_url=redis_server.url) as b,
    ):
        await eventually(lambda: a.app[FANOUT].connected and b.app[FANOUT].connected, timeout=5)
        redis_server.stop()
        await eventually(lambda: not a.app[FANOUT].connected and not b.app[FANOUT].connected, timeout=8)
        assert (await replicas(a))["shared"] is False
        redis_server.start()

        async def together() -> None:
            body = await replicas(a)
            assert body["shared"] is True and [r["replica"] for r in body["replicas"]] == ["a", "b"]

        await eventually(together, timeout=15)
        await eventually(lambda: b.app[FANOUT].connected, timeout=10)
        pushed = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        await a.app[PULLER].pull()
        await eventually(lambda: b.registry.state.last_applied_commit == pushed, timeout=3)

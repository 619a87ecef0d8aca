"""One limit across replicas (docs/reference.md §13): two Switchboards on one Redis (Debian's redis-server)
share a client's rpm and budget; Redis stopped mid-run leaves each its share, and its return
reconciles them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from service.http.context import LIMITS
from tests.conftest import SopsProject, eventually
from tests.gateway.test_metering import READER, Records, chat, metered, priced_provider, write_clients
from tests.support.gateway import Switchboard, write_routing
from tests.support.replicas import RedisServer
from tests.support.upstreams import FakeUpstream


@contextlib.asynccontextmanager
async def two(
    project: SopsProject, url: str, **settings: Any
) -> AsyncIterator[tuple[Switchboard, Switchboard, Records, Records]]:
    var = project.root / "var"
    async with (
        metered(
            project,
            redis_url=url,
            replica="one",
            events=var / "one" / "events.jsonl",
            usage_spool=var / "one" / "spool",
            **settings,
        ) as (
            a,
            ra,
        ),
        metered(
            project,
            redis_url=url,
            replica="two",
            events=var / "two" / "events.jsonl",
            usage_spool=var / "two" / "spool",
            **settings,
        ) as (
            b,
            rb,
        ),
    ):
        yield a, b, ra, rb


async def test_two_replicas_share_one_rpm_and_one_budget(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, pricing={"*": {"input": "0", "output": "1000000"}})
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 15, "budget": {"usd": "30", "period": "day"}})
        async with two(sops_project, redis_server.url) as (a, b, ra, rb):
            _, ready = await _ready(a)
            assert ready["limits"] == "redis" and ready["degraded"] is False
            answers = await asyncio.gather(*(chat(a if n % 2 else b, max_tokens=3) for n in range(40)))
            statuses = [r.status for r in answers]
            bodies = [await r.json() for r in answers if r.status == 429]
            # ten fit the budget (3 USD each of 30); the rpm of 15 is not reached
            assert statuses.count(200) == 10 and {x["error"]["type"] for x in bodies} == {"budget_exceeded"}
            assert {r.replica for r in ra.kept + rb.kept} == {"one", "two"}
            # the rpm, across both: 10 admitted, 5 more in the minute
            write_clients(sops_project, {"rpm": 15})
            await eventually(lambda: _unbudgeted(a), timeout=10)
            await eventually(lambda: _unbudgeted(b), timeout=10)
            answers = await asyncio.gather(*(chat(a if n % 2 else b, max_tokens=3) for n in range(10)))
            assert sorted(r.status for r in answers) == [200] * 5 + [429] * 5


async def _ready(board: Switchboard) -> tuple[int, Any]:
    response = await board.get("/readyz")
    return response.status, await response.json()


async def _unbudgeted(board: Switchboard) -> bool:
    response = await board.get("/api/v1/llm-config/limits", token=READER)
    client = next(c for c in (await response.json())["clients"] if c["name"] == "client")
    return bool(client["limits"] == {"rpm": 15})


async def test_redis_stopped_mid_run_then_back_budgets_still_hold(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, pricing={"*": {"input": "0", "output": "1000000"}})
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "30", "period": "day"}})
        async with two(sops_project, redis_server.url) as (a, b, ra, rb):
            for board in (a, b, a, b):  # 12 USD spent, across both
                assert (await chat(board, max_tokens=3)).status == 200
            await eventually(lambda: a.app[LIMITS].limiter.replicas == 2, timeout=5)
            redis_server.stop()
            for board in (a, b):  # in the fallback mode within 5 s
                await eventually(lambda board=board: _degraded(board), timeout=5)
            # 18 USD left when Redis went, 9 each: three requests of 3 USD on each replica
            served = {"a": 0, "b": 0}
            for name, board in (("a", a), ("b", b)):
                for _ in range(5):
                    if (await chat(board, max_tokens=3)).status == 200:
                        served[name] += 1
            assert served == {"a": 3, "b": 3}
            redis_server.start()  # empty: it saved nothing
            for board in (a, b):  # back on Redis within 10 s
                await eventually(lambda board=board: _on_redis(board), timeout=10)
            refused = await chat(a, max_tokens=3)
            assert refused.status == 429  # 30 spent: Redis has it all again
            response = await a.get("/api/v1/llm-config/limits", token=READER)
            client = next(c for c in (await response.json())["clients"] if c["name"] == "client")
            assert client["used"]["budget_spent_usd"] == "30"
            assert sum(r.cost_usd for r in ra.kept + rb.kept) == 30


async def _degraded(board: Switchboard) -> bool:
    _, ready = await _ready(board)
    return bool(ready["degraded"] and ready["limits"] == "local")


async def _on_redis(board: Switchboard) -> bool:
    _, ready = await _ready(board)
    return bool(ready["limits"] == "redis")


async def test_refuse_mode_answers_503_recorded_and_counted_as_limited(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    """With Redis away and `refuse`, a limited client gets 503 `limits_unavailable`: a record
    that `/usage` counts as limited (not an error), with no provider, 0 tokens and cost 0; a
    client without limits is still served."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 100})
        async with metered(sops_project, redis_url=redis_server.url, limits_without_redis="refuse") as (
            board,
            records,
        ):
            redis_server.stop()
            await eventually(lambda: _refusing(board), timeout=10)
            refused = await chat(board)
            body = await refused.json()
            served = await chat(board, token=READER)  # no limits: nothing to check
            metrics = await board.metrics()
    assert refused.status == 503 and body["error"]["type"] == "limits_unavailable"
    assert refused.headers["Retry-After"] == "1" and refused.headers["retry-after-ms"] == "1000"
    assert "x-request-id" in refused.headers and served.status == 200
    record = next(r for r in records.kept if r.client == "client")
    assert (record.status, record.limited, record.provider, record.cost_usd, record.prompt_tokens) == (
        503,
        True,
        None,
        0,
        0,
    )
    assert 'switchboard_limited_total{client="client",limit="unavailable"} 1.0' in metrics
    assert upstream_requests(up) == 1  # only the unlimited client's


def upstream_requests(up: FakeUpstream) -> int:
    return len(up.requests)


async def _refusing(board: Switchboard) -> bool:
    _, ready = await _ready(board)
    return bool(ready["limits"] == "refuse")


async def test_a_request_no_provider_could_take_for_its_budget_counts_toward_no_limit_on_redis(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    """As without Redis: a 503 `no_candidate` (every candidate's budget refusing) leaves the
    client's shared rpm as it was (the contract: "A request refused by one limit consumes
    nothing of the others")."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, budget={"usd": "50", "period": "day"})  # cannot take one
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 2})
        async with two(sops_project, redis_server.url) as (a, b, _, _):
            answers = [await chat(a if n % 2 else b, max_tokens=5) for n in range(4)]
            limits = await (await a.get("/api/v1/llm-config/limits", token=READER)).json()
    assert [r.status for r in answers] == [503] * 4, [r.status for r in answers]
    assert [r.headers["x-switchboard-remaining-requests"] for r in answers] == ["2"] * 4
    client = next(c for c in limits["clients"] if c["name"] == "client")
    assert (client["used"]["requests_60s"], client["used"]["in_flight"]) == (0, 0)
    assert limits["mode"] == "redis" and not up.requests


async def test_concurrent_answers_on_two_replicas_each_say_what_remained_once_they_were_counted(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    """As in one process: six requests in flight at once on two replicas sharing an rpm of 6
    are counted one after the other in Redis, and their answers say 5 to 0 between them."""
    async with FakeUpstream(name="a", latency_s=0.3) as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 6})
        async with two(sops_project, redis_server.url) as (a, b, _, _):
            answers = await asyncio.gather(*(chat(a if n % 2 else b) for n in range(6)))
    assert [r.status for r in answers] == [200] * 6
    assert sorted(r.headers["x-switchboard-remaining-requests"] for r in answers) == list("012345")


async def test_a_replica_started_without_redis_is_ready_degraded_and_enforces_each_limit_locally(
    sops_project: SopsProject,
) -> None:
    """Redis unreachable from the start: the service is ready all the same, `/readyz` says
    `"limits": "local"` and degraded, and each limit holds from this replica's own counts."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 2})
        async with metered(sops_project, redis_url=url) as (board, _):
            status, ready = await _ready(board)
            answers = [await chat(board, max_tokens=3) for _ in range(3)]
    assert status == 200 and ready["limits"] == "local" and ready["degraded"] is True
    assert [a.status for a in answers] == [200, 200, 429]
    assert [a.headers["x-switchboard-remaining-requests"] for a in answers] == ["1", "0", "0"]
    assert len(up.requests) == 2

"""Usage, cost and limits (docs/reference.md §13) with real processes: `switchboard serve` killed
with SIGKILL under load and started again, two replicas sharing Debian's `redis-server` and a
PostgreSQL ledger, the ledger's database stopped and started again under them. The upstream
is a local stand-in vendor; every wait is bounded and polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import yaml

from tests.conftest import SopsProject, until
from tests.support.postgres import PostgresServer
from tests.support.replicas import RedisServer, Replica, free_port, replica_env, replicas
from tests.support.upstreams import FakeUpstream

pytestmark = pytest.mark.timeout(120)

TOKEN = "sk-client-0123456789abcdef"
OTHER = "sk-other-0123456789abcdef"
READER = "sk-reader-0123456789abcdef"
API = "/api/v1/llm-config"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def configure(
    project: SopsProject,
    upstream: FakeUpstream,
    client: dict[str, Any] | None,
    other: dict[str, Any] | None = None,
) -> None:
    """One priced server `a` (0 USD a token in, 1 USD a token out) routed for chat; `client`
    (TOKEN, these limits), `other` (OTHER, `other`'s limits) and `reader` (usage:read)."""
    provider = {
        "kind": "ai_server",
        "id": "a",
        "server_type": "vllm",
        "base_url": upstream.base_url,
        "purposes": ["chat"],
        "pricing": {"*": {"input": "0", "output": "1000000"}},
    }
    (project.providers / "a.yaml").write_text(yaml.safe_dump(provider))
    routing = {"kind": "routing", "purposes": {"chat": {"primary": ["a"]}}}
    (project.providers / "routing.yaml").write_text(yaml.safe_dump(routing))
    entries = [
        {"name": "client", "token_sha256": _sha(TOKEN), "scopes": ["completions"]}
        | ({"limits": client} if client else {}),
        {"name": "other", "token_sha256": _sha(OTHER), "scopes": ["completions"]}
        | ({"limits": other} if other else {}),
        {"name": "reader", "token_sha256": _sha(READER), "scopes": ["usage:read"]},
    ]
    (project.providers / "clients.yaml").write_text(yaml.safe_dump({"kind": "clients", "clients": entries}))


def replica(project: SopsProject, tmp_path: Path, name: str, **settings: str) -> Replica:
    """`switchboard serve` on `project`'s files with its own port, event log, spool and ledger."""
    var = tmp_path / name
    var.mkdir(exist_ok=True)
    values = {"usage_spool": str(var / "spool"), "usage_db": str(var / "usage.db")} | settings
    env = replica_env(project.identity.key_file, **values)
    return Replica(name, project.root, project.providers, free_port(), env, tmp_path)


async def chat(member: Replica, token: str = TOKEN, **body: Any) -> tuple[int, dict[str, str], str]:
    """A chat request, read to its end: its status, headers and text."""
    assert member.http is not None
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **body}
    headers = {"Authorization": f"Bearer {token}"}
    async with member.http.post(f"{member.url}/v1/chat/completions", json=payload, headers=headers) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.text()


def sqlite_ids(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT id FROM usage_records")]


def postgres_rows(url: str) -> list[tuple[str, int, Decimal, str]]:
    """(id, status, cost in USD, client) of every record in the shared ledger."""
    with psycopg.connect(url) as db:
        rows = db.execute("SELECT id, status, cost_pico, client FROM usage_records").fetchall()
    return [(i, s, Decimal(c) / 10**12, n) for i, s, c, n in rows]


# -- a kill -9 under load ---------------------------------------------------------------------------------


async def test_a_kill_9_under_load_loses_no_answered_record_and_stores_none_twice(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    async with FakeUpstream(name="a", latency_s=0.005) as up:
        configure(sops_project, up, {"rpm": 1_000_000, "budget": {"usd": "1000000", "period": "day"}})
        member = replica(sops_project, tmp_path, "r1")
        answered: list[str] = []
        async with replicas(member):
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    try:
                        status, headers, _ = await chat(member, max_tokens=3)
                    except aiohttp.ClientError:
                        return  # the server died under this request: it was not answered
                    if status == 200:
                        answered.append(headers["x-request-id"])

            workers = [asyncio.create_task(load()) for _ in range(32)]
            await until(lambda: _more_than(answered, 300), 30, "300 answers")
            await member.stop(signal.SIGKILL)  # mid-load: requests in flight, records unsynced
            stop.set()
            await asyncio.gather(*workers)
        assert member.process is not None and member.process.returncode == -signal.SIGKILL
        async with replicas(member):  # the same spool and ledger, started again

            async def stored() -> bool:
                return set(answered) <= set(sqlite_ids(tmp_path / "r1" / "usage.db"))

            await until(stored, 15, "every answered request in the ledger")
            status, _, _ = await chat(member, max_tokens=3)  # it serves on
            assert status == 200
    ids = sqlite_ids(tmp_path / "r1" / "usage.db")
    assert len(answered) == len(set(answered)) > 300
    assert len(ids) == len(set(ids))  # none twice
    assert set(answered) <= set(ids)  # every answered one once


async def _more_than(items: list[str], count: int) -> bool:
    return len(items) > count


# -- two replicas, one Redis, one PostgreSQL ledger ---------------------------------------------------


@contextlib.asynccontextmanager
async def two(
    project: SopsProject, tmp_path: Path, redis: RedisServer, ledger: str
) -> AsyncIterator[tuple[Replica, Replica]]:
    members = tuple(
        replica(project, tmp_path, name, redis_url=redis.url, usage_db=ledger) for name in ("r1", "r2")
    )
    async with replicas(*members) as (one, other):
        yield one, other


async def test_two_replicas_hold_one_budget_and_one_rpm_and_charge_exactly_what_they_answered(
    sops_project: SopsProject, tmp_path: Path, redis_server: RedisServer, postgres_url: str
) -> None:
    async with FakeUpstream(name="a", latency_s=0.02) as up:
        # "a says: hi": 3 tokens out at 1 USD; max_tokens 3 reserves 3 USD: ten fit in 30 USD
        configure(sops_project, up, {"budget": {"usd": "30", "period": "day"}}, other={"rpm": 15})
        async with two(sops_project, tmp_path, redis_server, postgres_url) as (one, other):
            answers = await asyncio.gather(*(chat((one, other)[n % 2], max_tokens=3) for n in range(100)))
            rated = await asyncio.gather(*(chat((one, other)[n % 2], OTHER) for n in range(30)))
            answered = {h["x-request-id"] for s, h, _ in answers if s == 200}

            async def stored() -> bool:
                return len(postgres_rows(postgres_url)) == 130

            await until(stored, 10, "130 records in the shared ledger")
            status, usage = await one.get(f"{API}/usage?group_by=client", Authorization=f"Bearer {READER}")
    statuses = [s for s, _, _ in answers]
    assert statuses.count(200) == 10 and statuses.count(429) == 90
    assert {'"budget_exceeded"' in text for s, _, text in answers if s == 429} == {True}
    assert sorted(s for s, _, _ in rated) == [200] * 15 + [429] * 15  # one rpm across both
    rows = [r for r in postgres_rows(postgres_url) if r[3] == "client"]
    charged = {i for i, _, cost, _ in rows if cost > 0}
    assert charged == answered  # exactly the answered ones are charged
    assert sum(cost for _, _, cost, _ in rows) == 30  # never more than the budget
    assert status == 200 and usage["shared"] is True
    assert next(r for r in usage["rows"] if r["client"] == "client")["cost_usd"] == "30"


async def test_redis_stopped_then_back_leaves_each_replica_its_share_and_then_one_budget_again(
    sops_project: SopsProject, tmp_path: Path, redis_server: RedisServer, postgres_url: str
) -> None:
    async with FakeUpstream(name="a") as up:
        configure(sops_project, up, {"budget": {"usd": "30", "period": "day"}})
        async with two(sops_project, tmp_path, redis_server, postgres_url) as (one, other):
            for member in (one, other, one, other):  # 12 USD of 30 spent, across both
                assert (await chat(member, max_tokens=3))[0] == 200
            for member in (one, other):
                await until(lambda m=member: _replicas_seen(m, 2), 5, "both replicas seen in Redis")
            redis_server.stop()
            for member in (one, other):
                took = await until(lambda m=member: _limits_mode(m, "local"), 5, "local mode")
                assert took < 5
            served = {}
            for member in (one, other):  # 18 USD left when Redis went: 9 each, three requests
                statuses = [(await chat(member, max_tokens=3))[0] for _ in range(5)]
                served[member.name] = statuses.count(200)
            assert served == {"r1": 3, "r2": 3}
            redis_server.start()  # empty: nothing was saved
            for member in (one, other):
                await until(lambda m=member: _limits_mode(m, "redis"), 10, "back on Redis")
            status, _, text = await chat(one, max_tokens=3)
            assert status == 429 and "budget_exceeded" in text  # 30 spent: Redis knows it all again
    assert (
        sum(
            cost
            for *_, cost, client in [(r[0], r[2], r[3]) for r in postgres_rows(postgres_url)]
            if client == "client"
        )
        == 30
    )


async def _replicas_seen(member: Replica, count: int) -> bool:
    status, body = await member.get(f"{API}/limits", Authorization=f"Bearer {READER}")
    return status == 200 and body["replicas"] == count


async def _limits_mode(member: Replica, mode: str) -> bool:
    _, ready = await member.get("/readyz")
    return bool(ready.get("limits") == mode and ready.get("degraded") == (mode != "redis"))


# -- the ledger's database away, and back ----------------------------------------------------------------


async def test_postgresql_stopped_and_started_again_stops_nothing_and_loses_or_doubles_no_record(
    sops_project: SopsProject, tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with FakeUpstream(name="a") as up:
        configure(sops_project, up, {"rpm": 1000, "budget": {"usd": "1000", "period": "day"}})
        member = replica(sops_project, tmp_path, "r1", usage_db=postgres_url)
        async with replicas(member):
            before = [await chat(member, max_tokens=3) for _ in range(5)]
            await until(lambda: _count(postgres_url, 5), 5, "five records stored")
            postgres_server.stop()
            try:
                during = [await chat(member, max_tokens=3) for _ in range(20)]  # served all the same
                await until(lambda: _ledger(member, "degraded"), 10, "the ledger degraded")
                status, body = await member.get(f"{API}/usage", Authorization=f"Bearer {READER}")
                listed, _ = await member.get(f"{API}/usage/requests", Authorization=f"Bearer {READER}")
            finally:
                postgres_server.start()
            await until(lambda: _ledger(member, "ok"), 15, "the ledger back")
            await until(lambda: _count(postgres_url, 25), 10, "the spool drained")
            spent = await member.get(f"{API}/limits", Authorization=f"Bearer {READER}")
    assert [s for s, _, _ in before + during] == [200] * 25
    assert status == 503 and body["error"]["type"] == "ledger_unavailable" and listed == 503
    rows = postgres_rows(postgres_url)
    answered = {h["x-request-id"] for _, h, _ in before + during}
    assert len(rows) == 25 and {r[0] for r in rows} == answered  # each once
    client = next(c for c in spent[1]["clients"] if c["name"] == "client")
    assert client["used"]["budget_spent_usd"] == "75"  # 25 x 3 USD: nothing counted twice


async def _count(url: str, count: int) -> bool:
    return len(await asyncio.to_thread(postgres_rows, url)) == count


async def _ledger(member: Replica, state: str) -> bool:
    _, ready = await member.get("/readyz")
    return bool(ready.get("ledger") == state)


# -- a stream cut by its client --------------------------------------------------------------------------


async def test_a_stream_cut_by_its_client_is_charged_its_whole_reservation_estimated(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    async with FakeUpstream(name="a", chunk_interval_s=0.3) as up:
        configure(sops_project, up, {"budget": {"usd": "1000", "period": "day"}})
        member = replica(sops_project, tmp_path, "r1")
        async with replicas(member):
            assert member.http is not None
            payload = {
                "model": "fake-model",
                "messages": [{"role": "user", "content": "one two three four"}],
                "stream": True,
                "max_tokens": 7,
            }
            async with member.http.post(
                f"{member.url}/v1/chat/completions",
                json=payload,
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as response:
                assert response.status == 200
                request_id = response.headers["x-request-id"]
                await response.content.readany()  # the first chunk, then the connection is cut
                response.close()
            ledger = tmp_path / "r1" / "usage.db"

            async def recorded() -> bool:
                return request_id in sqlite_ids(ledger)

            await until(recorded, 10, "the cut stream's record (under the id the client was sent)")
            _, limits = await member.get(f"{API}/limits", Authorization=f"Bearer {READER}")
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        status, estimated, cost = db.execute(
            "SELECT status, estimated, cost_pico FROM usage_records WHERE id = ?", (request_id,)
        ).fetchone()
    assert (status, estimated) == (200, 1)
    assert cost == 7 * 10**12  # 7 completion tokens reserved at 1 USD (input is free): all of it
    client = next(c for c in limits["clients"] if c["name"] == "client")
    assert client["used"]["budget_spent_usd"] == "7" and client["used"]["budget_reserved_usd"] == "0"


# -- a usage:read client fishing for other tenants' prompts ------------------------------------------------


async def test_a_usage_reader_finds_no_prompt_completion_or_token_anywhere_in_the_ledger(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    secret = "tenant-secret-8d1f2a"
    async with FakeUpstream(name="a") as up:
        configure(sops_project, up, {"budget": {"usd": "1000", "period": "day"}})
        member = replica(sops_project, tmp_path, "r1")
        async with replicas(member):
            assert member.http is not None
            for stream in (False, True):
                payload = {
                    "model": "fake-model",
                    "messages": [{"role": "user", "content": f"my {secret} is here"}],
                    "max_tokens": 9,
                    "user": secret,
                    "stream": stream,
                }
                headers = {"Authorization": f"Bearer {TOKEN}"}
                async with member.http.post(
                    f"{member.url}/v1/chat/completions", json=payload, headers=headers
                ) as r:
                    assert r.status == 200 and secret in await r.text()  # the completion echoes it
            await until(lambda: _stored(tmp_path / "r1" / "usage.db", 2), 10, "two records")
            reader = {"Authorization": f"Bearer {READER}"}
            answers = []
            for path in (
                f"{API}/usage/requests?limit=5000",
                f"{API}/usage?group_by=client,model,provider,purpose,hour",
                f"{API}/usage?group_by=client&format=csv",
                f"{API}/usage/requests?client={secret}",
                f"{API}/limits",
            ):
                async with member.http.get(member.url + path, headers=reader) as r:
                    assert r.status == 200, path
                    answers.append(await r.text())
    stored = b"".join(p.read_bytes() for p in (tmp_path / "r1").rglob("*") if p.is_file())
    for text in answers:
        assert secret not in text and TOKEN not in text and "is here" not in text
    assert secret.encode() not in stored and TOKEN.encode() not in stored  # nor in the spool or the database


async def _stored(path: Path, count: int) -> bool:
    return path.exists() and len(sqlite_ids(path)) >= count

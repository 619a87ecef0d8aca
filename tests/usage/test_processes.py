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
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import yaml

from tests.conftest import SopsProject
from tests.support.replicas import Replica, free_port, replica_env, replicas
from tests.support.upstreams import FakeUpstream

pytestmark = pytest.mark.timeout(120)

TOKEN = "sk-client-0123456789abcdef"
OTHER = "sk-other-0123456789abcdef"
READER = "sk-reader-0123456789abcdef"
API = "/api/v1/llm-config"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def configure(
    project: SopsProject, upstream: FakeUpstream, client: dict[str, Any] | None, **other: Any
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
        | ({"limits": other["other"]} if other.get("other") else {}),
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


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `check` until it holds; the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


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

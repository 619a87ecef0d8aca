"""`switchboard serve --workers N` in tests (tests/cli/test_workers.py): a leader started with
its followers on a Redis of the test's, a configuration with a limited client, and what the
tests ask of the processes (their children, their private folder, their metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import SopsProject, until
from tests.support.replicas import RedisServer, Replica, free_port, replica_env
from tests.support.upstreams import FakeUpstream

LIMITED = "sk-limited-0123456789abcdef"
LOAD = "sk-load-0123456789abcdef"
READER = "sk-reader-0123456789abcdef"
API = "/api/v1/llm-config"
ROUNDS = 40


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def configure(project: SopsProject, *upstreams: FakeUpstream) -> None:
    """A server per upstream, chat routed to the first; `limited` (rpm 5), `load`, `reader`."""
    for up in upstreams:
        provider = {
            "kind": "ai_server",
            "id": up.name,
            "server_type": "vllm",
            "base_url": up.base_url,
            "purposes": ["chat"],
        }
        (project.providers / f"{up.name}.yaml").write_text(yaml.safe_dump(provider))
    route(project, upstreams[0].name)
    entries = [
        {"name": "limited", "token_sha256": _sha(LIMITED), "scopes": ["completions"], "limits": {"rpm": 5}},
        {"name": "load", "token_sha256": _sha(LOAD), "scopes": ["completions"]},
        {"name": "reader", "token_sha256": _sha(READER), "scopes": ["config:read", "usage:read", "admin"]},
    ]
    (project.providers / "clients.yaml").write_text(yaml.safe_dump({"kind": "clients", "clients": entries}))


def route(project: SopsProject, provider_id: str) -> None:
    routing = {"kind": "routing", "purposes": {"chat": {"primary": [provider_id]}}}
    (project.providers / "routing.yaml").write_text(yaml.safe_dump(routing))


def leader(project: SopsProject, tmp_path: Path, redis: RedisServer | None, **settings: str) -> Replica:
    var = tmp_path / "var"
    var.mkdir(exist_ok=True)
    values = {
        "usage_spool": str(var / "spool"),
        "usage_db": str(var / "usage.db"),
        "workers": "2",
        "log_level": "INFO",
    } | settings
    if redis is not None:
        values["redis_url"] = redis.url
    env = replica_env(project.identity.key_file, **values)
    return Replica("leader", project.root, project.providers, free_port(), env, tmp_path)


async def fresh(
    member: Replica, method: str, path: str, token: str, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own (the kernel picks the worker that accepts it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    headers = {"Authorization": f"Bearer {token}"} | kwargs.pop("headers", {})
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.request(method, member.url + path, headers=headers, **kwargs) as answer,
    ):
        return answer.status, {k.lower(): v for k, v in answer.headers.items()}, await answer.read()


async def chat(member: Replica, token: str) -> tuple[int, dict[str, str], bytes]:
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return await fresh(member, "POST", "/v1/chat/completions", token, json=payload)


def children(pid: int) -> list[int]:
    """The followers whose parent is `pid` (from /proc; not the sops or git it runs meanwhile)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if (
                int(stat.rpartition(")")[2].split()[1]) == pid
                and b"--follow" in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def private_folder(member: Replica) -> Path:
    found = re.search(r"private sockets in (\S+)", member.log())
    assert found, member.log()
    return Path(found.group(1))


async def worker_requests(folder: Path) -> float:
    """The follower's own count of chat answers, read on its private socket."""
    return chat_answers(await worker_metrics(folder))


async def relayed_then_asked(member: Replica) -> tuple[int, int, str | None]:
    """Two chat calls, then `GET …/active`, on one kept-alive connection: the statuses and ETag."""
    connector = aiohttp.TCPConnector(limit=1)
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as http:
        for _ in range(2):
            headers = {"Authorization": f"Bearer {LOAD}"}
            async with http.post(f"{member.url}/v1/chat/completions", json=payload, headers=headers) as first:
                await first.read()
        async with http.get(
            f"{member.url}{API}/active", headers={"Authorization": f"Bearer {READER}"}
        ) as then:
            await then.read()
            return first.status, then.status, then.headers.get("ETag")


async def chunked_chat() -> AsyncIterator[bytes]:
    """A chat request's body sent chunked (no Content-Length), a long message in many pieces."""
    yield b'{"model": "fake-model", "max_tokens": 3, "messages": [{"role": "user", "content": "'
    for _ in range(32):  # 512 KiB: the stand-in vendor takes 1 MiB at most
        yield b"x" * 16384
    yield b'"}]}'


async def replayed(member: Replica, last: int) -> bytes:
    """`GET …/events?after=0` on a connection of its own, read up to the event `last`."""
    connector = aiohttp.TCPConnector(force_close=True)
    headers = {"Authorization": f"Bearer {READER}"}
    got = b""
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"{member.url}{API}/events?after=0", headers=headers) as answer,
    ):
        assert answer.status == 200
        marker = f"id: {last}\n".encode()
        while marker not in got or b"\n\n" not in got[got.index(marker) :]:
            got += await asyncio.wait_for(answer.content.readany(), 5)
    events = got[: got.index(b"\n\n", got.index(marker))]  # the replay, without SSE comments (`: connected`)
    return b"\n".join(line for line in events.split(b"\n") if not line.startswith(b":"))


def chat_answers(text: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("switchboard_http_requests_total{") and "chat" in line
    )


def restarted(member: Replica, pid: int) -> bool:
    assert member.process is not None
    now = children(member.process.pid)
    return bool(now) and pid not in now


async def awaitable(value: bool) -> bool:
    return value


async def listening(folder: Path) -> None:
    """Until the leader's follower (its private folder `folder`) listens on its own socket."""
    await until(lambda: awaitable((folder / "worker-1.sock").exists()), 20, "the follower listening")


async def worker_metrics(folder: Path) -> str:
    connector = aiohttp.UnixConnector(path=str(folder / "worker-1.sock"))
    async with aiohttp.ClientSession(connector=connector) as http, http.get("http://w/metrics") as answer:
        return await answer.text()

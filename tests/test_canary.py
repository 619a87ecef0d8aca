"""Canaries through the whole system: a vendor key and a prompt that must never come back out.

A real `switchboard serve` (log level DEBUG, its output kept) serves a git repository with a
bare remote it pushes to, keys encrypted by real sops, the usage ledger in SQLite and traces
going to an OTLP receiver. Stand-in vendors (OpenAI's protocol, Anthropic's) record what they
receive, and answer with a reply of their own that never repeats the prompt. The test drives
every protocol, streams, errors (the upstream failing, refusing a revoked key and saying the
key it was sent, a malformed body, an unknown model, a body too large), a write that rotates
the key, every read of the configuration and usage APIs, the console, the event stream and
the commands; then it looks for the canaries everywhere the system puts anything
(docs/reference.md §2.4, §13, §14):

- the keys only reach their vendor, in its credential header;
- the prompt only reaches the vendor, in the body;
- neither is in any answer (status line, header or body), the service's output, the event
  log, the metrics, a commit of either repository, the console, the usage ledger, a file the
  service wrote, the commands' output or the exported traces.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from playwright.async_api import async_playwright, expect

from tests.conftest import SopsProject, git, git_init
from tests.support.browser import launch, tab
from tests.support.gateway import write_provider, write_routing
from tests.support.otlp import OTLPReceiver
from tests.support.replicas import REPO, RedisServer, free_port
from tests.support.upstreams import FakeUpstream

KEY = "sk-canary-one-4f7d2a9c1e8b6d3f0a5c"
"""The vendor's key at the start: encrypted in git, revoked by the vendor midway."""
KEY_TWO = "sk-canary-two-9b3e6f1d7a2c8e4b5f0d"
"""The key it is rotated to, by a write over HTTP."""
ANTHROPIC_KEY = "sk-ant-canary-7e2b5d8f3a1c9e6b4d0f"
REFUSED_KEY = "sk-canary-refused-2d8f4b6e1a9c3f7d5b"
"""A key sent in writes that validation refuses: never written, never echoed."""
PLAIN_KEY = "sk-canary-plain-6c1f8a3e9d2b7f4a0e"
"""A key someone left in plaintext in a file beside the others (uncommitted): refused, never repeated."""
PROMPT = "prompt-canary-b71c4e9a2f5d"
REPLY = "a reply of the stand-in's own"

TOKENS = {
    "app": ("sb-canary-app-token-5a1e", ["completions"]),
    "reader": ("sb-canary-reader-token-9c2d", ["config:read"]),
    "admin": ("sb-canary-admin-token-3f8b", ["admin", "config:read", "config:write", "usage:read"]),
    "keeper": ("sb-canary-keeper-token-7d6a", ["secrets:read"]),
}
APP, READER, ADMIN, KEEPER = (TOKENS[name][0] for name in ("app", "reader", "admin", "keeper"))
SECRETS_PATH = "/api/v1/llm-config/active/chat/litellm?model=fake-model"
"""The one answer that holds a key (docs/reference.md §6), to a `secrets:read` token."""
API = "/api/v1/llm-config"


def needles(key: str) -> tuple[str, ...]:
    """A key and its middle, so that a partly masked copy (`sk-can…0a5c`-style) is caught too."""
    return (key, key[7:-4])


KEY_NEEDLES = (
    *needles(KEY),
    *needles(KEY_TWO),
    *needles(ANTHROPIC_KEY),
    *needles(REFUSED_KEY),
    *needles(PLAIN_KEY),
)
TOKEN_NEEDLES = tuple(token for token, _ in TOKENS.values())
"""The clients' tokens: credentials too, that go nowhere but the requests that carry them."""


ECHO = "echo-your-credentials"
"""In a request body, makes a `Vendor` refuse it (400) quoting the credential it was sent."""


class Vendor(FakeUpstream):
    """A stand-in vendor that never repeats the prompt, and whose refusals say the key it was
    sent, as some servers do: what it says must not carry the key any further."""

    def _reply_text(self, prompt: str) -> str:
        return REPLY

    def _check_auth(self, request: web.Request) -> web.Response | None:
        given = request.headers.get("x-api-key") or request.headers.get("Authorization", "")
        if self.requests and ECHO.encode() in self.requests[-1].raw:
            return self._error(400, f"this request cannot be served with the key {given}")
        refused = FakeUpstream._check_auth(self, request)
        if refused is None or refused.status != 401:
            return refused
        return self._error(401, f"Incorrect API key provided: {given}")


@dataclass
class Answer:
    """One answer the service gave: what was asked, and everything that came back."""

    what: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def text(self) -> str:
        head = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return f"{self.status}\n{head}\n\n{self.body.decode('utf-8', 'replace')}"


@dataclass
class Driver:
    """Calls the service and keeps every answer."""

    url: str
    http: aiohttp.ClientSession
    answers: list[Answer] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token}")
        if json_body is not None:
            data = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.url + path, data=data, headers=sent) as response:
            body = await response.read()
        answer = Answer(f"{method} {path}", response.status, list(response.headers.items()), body)
        self.answers.append(answer)
        return answer

    async def post(self, path: str, body: Any, token: str = APP, **headers: str) -> Answer:
        return await self.call("POST", path, token=token, json_body=body, headers=headers)

    async def get(self, path: str, token: str | None = None) -> Answer:
        return await self.call("GET", path, token=token)

    async def stream_events(self, token: str, seconds: float) -> Answer:
        """The event stream from the log's start, for `seconds`."""
        path = f"{API}/events?after=0"
        chunks: list[bytes] = []
        async with self.http.get(self.url + path, headers={"Authorization": f"Bearer {token}"}) as response:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    async for chunk in response.content.iter_any():
                        chunks.append(chunk)
        answer = Answer(f"GET {path}", response.status, list(response.headers.items()), b"".join(chunks))
        self.answers.append(answer)
        return answer


def chat(model: str = "fake-model", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPT}]
    return {"model": model, "messages": messages, **extra}


def messages(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}], **extra}


def write_clients(project: SopsProject) -> None:
    entries: list[dict[str, Any]] = []
    for name, (token, scopes) in TOKENS.items():
        entry: dict[str, Any] = {
            "name": name,
            "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
            "scopes": scopes,
        }
        if name == "app":
            entry["limits"] = {"rpm": 1000, "tpm": 10_000_000, "budget": {"usd": "100", "period": "month"}}
        entries.append(entry)
    text = yaml.safe_dump({"kind": "clients", "clients": entries}, sort_keys=False)
    (project.providers / "clients.yaml").write_text(text)


def make_repository(project: SopsProject, tmp_path: Path) -> Path:
    """Commit the project and push it to a bare remote; the remote's path."""
    root = project.root
    git_init(root)
    (root / ".gitignore").write_text("var/\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "the first configuration")
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    git(root, "remote", "add", "origin", str(bare))
    git(root, "push", "-q", "origin", "main")
    return bare


@contextlib.asynccontextmanager
async def switchboard_serve(
    project: SopsProject, port: int, log: Path, otlp: OTLPReceiver, redis: RedisServer, *flags: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`switchboard serve` (and `flags`) in a subprocess, its output into `log`, stopped by SIGTERM."""
    root = project.root
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWITCHBOARD_", "SOPS_", "OTEL_"))}
    env |= {
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "SOPS_AGE_KEY_FILE": str(project.identity.key_file),
        "SWITCHBOARD_LOG_LEVEL": "DEBUG",
        "SWITCHBOARD_DEBOUNCE_MS": "10",
        "SWITCHBOARD_HEALTH_INTERVAL_S": "1",
        "SWITCHBOARD_GIT_PUSH": "origin",
        "SWITCHBOARD_USAGE_DB": str(root / "var" / "usage.db"),
        "SWITCHBOARD_USAGE_SPOOL": str(root / "var" / "usage-spool"),
        "SWITCHBOARD_MAX_BODY_BYTES": str(64 << 10),
        "SWITCHBOARD_REPLICA": "canary",
        "SWITCHBOARD_REDIS_URL": redis.url,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        **otlp.env(),
    }
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "--root",
            str(root),
            "serve",
            "--port",
            str(port),
            "--events",
            str(root / "var" / "events.jsonl"),
            *flags,
            cwd=root,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def wait_ready(
    http: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process, log: Path
) -> None:
    async with asyncio.timeout(30):
        while True:
            assert process.returncode is None, log.read_text()[-4000:]
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def redis_server(workdir: Path) -> AsyncIterator[RedisServer]:
    redis = RedisServer(workdir)
    try:
        yield redis
    finally:
        redis.stop()


@contextlib.asynccontextmanager
async def monitored(redis: RedisServer) -> AsyncIterator[bytearray]:
    """Every command Redis runs while the block lasts (`MONITOR`), as the bytes it reports."""
    seen = bytearray()
    reader, writer = await asyncio.open_connection("127.0.0.1", redis.port)
    writer.write(b"MONITOR\r\n")
    await writer.drain()

    async def read() -> None:
        while chunk := await reader.read(65536):
            seen.extend(chunk)

    task = asyncio.create_task(read())
    try:
        yield seen
    finally:
        await asyncio.sleep(0.2)  # the last commands' reports
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        writer.close()


def command(project: SopsProject, *args: str, status: int = 0) -> str:
    """A `switchboard` command's stdout and stderr (it must exit with `status`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWITCHBOARD_", "SOPS_", "OTEL_"))}
    env["PYTHONPATH"] = str(REPO)
    env["SOPS_AGE_KEY_FILE"] = str(project.identity.key_file)
    env["SWITCHBOARD_USAGE_DB"] = str(project.root / "var" / "usage.db")
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    done = subprocess.run(
        [sys.executable, "-m", "service", "--root", str(project.root), *args],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == status, (args, done.stdout, done.stderr)
    return done.stdout + done.stderr


def leaks(where: str, text: str, canaries: Iterable[str]) -> list[str]:
    return [f"{canary!r} in {where}" for canary in canaries if canary in text]


def files_under(folder: Path) -> Iterable[Path]:
    """Every file under `folder` but git's own store (read through `git log -p` instead)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and ".git" not in path.relative_to(folder).parts:
            yield path


def ledger_rows(db: Path) -> str:
    """Every row of every table of the SQLite ledger, as text."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = [f"{t}: {row!r}" for t in tables for row in connection.execute(f'SELECT * FROM "{t}"')]  # noqa: S608
    return "\n".join(rows)


@pytest.mark.timeout(120)
async def test_no_key_and_no_prompt_leaks_anywhere(sops_project: SopsProject, tmp_path: Path) -> None:
    project = sops_project
    async with (
        Vendor(name="vendor", api_key=KEY) as vendor,
        Vendor(protocol="anthropic", name="claude", api_key=ANTHROPIC_KEY, models=("claude-x",)) as claude,
        OTLPReceiver() as otlp,
    ):
        pricing = {"*": {"input": 1.0, "output": 2.0}}
        write_provider(
            project,
            "vendor",
            provider="openai",
            base_url=vendor.base_url,
            api_key=KEY,
            models=["fake-model"],
            pricing=pricing,
        )
        write_provider(  # the same account for embeddings: LiteLLM's file needs a name per purpose
            project,
            "vendor-embed",
            provider="openai",
            base_url=vendor.base_url,
            api_key=KEY,
            models=["embed-model"],
            purposes=["embeddings"],
            pricing=pricing,
        )
        write_provider(
            project,
            "claude",
            provider="anthropic",
            base_url=claude.url,
            api_key=ANTHROPIC_KEY,
            models=["claude-x"],
            pricing=pricing,
        )
        write_routing(project, chat={"primary": "vendor", "fallbacks": ["claude"]}, embeddings="vendor-embed")
        write_clients(project)
        bare = make_repository(project, tmp_path)
        leaky = project.providers / "leaky.yaml"  # never committed: no write may take it along
        leaky.write_text(f"kind: api_key\nid: leaky\nprovider: openai\napi_key: {PLAIN_KEY}\n")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "serve.log"
        outputs: dict[str, str] = {}
        async with (
            redis_server(tmp_path / "redis") as redis,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http,
            monitored(redis) as redis_commands,
            switchboard_serve(project, port, log, otlp, redis) as process,
        ):
            await wait_ready(http, url, process, log)
            board = Driver(url, http)
            await drive(board, vendor, claude)
            pages = await render_console(url)
            outputs["audit show"] = command(project, "audit", "show", "--events", "var/events.jsonl")
            outputs["audit show json"] = command(
                project, "audit", "show", "--format", "json", "--events", "var/events.jsonl"
            )
            outputs["usage"] = command(project, "usage", "--format", "json", "--by", "client,model")
            outputs["state"] = command(project, "state", "--events", "var/events.jsonl")
            outputs["validate"] = command(project, "validate", "--decrypt", "--format", "json", status=1)
            leaky.unlink()  # export refuses a folder with a refused file
            outputs["export litellm"] = command(project, "export", "litellm")
        assert process.returncode == 0, log.read_text()[-4000:]

    # Kept beside the test's other files, to read when it fails.
    (tmp_path / "answers.txt").write_text("\n\n".join(a.what + "\n" + a.text() for a in board.answers))
    (tmp_path / "redis.txt").write_bytes(redis_commands)
    found: list[str] = []
    everything = (*KEY_NEEDLES, *TOKEN_NEEDLES, PROMPT)

    # The answers: no key, and no prompt (the vendors never repeat it).
    for answer in board.answers:
        if answer.what == f"GET {SECRETS_PATH}" and answer.status == 200:
            # The control: the one answer that holds a key has it, so a leak would be seen.
            assert KEY_TWO in answer.text(), answer.text()
            found += leaks("the secrets:read answer", answer.text(), set(everything) - set(needles(KEY_TWO)))
            continue
        found += leaks(f"the answer to {answer.what}", answer.text(), everything)

    # The vendors: each key in its own credential header only, the prompt in the body only.
    for upstream, header, own in (
        (vendor, "authorization", (KEY, KEY_TWO)),
        (claude, "x-api-key", (ANTHROPIC_KEY,)),
    ):
        for request in upstream.requests:
            where = f"{upstream.name}'s request {request.method} {request.path}"
            others = {k: v for k, v in request.headers.items() if k != header}
            found += leaks(f"{where} headers", json.dumps(others), everything)
            found += leaks(
                f"{where} body", request.raw.decode("utf-8", "replace"), (*KEY_NEEDLES, *TOKEN_NEEDLES)
            )
            given = request.headers.get(header, "")
            found += [
                f"{key!r} in {where} {header}"
                for key in KEY_NEEDLES
                if key in given and not any(given.removeprefix("Bearer ") == k for k in own)
            ]

    # The service's output, its files (event log, spool, ledger, snapshots), the ledger's rows.
    found += leaks("the service's output (DEBUG)", log.read_text(errors="replace"), everything)
    assert not leaky.exists()  # the one file that held a key in plaintext, until the export
    for path in files_under(project.root):
        found += leaks(str(path), path.read_bytes().decode("utf-8", "replace"), everything)
    rows = ledger_rows(project.root / "var" / "usage.db")
    assert "'app'" in rows and "'claude'" in rows, rows[:2000]  # the ledger recorded the traffic
    found += leaks("the ledger's rows", rows, everything)

    # Commits, here and on the remote.
    for where, repository in (("the repository", project.root), ("the remote", bare)):
        history = git(repository, "log", "-p", "--all", "--format=fuller")
        found += leaks(f"git log -p --all of {where}", history, everything)

    # The console, as Chromium drew it.
    for route, html in pages.items():
        found += leaks(f"the console's page {route}", html, everything)

    # The commands.
    for name, text in outputs.items():
        found += leaks(f"`switchboard {name}`", text, everything)

    # Redis: every command the service sent it (counters, budgets, heartbeats, fan-out).
    assert redis_commands, "Redis saw no command"
    found += leaks("a command to Redis", bytes(redis_commands).decode("utf-8", "replace"), everything)

    # Traces and their metrics, as exported.
    for export in otlp.exports:
        found += leaks("an OTLP export", export.decode("utf-8", "replace"), everything)
    found += leaks("the spans", repr(otlp.spans), everything)

    assert not found, "\n".join(found)
    # What makes the search mean something: the traffic happened, and was seen.
    assert any(r.path.endswith("/chat/completions") for r in vendor.requests)
    assert any(r.path.endswith("/messages") for r in claude.requests)
    assert any(PROMPT.encode() in r.raw for r in vendor.requests)
    assert any(PROMPT.encode() in r.raw for r in claude.requests)
    sent = {r.headers.get("authorization") for r in vendor.requests}
    assert {f"Bearer {KEY}", f"Bearer {KEY_TWO}"} <= sent, sent
    assert ANTHROPIC_KEY in {r.headers.get("x-api-key") for r in claude.requests}
    assert '"provider.updated"' in (project.root / "var" / "events.jsonl").read_text()
    assert otlp.spans, "no span was exported"
    assert "create api_key" not in git(bare, "log", "--format=%s")  # the refused write wrote nothing
    assert git(bare, "log", "-1", "--format=%s") == "update api_key vendor"


CONSOLE_ROUTES = {
    "#/overview": "vendor",
    "#/providers": "vendor-embed",
    "#/providers/vendor": "****5f0d",
    "#/changes": "Base URL",
    "#/events": "vendor",
}
"""Each page, and a text it shows once drawn."""


async def render_console(url: str) -> dict[str, str]:
    """Each page of the console as Chromium draws it for the admin token: its DOM and its text."""
    drawn: dict[str, str] = {}
    async with async_playwright() as playwright:
        browser = await launch(playwright)
        try:
            async with tab(browser, url) as page:
                await page.open("#/overview", token=ADMIN)
                await page.live()
                for route, shown in CONSOLE_ROUTES.items():
                    await page.page.goto(f"{url}/ui/{route}")
                    await expect(page.page.locator("#main")).to_contain_text(shown)
                    text = await page.page.inner_text("body")
                    drawn[route] = await page.page.content() + "\n" + text
        finally:
            await browser.close()
    return drawn


async def malformed(url: str, header: str) -> None:
    """Send a request aiohttp's parser refuses (a NUL in a header, a folded line), as raw bytes.

    aiohttp's parser answers it before the service sees it, quoting the line it refused: the
    sender's own bytes, back on its own connection, so they are not looked for in that answer;
    the log line must not hold them (docs/reference.md §6: one line, naming the fault)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(chat()).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{header}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer


async def drive(board: Driver, vendor: Vendor, claude: Vendor) -> None:
    """Everything a client, an operator and the console do, in an order that makes each happen."""
    ok = {200}
    # -- the gateway, served --------------------------------------------------------------
    served = [
        await board.post("/v1/chat/completions", chat()),
        await board.post("/v1/chat/completions", chat(stream=True)),
        await board.post("/v1/chat/completions", chat("claude-x")),  # through litellm to Anthropic
        await board.post("/v1/chat/completions", chat("claude-x", stream=True)),
        await board.post("/v1/embeddings", {"model": "embed-model", "input": PROMPT}),
        await board.post("/v1/messages", messages("claude-x"), **{"anthropic-version": "2023-06-01"}),
        await board.post(
            "/v1/messages", messages("claude-x", stream=True), **{"anthropic-version": "2023-06-01"}
        ),
        await board.post("/v1/messages", messages("fake-model")),  # translated to chat
        await board.post("/v1/messages", messages("fake-model", stream=True)),
        await board.post("/v1/messages/count_tokens", messages("claude-x")),
        await board.post("/v1/messages/count_tokens", messages("fake-model")),
        await board.post("/v1/responses", {"model": "fake-model", "input": PROMPT}),
        await board.post("/v1/responses", {"model": "fake-model", "input": PROMPT, "stream": True}),
        await board.post("/v1/responses", {"model": "claude-x", "input": PROMPT}),  # translated
        await board.post("/v1/completions", {"model": "fake-model", "prompt": PROMPT}),
        await board.post("/v1/completions", {"model": "fake-model", "prompt": PROMPT, "stream": True}),
        await board.get("/v1/models", APP),
    ]
    for answer in served:
        assert answer.status in ok, answer.text()
    # -- the gateway, refusing ------------------------------------------------------------
    truncated = json.dumps(chat()).encode()[:-20]
    refusals = [
        (
            await board.call(
                "POST",
                "/v1/chat/completions",
                token=APP,
                data=truncated,
                headers={"Content-Type": "application/json"},
            ),
            400,
        ),
        (
            await board.call(
                "POST",
                "/v1/messages",
                token=APP,
                data=truncated,
                headers={"Content-Type": "application/json"},
            ),
            400,
        ),
        (await board.post("/v1/chat/completions", {"model": "fake-model", "messages": PROMPT}), None),
        (
            await board.post("/v1/messages", {"model": "fake-model", "max_tokens": 5, "messages": PROMPT}),
            None,
        ),
        (
            await board.post(
                "/v1/messages",
                {
                    "model": "fake-model",
                    "max_tokens": PROMPT,
                    "messages": [{"role": "user", "content": PROMPT}],
                },
            ),
            None,
        ),
        (await board.post("/v1/responses", {"model": "fake-model", "input": {"text": PROMPT}}), None),
        (
            await board.post(
                "/v1/responses", {"model": "fake-model", "input": PROMPT, "previous_response_id": PROMPT}
            ),
            None,
        ),
        (await board.post("/v1/completions", {"model": "fake-model", "prompt": {"text": PROMPT}}), None),
        (await board.post("/v1/chat/completions", chat("no-such-model")), 404),
        (await board.post("/v1/messages", messages("no-such-model")), 404),
        (await board.post("/v1/chat/completions", chat(padding=PROMPT * 5000)), 413),
        (
            await board.call(
                "POST",
                "/v1/chat/completions",
                token=APP,
                data=PROMPT.encode(),
                headers={"Content-Type": "text/plain"},
            ),
            415,
        ),
        (await board.post("/v1/chat/completions", chat(), token="sb-wrong-token"), 401),
        (await board.post("/v1/chat/completions", chat(), token=READER), 403),
    ]
    for answer, status in refusals:
        assert answer.status < 500 and (status is None or answer.status == status), answer.text()
    # -- the vendors refusing a request, quoting the key (a client's error: returned to it) --
    anthropic = {"anthropic-version": "2023-06-01"}
    echoes = [
        await board.post("/v1/chat/completions", chat(user=ECHO)),
        await board.post("/v1/chat/completions", chat(user=ECHO, stream=True)),
        await board.post("/v1/chat/completions", chat("claude-x", user=ECHO)),  # litellm
        await board.post("/v1/embeddings", {"model": "embed-model", "input": PROMPT, "user": ECHO}),
        await board.post("/v1/messages", messages("claude-x", metadata={"user_id": ECHO}), **anthropic),
        await board.post(
            "/v1/messages", messages("claude-x", stream=True, metadata={"user_id": ECHO}), **anthropic
        ),
        await board.post("/v1/messages", messages("fake-model", metadata={"user_id": ECHO})),  # translated
        await board.post("/v1/messages", messages("fake-model", stream=True, metadata={"user_id": ECHO})),
        await board.post("/v1/responses", {"model": "fake-model", "input": PROMPT, "user": ECHO}),
        await board.post(
            "/v1/responses", {"model": "fake-model", "input": PROMPT, "user": ECHO, "stream": True}
        ),
        await board.post("/v1/responses", {"model": "claude-x", "input": PROMPT, "user": ECHO}),
        await board.post("/v1/completions", {"model": "fake-model", "prompt": PROMPT, "user": ECHO}),
        await board.post(
            "/v1/completions", {"model": "fake-model", "prompt": PROMPT, "user": ECHO, "stream": True}
        ),
    ]
    for answer in echoes:
        assert answer.status == 400, answer.text()
    # -- Anthropic's way of sending the token, and a request too malformed to parse ---------
    native = await board.call(
        "POST", "/v1/messages", json_body=messages("claude-x"), headers={"x-api-key": APP, **anthropic}
    )
    assert native.status == 200, native.text()
    await malformed(board.url, f"X-Prompt: {PROMPT}\x00\r\nAuthorization: Bearer {APP}\x00")
    await malformed(board.url, f"Authorization: Bearer {APP} {PROMPT}\r\n X-Folded: {PROMPT}")
    # -- the vendor failing, then refusing the key it revoked ------------------------------
    vendor.fail(500, times=1)
    failed = await board.post("/v1/chat/completions", chat())
    assert failed.status == 502, failed.text()
    vendor.api_key = KEY_TWO  # the vendor revoked KEY and issued KEY_TWO
    for body in (chat(), chat(stream=True)):
        refused = await board.post("/v1/chat/completions", body)
        assert refused.status in (502, 503), refused.text()
    tested = await board.post(f"{API}/providers/vendor/test", {}, token=ADMIN)
    assert tested.status == 200, tested.text()
    claude.api_key = "sk-ant-another"  # Anthropic revoked its key too: through litellm, and native
    for path, body in (("/v1/chat/completions", chat("claude-x")), ("/v1/messages", messages("claude-x"))):
        refused = await board.post(path, body)
        assert refused.status in (502, 503), refused.text()
    # -- reads while the key is refused (health and its reason in every answer) -------------
    await read_everything(board)
    # -- writes: refused ones with a key in them, then the rotation -------------------------
    for body in (
        {"id": "Bad Id!", "provider": "openai", "api_key": REFUSED_KEY, "purposes": ["nope"]},
        {"id": "refused", "provider": "openai", "api_key": [REFUSED_KEY]},
        {"id": "refused", "provider": "no-such-vendor", "api_key": REFUSED_KEY},
        {"id": "refused", "provider": "openai", "api_key": REFUSED_KEY, "base_url": "ftp://x"},
        {"id": "refused", "provider": "openai", "api_key": REFUSED_KEY, "surprise": REFUSED_KEY},
    ):
        refused = await board.post(f"{API}/api-keys", body, token=ADMIN)
        assert refused.status in (400, 422), refused.text()
    denied = await board.post(
        f"{API}/api-keys", {"id": "x", "provider": "openai", "api_key": REFUSED_KEY}, token=READER
    )
    assert denied.status == 403, denied.text()
    for patch in (
        {"purposes": "nope"},
        {"models": 5},
        {"api_key": 5},
        {"base_url": "ftp://x", "api_key": REFUSED_KEY},
        {"timeout_s": -1, "api_key": REFUSED_KEY},
        {"id": "other"},
    ):
        refused = await board.call(
            "PATCH",
            f"{API}/api-keys/vendor",
            token=ADMIN,
            data=json.dumps(patch).encode(),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert 400 <= refused.status < 500, refused.text()
    whole = {"id": "vendor", "provider": "openai", "base_url": "http://127.0.0.1:9/v1", "models": "x"}
    refused = await board.call("PUT", f"{API}/api-keys/vendor", token=ADMIN, json_body=whole)
    assert 400 <= refused.status < 500, refused.text()
    rotated = await board.call(
        "PATCH",
        f"{API}/api-keys/vendor",
        token=ADMIN,
        data=json.dumps({"api_key": KEY_TWO}).encode(),
        headers={"Content-Type": "application/merge-patch+json", "X-Switchboard-Reason": "rotate the key"},
    )
    assert rotated.status == 200, rotated.text()
    # -- served again with the new key ----------------------------------------------------
    for body in (chat(), chat(stream=True)):
        again = await board.post("/v1/chat/completions", body)
        assert again.status == 200, again.text()
    assert (await board.post("/v1/responses", {"model": "fake-model", "input": PROMPT})).status == 200
    secret = await board.get(SECRETS_PATH, KEEPER)
    assert secret.status == 200, secret.text()
    # -- and every read once more, the event stream, the console -------------------------
    await asyncio.sleep(1.2)  # a ledger batch and an OTLP export at least
    await read_everything(board)
    for token in (READER, ADMIN):
        stream = await board.stream_events(token, 1.0)
        assert stream.status == 200 and b"provider.updated" in stream.body, stream.text()
    index = await board.get("/ui/")
    assert index.status == 200
    console = REPO / "service" / "console" / "assets"
    for asset in sorted(p.name for p in console.iterdir() if p.is_file()):
        assert (await board.get(f"/ui/{asset}")).status == 200, asset


async def read_everything(board: Driver) -> None:
    """Every GET of the API, with a config:read token and with an admin one (no secrets:read),
    and the public ones."""
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/"):
        assert (await board.get(path)).status == 200, path
    spec = json.loads((await board.get("/openapi.json")).body)
    paths = [
        p for p, item in spec["paths"].items() if "get" in item and p.startswith(API) and p != f"{API}/events"
    ]
    assert f"{API}/usage" in paths and f"{API}/limits" in paths, paths
    filled = {"{id}": ["vendor", "claude"], "{purpose}": ["chat", "embeddings"]}
    concrete: list[str] = []
    for path in paths:
        variants = [path]
        for mark, values in filled.items():
            variants = [v.replace(mark, value) for v in variants for value in (values if mark in v else [""])]
        concrete += variants
    concrete += [
        f"{API}/state?at=2100-01-01T00:00:00Z",
        f"{API}/audit?limit=10000",
        f"{API}/active/chat/litellm?model=fake-model",  # secrets:read only: 403 for both
        f"{API}/usage?group_by=client,provider,model,purpose,day&format=csv",
        f"{API}/usage?group_by=hour",
        f"{API}/usage/requests?limit=1000",
        f"{API}/usage/requests?status=502",
    ]
    for token in (READER, ADMIN):
        for path in concrete:
            answer = await board.get(path, token)
            assert answer.status < 500 or answer.status == 502, answer.text()
            if path.endswith("/litellm?model=fake-model") or "/litellm" in path:
                assert answer.status == 403, answer.text()

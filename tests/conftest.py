"""Shared fixtures: throwaway age identities and a sops project, made once per session.

Every test runs with HOME and XDG_CONFIG_HOME pointing at an empty session directory and
without inherited SOPS_AGE_* variables, so neither sops nor the code under test can reach
the developer's own keys (~/.config/sops/age/keys.txt, ~/.ssh). Because HOME moves, a git
identity is set through GIT_* variables for tests that commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from service import console
from service.config.upstreams import Lookup, system_lookup
from service.crypto.keys import write_identity
from service.crypto.sops import Sops
from service.http.app import create_app
from service.http.context import REGISTRY
from service.http.fast import KEEPALIVE_S
from service.http.fast_site import FastSite
from service.http.gateway import GATEWAY
from service.journal.events import Event
from service.journal.reader import read_events
from service.runtime.registry import Registry
from service.settings import Settings
from tests.support.postgres import PostgresServer, binaries
from tests.support.replicas import Checkout, RedisServer, make_remote, routing_yaml, server_yaml

_AMBIENT_SOPS_VARS = (
    "SOPS_AGE_KEY",
    "SOPS_AGE_KEY_FILE",
    "SOPS_AGE_KEY_CMD",
    "SOPS_AGE_SSH_PRIVATE_KEY_FILE",
    "SOPS_AGE_RECIPIENTS",
    "SOPS_CONFIG",
)


@dataclass(frozen=True)
class AgeIdentity:
    """An age identity on disk: its key file and its public recipient."""

    key_file: Path
    recipient: str


@dataclass(frozen=True)
class SopsProject:
    """A project directory with `.sops.yaml` (the documented rule), an empty `providers.d/` and a `Sops`."""

    root: Path
    providers: Path
    sops: Sops
    identity: AgeIdentity


@pytest.fixture(scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch: pytest.MonkeyPatch, _isolated_home: Path) -> Iterator[None]:
    """Hide the developer's keys and sops settings from every test."""
    for name in _AMBIENT_SOPS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(_isolated_home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(_isolated_home / ".config"))
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Switchboard Tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "tests@switchboard.invalid")
    yield


def _identity(tmp_path_factory: pytest.TempPathFactory, name: str) -> AgeIdentity:
    key_file = tmp_path_factory.mktemp(name) / "keys.txt"
    return AgeIdentity(key_file=key_file, recipient=write_identity(key_file))


@pytest.fixture(scope="session")
def age_identity(tmp_path_factory: pytest.TempPathFactory) -> AgeIdentity:
    """The identity the test project's files are encrypted for."""
    return _identity(tmp_path_factory, "age-identity")


@pytest.fixture(scope="session")
def other_age_identity(tmp_path_factory: pytest.TempPathFactory) -> AgeIdentity:
    """A second identity, not in `.sops.yaml` unless a test adds it."""
    return _identity(tmp_path_factory, "other-age-identity")


def _write_sops_yaml(root: Path, *recipients: str) -> Path:
    """Write the `.sops.yaml` rule of docs/reference.md §2.4 for the given recipients into `root`."""
    path = root / ".sops.yaml"
    path.write_text(
        "creation_rules:\n"
        "  - path_regex: providers.d/.*\\.ya?ml$\n"
        "    encrypted_regex: ^(api_key)$\n"
        f"    age: {','.join(recipients)}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def sops_project(tmp_path: Path, age_identity: AgeIdentity) -> SopsProject:
    """A fresh project for `age_identity`, with a `Sops` that uses only that key file."""
    root = tmp_path / "project"
    (root / "providers.d").mkdir(parents=True)
    _write_sops_yaml(root, age_identity.recipient)
    sops = Sops(age_key_file=age_identity.key_file, project_root=root)
    return SopsProject(root=root, providers=root / "providers.d", sops=sops, identity=age_identity)


# -- a running service ---------------------------------------------------------------------
# Real server on 127.0.0.1 port 0, real files, real watcher, real sops. Files are written the
# way editors and git do (temp file + rename) unless a test is about something else.

SERVER_YAML = """kind: ai_server
id: {id}
server_type: vllm
base_url: {base_url}
purposes: [{purposes}]
"""
KEY_YAML = """kind: api_key
id: {id}
provider: openrouter
api_key: {key}
purposes: [chat]
"""


def write_atomically(path: Path, text: str) -> Path:
    """Write `path` as editors and git do: a temp file beside it, then a rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_server(
    project: SopsProject, provider_id: str, base_url: str = "http://127.0.0.1:9/v1", purposes: str = "chat"
) -> Path:
    """A plaintext `ai_server` file (no secret, so no sops)."""
    text = SERVER_YAML.format(id=provider_id, base_url=base_url, purposes=purposes)
    return write_atomically(project.providers / f"{provider_id}.yaml", text)


def write_key(project: SopsProject, provider_id: str, key: str) -> Path:
    """An `api_key` file encrypted by real sops for the project's identity, then moved in place."""
    path = project.providers / f"{provider_id}.yaml"
    data = project.sops.encrypt(KEY_YAML.format(id=provider_id, key=key).encode(), str(path))
    return write_atomically(path, data.decode("utf-8"))


def write_routing(project: SopsProject, chat: Sequence[str], fallbacks: Sequence[str] = ()) -> Path:
    """`routing.yaml` routing chat to `chat`, then `fallbacks`."""
    text = f"kind: routing\npurposes:\n  chat:\n    primary: [{', '.join(chat)}]\n"
    if fallbacks:
        text += f"    fallbacks: [{', '.join(fallbacks)}]\n"
    return write_atomically(project.providers / "routing.yaml", text)


def git(root: Path, *args: str, input_text: str | None = None) -> str:
    """Run git in `root` (identity from the GIT_* variables set for every test)."""
    done = subprocess.run(
        ["git", *args], cwd=root, input=input_text, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def git_init(root: Path) -> None:
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "commit.gpgsign", "false")


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll `check` until it neither raises AssertionError nor returns False; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            assert result is not False
            return result
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.01)


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `check` until it holds; the seconds it took. AssertionError after `timeout`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@dataclass
class Service:
    """A running service (as `switchboard serve` runs it) and an HTTP session to call it."""

    app: web.Application
    settings: Settings
    project: SopsProject
    url: str
    http: aiohttp.ClientSession
    runner: web.AppRunner

    @property
    def registry(self) -> Registry:
        return self.app[REGISTRY]

    @property
    def events_file(self) -> Path:
        return self.settings.events_file

    def events(self) -> list[Event]:
        return read_events(self.events_file)

    async def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.get(self.url + path, headers=headers) as response:
            return response.status, await response.json()

    async def text(self, path: str, token: str | None = None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.get(self.url + path, headers=headers) as response:
            return response.status, await response.text()

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `/metrics` named `name` (`switchboard_pulls_total`) whose
        labels include `labels`: 0 when there is none."""
        _, text = await self.text("/metrics")
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    async def cuts(self) -> dict[str, float]:
        """`switchboard_http_cut_total` of each reason: the connections the servers cut or refused."""
        return {
            reason: await self.metric("switchboard_http_cut_total", reason=reason)
            for reason in ("receive_timeout", "send_timeout", "malformed")
        }

    async def stop(self) -> None:
        """Shut the service down as SIGTERM does (the event log is closed); idempotent."""
        await self.runner.cleanup()


@contextlib.asynccontextmanager
async def serve(
    project: SopsProject,
    *,
    lookup: Lookup = system_lookup,
    fast: bool = True,
    keepalive_s: float | None = None,
    wait_ready: bool = True,
    **settings: Any,
) -> AsyncIterator[Service]:
    """Serve `project` on 127.0.0.1, a free port, until the block ends; waits for /readyz 200
    (unless `wait_ready` is False: a test of a service that is not ready).

    `lookup` is how the service resolves upstream host names (a test's own DNS).

    The app runs as `switchboard serve` runs it (handler cancellation on, so a client that
    leaves cancels its upstream request), with a short debounce and health checks off
    unless `settings` say otherwise; on the gateway's own server (`service.http.fast`) unless
    `fast` is False (aiohttp's alone); `keepalive_s`, when given, is both servers' keep-alive
    timeout (else the fast path's 75 s, and aiohttp's own default).
    """
    values: dict[str, Any] = {
        "root": project.root,
        "providers": project.providers,
        "events": project.root / "var" / "events.jsonl",
        "port": 0,
        "debounce_ms": 10,
        "age_key_file": project.identity.key_file,
        "health_interval_s": 0,
    }
    config = Settings(**(values | settings))
    app = create_app(config, sops=project.sops, lookup=lookup, pages=(console,))
    kept: dict[str, float] = {} if keepalive_s is None else {"keepalive_timeout": keepalive_s}
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5, **kept)
    await runner.setup()
    site = (
        FastSite(runner, app[GATEWAY], "127.0.0.1", config.port, keepalive_s=keepalive_s or KEEPALIVE_S)
        if fast
        else web.TCPSite(runner, "127.0.0.1", config.port)
    )
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as http:
        service = Service(app, config, project, url, http, runner)
        try:

            async def ready() -> None:
                status, _ = await service.get("/readyz")
                assert status == 200

            if wait_ready:
                await eventually(ready, timeout=20)
            yield service
        finally:
            await service.stop()


@pytest.fixture
async def running_service(sops_project: SopsProject) -> AsyncIterator[Service]:
    """The service on a project with one server `gpu` routed for chat."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project) as service:
        yield service


@pytest.fixture
def remote(sops_project: SopsProject, tmp_path: Path) -> tuple[Path, Checkout]:
    """A bare repository standing in for the remote, holding `sops_project` with one routed
    server `gpu`, and the project's checkout of it (the replica tests' starting point)."""
    (sops_project.providers / "gpu.yaml").write_text(server_yaml("gpu", 9))
    (sops_project.providers / "routing.yaml").write_text(routing_yaml("gpu"))
    return make_remote(tmp_path, sops_project.root)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Debian's `redis-server` of the test's own, on a free port, stopped after it."""
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Debian's PostgreSQL (`postgresql` package), started once for the session in a temporary folder."""
    found = binaries()
    if found is None:
        pytest.skip(
            "PostgreSQL is not installed (apt-get install postgresql): no /usr/lib/postgresql/*/bin/initdb"
        )
    server = PostgresServer(found)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL server."""
    postgres_server.ensure_running()
    return postgres_server.database()

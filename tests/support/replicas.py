"""Real parts for the tests of many replicas (docs/reference.md §12): a remote, git-sync's
symlink swap, Redis, `switchboard serve`.

- `make_remote` makes a bare repository holding a first commit of a project's files, and
  `Checkout` is a clone of it that tests commit to and push from, as a person would.
- `GitSync` does what Kubernetes' git-sync does, with real git: one worktree per commit
  (`git worktree add --detach`), published by renaming a new symlink over `current`, the old
  worktree removed after.
- `RedisServer` is Debian's `redis-server` on a free loopback port, without persistence.
- `Replica` is `python -m service serve` in a subprocess: its own clone, port and event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_yaml(provider_id: str, port: int = 9, purposes: str = "chat") -> str:
    return (
        f"kind: ai_server\nid: {provider_id}\nserver_type: vllm\n"
        f"base_url: http://127.0.0.1:{port}/v1\npurposes: [{purposes}]\n"
    )


def routing_yaml(*chat: str) -> str:
    return f"kind: routing\npurposes:\n  chat:\n    primary: [{', '.join(chat)}]\n"


# -- git ---------------------------------------------------------------------------------------


@dataclass
class Checkout:
    """A clone of the remote on `main`: commit files and push them, as a person does."""

    root: Path

    @property
    def providers(self) -> Path:
        return self.root / "providers.d"

    def head(self) -> str:
        return git(self.root, "rev-parse", "HEAD")

    def commit(self, files: Mapping[str, str | None], message: str = "change") -> str:
        """Write (or with None remove) `providers.d/<name>` files and commit them; the commit."""
        for name, text in files.items():
            path = self.providers / name
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)
        git(self.root, "add", "-A", "providers.d")
        git(self.root, "commit", "-q", "-m", message)
        return self.head()

    def push(self, *, force: bool = False) -> None:
        git(self.root, "push", "-q", *(["--force"] if force else []), "origin", "HEAD:refs/heads/main")

    def pull(self) -> None:
        git(self.root, "pull", "-q", "--ff-only", "origin", "main")


def make_remote(tmp: Path, project: Path) -> tuple[Path, Checkout]:
    """A bare repository `remote.git` holding `project`'s files as its first commit, and a
    checkout (clone) of it to change them from."""
    remote = tmp / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    author = Checkout(tmp / "author")
    subprocess.run(["git", "clone", "-q", str(remote), str(author.root)], check=True, capture_output=True)
    git(author.root, "config", "commit.gpgsign", "false")
    git(author.root, "checkout", "-q", "-b", "main")
    for item in project.iterdir():
        target = author.root / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
    (author.root / ".gitignore").write_text("var/\n")
    git(author.root, "add", "-A")
    git(author.root, "commit", "-q", "-m", "the first configuration")
    author.push()
    return remote, author


def clone(remote: Path, root: Path) -> Checkout:
    """A replica's clone of `remote`, on `main`."""
    command = ["git", "clone", "-q", "-b", "main", str(remote), str(root)]
    subprocess.run(command, check=True, capture_output=True)
    git(root, "config", "commit.gpgsign", "false")
    return Checkout(root)


class GitSync:
    """Kubernetes' git-sync, as it lays out `--root`: a repository, a worktree per commit under
    `.worktrees/`, and the link `current` to the one served, swapped by a rename."""

    def __init__(self, root: Path, remote: Path) -> None:
        self.root = root
        self.remote = remote
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(remote), str(root)], check=True)
        self.link = root / "current"

    @property
    def providers(self) -> Path:
        return self.link / "providers.d"

    def sync(self, *, keep_old: bool = False) -> str:
        """Fetch the remote's `main` and publish it: a new worktree, then the link swapped."""
        git(self.root, "fetch", "-q", "origin", "main")
        return self.publish(git(self.root, "rev-parse", "FETCH_HEAD"), keep_old=keep_old)

    def publish(self, commit: str, *, keep_old: bool = False) -> str:
        """Point `current` at a worktree of `commit`; the old worktree is removed, unless
        `keep_old` (as `--stale-worktree-timeout` keeps it a while, for readers to finish)."""
        old = self.link.readlink().as_posix() if self.link.is_symlink() else None
        worktree = f".worktrees/{commit}"
        if not (self.root / worktree).exists():
            git(self.root, "worktree", "add", "-q", "--detach", worktree, commit)
        temporary = self.root / "tmp-link"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(worktree)
        temporary.rename(self.link)  # atomic: readers see the old target or the new one
        if old is not None and old != worktree and not keep_old:
            git(self.root, "worktree", "remove", "--force", old)
        return commit


# -- Redis ---------------------------------------------------------------------------------------


class RedisServer:
    """`redis-server` on a free loopback port, nothing saved; `stop` kills it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        """Start (again, after `stop`) on the same port, empty: nothing was saved."""
        workdir = self.workdir
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# -- replicas --------------------------------------------------------------------------------------


@dataclass
class Replica:
    """`switchboard serve` in a subprocess, on `port`, serving `providers`."""

    name: str
    root: Path
    providers: Path
    port: int
    env: dict[str, str]
    workdir: Path
    process: asyncio.subprocess.Process | None = None
    http: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events_file(self) -> Path:
        return self.workdir / f"{self.name}-events.jsonl"

    async def start(self) -> None:
        log = (self.workdir / f"{self.name}.log").open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "serve",
            "--providers",
            str(self.providers),
            "--port",
            str(self.port),
            "--events",
            str(self.events_file),
            cwd=self.root,
            env=self.env | {"SWITCHBOARD_ROOT": str(self.root), "SWITCHBOARD_REPLICA": self.name},
            stdout=log,
            stderr=log,
        )
        log.close()

    async def get(self, path: str, **headers: str) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.get(self.url + path, headers=headers) as response:
            body = await response.json() if response.content_type == "application/json" else None
            return response.status, body

    async def post(self, path: str, body: bytes, **headers: str) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.post(self.url + path, data=body, headers=headers) as response:
            data = await response.json() if response.content_type == "application/json" else None
            return response.status, data

    async def commit(self) -> str | None:
        """The commit this replica serves (`/readyz`), or None when it does not answer."""
        try:
            status, body = await self.get("/readyz")
        except aiohttp.ClientError:
            return None
        return body.get("last_applied_commit") if status == 200 else None

    async def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.returncode is None, self.log()
            with contextlib.suppress(aiohttp.ClientError):
                status, _ = await self.get("/readyz")
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} is not ready: {self.log()}")

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()

    def log(self) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def replica_env(age_key_file: Path | None, **settings: str) -> dict[str, str]:
    """The environment of a replica: the repository's code first on the path, the age identity,
    a short debounce, no health checks, and `settings` as `SWITCHBOARD_<NAME>` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWITCHBOARD_", "SOPS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if age_key_file is not None:
        env["SOPS_AGE_KEY_FILE"] = str(age_key_file)
    env["SWITCHBOARD_DEBOUNCE_MS"] = "10"
    env["SWITCHBOARD_HEALTH_INTERVAL_S"] = "0"
    env["SWITCHBOARD_LOG_LEVEL"] = "WARNING"
    return env | {f"SWITCHBOARD_{k.upper()}": v for k, v in settings.items()}


@contextlib.asynccontextmanager
async def replicas(*members: Replica) -> AsyncIterator[tuple[Replica, ...]]:
    """Start each replica, wait until all are ready, stop them all at the end."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for member in members:
            member.http = http
            await member.start()
        try:
            for member in members:
                await member.wait_ready()
            yield members
        finally:
            await asyncio.gather(*(m.stop() for m in members))

"""The writer survives what a real deployment does to it: a `kill -9` in the middle of writes.

`switchboard serve` runs as its own process on a real git repository; writes go in, the
process is killed at a random moment, and started again. After each restart the working
tree is clean (nothing half-written, nothing uncommitted left behind), every commit is
whole, and the service serves exactly what HEAD holds.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import SopsProject, git, git_init, write_routing, write_server

API = "/api/v1/llm-config"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _start(project: SopsProject, port: int, **settings: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "SOPS_AGE_KEY_FILE": str(project.identity.key_file),
        "SWITCHBOARD_HEALTH_INTERVAL_S": "0",
        "SWITCHBOARD_DEBOUNCE_MS": "10",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        **{f"SWITCHBOARD_{name.upper()}": value for name, value in settings.items()},
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "--root",
        str(project.root),
        "serve",
        "--port",
        str(port),
        cwd=project.root,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _ready(http: aiohttp.ClientSession, base: str) -> dict[str, object]:
    for _ in range(300):
        try:
            async with http.get(f"{base}/readyz") as response:
                if response.status == 200:
                    body: dict[str, object] = await response.json()
                    return body
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    pytest.fail("the service did not become ready")


async def _write(http: aiohttp.ClientSession, base: str, index: int) -> int:
    body = {"id": f"w{index:03d}", "server_type": "vllm", "base_url": f"http://127.0.0.1:{10_000 + index}/v1"}
    try:
        async with http.post(f"{base}{API}/servers", json=body) as response:
            return response.status
    except aiohttp.ClientError:
        return 0  # killed under it


@pytest.mark.timeout(120)
async def test_a_service_killed_mid_write_leaves_a_clean_tree_and_whole_commits(
    sops_project: SopsProject,
) -> None:
    root = sops_project.root
    git_init(root)
    (root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    rng = random.Random(7)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    index = 0
    async with aiohttp.ClientSession() as http:
        for _ in range(6):
            process = await _start(sops_project, port)
            await _ready(http, base)
            writes = [asyncio.create_task(_write(http, base, index + i)) for i in range(4)]
            index += 4
            await asyncio.sleep(rng.uniform(0.02, 0.4))
            process.send_signal(signal.SIGKILL)
            await process.wait()
            await asyncio.gather(*writes)
        process = await _start(sops_project, port)
        try:
            await _ready(http, base)
            async with http.get(f"{base}{API}/servers") as response:
                served = {p["id"] for p in (await response.json())["providers"]}
        finally:
            process.terminate()
            await process.wait()
    assert git(root, "status", "--porcelain") == ""
    git(root, "fsck", "--no-progress", "--connectivity-only")  # objects a kill orphaned are harmless garbage
    on_disk = {p.stem for p in (root / "providers.d").glob("*.yaml")} - {"routing"}
    in_head = {Path(p).stem for p in git(root, "ls-tree", "--name-only", "HEAD", "providers.d/").split()} - {
        "routing"
    }
    assert on_disk == in_head == served
    writes = git(root, "log", "--format=%H %s").splitlines()[:-1]  # all but "init"
    assert writes, "no write landed before a kill: the test proved nothing"
    for line in writes:
        sha, subject = line.split(" ", 1)
        assert subject.startswith("create ai_server ")
        name = subject.split()[-1]
        assert git(root, "show", "--name-only", "--format=", sha) == f"providers.d/{name}.yaml"


@pytest.mark.timeout(120)
async def test_a_service_that_pushes_killed_mid_write_never_leaves_local_and_remote_diverged(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    """With SWITCHBOARD_GIT_PUSH, killed at random between push and apply: the local branch is
    never ahead of the remote (nothing unpushed, nothing diverged), the tree is clean, and
    the next write brings the local branch to the remote's head and serves all of it."""
    root = sops_project.root
    git_init(root)
    (root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    git(root, "remote", "add", "origin", str(bare))
    git(root, "push", "-q", "origin", "main")
    rng = random.Random(11)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    index = 0
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            process = await _start(sops_project, port, git_push="origin")
            await _ready(http, base)  # a write the kill cut short is finished or undone by now
            assert git(root, "status", "--porcelain") == ""
            assert git(bare, "merge-base", "--is-ancestor", git(root, "rev-parse", "HEAD"), "main") == ""
            writes = [asyncio.create_task(_write(http, base, index + i)) for i in range(4)]
            index += 4
            await asyncio.sleep(rng.uniform(0.02, 0.4))
            process.send_signal(signal.SIGKILL)
            await process.wait()
            await asyncio.gather(*writes)
        process = await _start(sops_project, port, git_push="origin")
        try:
            await _ready(http, base)
            assert git(root, "status", "--porcelain") == ""
            assert await _write(http, base, index) == 201
            async with http.get(f"{base}{API}/servers") as response:
                served = {p["id"] for p in (await response.json())["providers"]}
        finally:
            process.terminate()
            await process.wait()
    assert git(root, "rev-parse", "HEAD") == git(bare, "rev-parse", "main")
    assert git(root, "status", "--porcelain") == ""
    on_remote = {Path(p).stem for p in git(bare, "ls-tree", "--name-only", "main", "providers.d/").split()}
    assert served == on_remote - {"routing"}
    assert git(bare, "rev-list", "--merges", "--count", "main") == "0"

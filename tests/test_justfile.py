"""The Justfile: one entry point per task, the ones docs/reference.md §1 names among them."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

REPO = Path(__file__).resolve().parent.parent


def _just() -> str:
    """The `just` of this environment (`rust-just`, beside this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "just"
    found = str(beside) if beside.exists() else shutil.which("just")
    assert found is not None, "`just` is installed by `pip install -e .` (rust-just)"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_recipes_named_for_users_are_there() -> None:
    """ "Justfile  recipes: serve, test, lint, validate, bench, ..." """
    done = subprocess.run([_just(), "--summary"], cwd=REPO, capture_output=True, text=True, check=True)
    assert {"serve", "test", "lint", "validate", "bench"} <= set(done.stdout.split())


@pytest.mark.timeout(60)
async def test_just_serve_is_switchboard_serve(tmp_path: Path) -> None:
    providers = tmp_path / "providers.d"
    providers.mkdir()
    (providers / "gpu.yaml").write_text(
        "kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: http://127.0.0.1:9/v1\n"
    )
    port = _free_port()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "SWITCHBOARD_ROOT": str(tmp_path)}  # its var/ there, not here
    args = ["--providers", str(providers), "--port", str(port)]
    process = await asyncio.create_subprocess_exec(
        _just(),
        "serve",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.get(
                        f"http://127.0.0.1:{port}/api/v1/llm-config/servers/gpu"
                    ) as response:
                        if response.status == 200:
                            assert (await response.json())["id"] == "gpu"
                            break
                except aiohttp.ClientError:
                    pass
                assert process.returncode is None, (await process.stderr.read()).decode()  # type: ignore[union-attr]
                await asyncio.sleep(0.1)
            else:
                pytest.fail("`just serve` did not serve the folder")
    finally:
        process.terminate()
        await process.wait()

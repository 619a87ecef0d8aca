"""The README's first command: `just demo` serves the examples, and a chat completion works."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.timeout(90)
async def test_the_demo_serves_the_examples_end_to_end(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "SWITCHBOARD_DEMO_DIR": str(tmp_path / "demo"), "SWITCHBOARD_PORT": str(port)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "demo",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                try:
                    async with session.get(f"{base}/readyz") as response:
                        if response.status == 200:
                            ready = await response.json()
                            break
                except aiohttp.ClientError:
                    pass
                assert process.returncode is None, (await process.stderr.read()).decode()  # type: ignore[union-attr]
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the demo did not become ready")
            assert ready["refused"] == []
            body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hello"}]}
            async with session.post(f"{base}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                answer = await response.json()
                assert response.headers["x-switchboard-provider"] in ("openrouter-default", "local-vllm")
            assert "says: hello" in answer["choices"][0]["message"]["content"]
            async with session.get(f"{base}/api/v1/llm-config/active/chat") as response:
                active = await response.json()
            assert [p["id"] for p in active["primary"]] == ["openrouter-default", "local-vllm"]
            assert active["primary"][0]["api_key"].startswith("****")
            # A newcomer's first look at the console: every provider checked, and every one healthy
            # (each stand-in answers its protocol's health check: TEI's is `/info`).
            for _ in range(600):
                async with session.get(f"{base}/api/v1/llm-config/providers") as response:
                    providers = (await response.json())["providers"]
                if all(p["health"]["checked_at"] for p in providers):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"not every provider was checked: {providers}")
            health = {p["id"]: p["health"]["status"] for p in providers}
            assert set(health.values()) == {"healthy"}, health
            body = {"model": "bge-m3", "input": ["hello"]}
            async with session.post(f"{base}/v1/embeddings", json=body) as response:
                assert response.status == 200, await response.text()
                assert response.headers["x-switchboard-provider"] == "local-tei"
    finally:
        process.terminate()
        await process.wait()
    assert process.returncode == 0

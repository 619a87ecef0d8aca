"""The command-line clients teams run behind a gateway, headless against Switchboard with a
stand-in upstream, offline (docs/reference.md §14): Claude Code 2.1.197 and Codex 0.171.0, pinned in
tests/clients/package.json and installed from npm (`npm ci`, by .ci/run or here once).

Each completes a turn with a tool call: the upstream asks for a shell `echo`, the CLI runs it
and sends its output back, and the upstream's answer quotes it. Nothing may leave the
machine: the CLIs' telemetry, update checks and error reports are off, and a proxy that
refuses every connection stands for anything that is not loopback.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SopsProject
from tests.support.gateway import CANARY, running, write_clients, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, closed_port_url

CLIENTS = Path(__file__).parents[1] / "clients"
BIN = CLIENTS / "node_modules" / ".bin"
TOKEN = "tok-cli-client-0001"
ECHO = "echo switchboard-tool-ran"
TOOL_CALLS = {
    "Bash": {"command": ECHO, "description": "Echo a word"},  # Claude Code's shell tool
    "exec_command": {"cmd": ECHO},  # Codex's
}


@pytest.fixture(scope="session")
def clis() -> Path:
    """The pinned CLIs, installed from npm once (CI's .ci/run installs them first)."""
    if not (BIN / "claude").exists() or not (BIN / "codex").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(
                "npm is not installed: the CLI tests need Node.js and npm (apt-get install -y nodejs npm)"
            )
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(CLIENTS)], check=True, timeout=600
        )
    return BIN


def offline_env(home: Path) -> dict[str, str]:
    """An environment where nothing but loopback can be reached, and nothing calls home."""
    nowhere = closed_port_url().removesuffix("/v1")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ANTHROPIC_", "OPENAI_", "CLAUDE_", "CODEX_"))
    }
    env.update(
        HOME=str(home),
        HTTPS_PROXY=nowhere,
        HTTP_PROXY=nowhere,
        ALL_PROXY=nowhere,
        NO_PROXY="127.0.0.1,localhost",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
    )
    return env


async def run(*argv: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def claude(clis: Path, url: str, home: Path, model: str) -> tuple[int, str, str]:
    env = offline_env(home) | {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": TOKEN}
    home.mkdir(parents=True, exist_ok=True)
    argv = [str(clis / "claude"), "-p", "Run the echo tool, please.", "--model", model]
    return await run(*argv, "--allowedTools", "Bash(echo:*)", env=env, cwd=home)


async def codex(clis: Path, url: str, home: Path, model: str) -> tuple[int, str, str]:
    config = home / ".codex"
    config.mkdir(parents=True, exist_ok=True)
    (config / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "switchboard"\ncheck_for_update_on_startup = false\n\n'
        f'[model_providers.switchboard]\nname = "Switchboard"\nbase_url = "{url}/v1"\n'
        'env_key = "SWITCHBOARD_TOKEN"\nwire_api = "responses"\n\n'
        '[analytics]\nenabled = false\n\n[otel]\nexporter = "none"\n'
    )
    env = offline_env(home) | {"CODEX_HOME": str(config), "SWITCHBOARD_TOKEN": TOKEN}
    argv = [str(clis / "codex"), "exec", "--skip-git-repo-check", "Run the echo tool, please."]
    return await run(*argv, env=env, cwd=home)


@pytest.mark.parametrize("native", [False, True], ids=["translated", "native"])
async def test_claude_code_completes_a_turn_with_a_tool(
    clis: Path, sops_project: SopsProject, tmp_path: Path, native: bool
) -> None:
    protocol, model = ("anthropic", "claude-sonnet-x") if native else ("openai", "fake-model")
    async with FakeUpstream(
        protocol=protocol, name="up", api_key=CANARY, tool_calls=TOOL_CALLS, models=(model,)
    ) as up:
        if native:
            write_provider(sops_project, "up", provider="anthropic", base_url=up.url, api_key=CANARY)
        else:
            write_provider(sops_project, "up", base_url=up.base_url, api_key=CANARY)
        write_routing(sops_project, chat="up")
        write_clients(sops_project, {"claude-code": (TOKEN, ["completions"])})
        async with running(sops_project) as board:
            code, out, err = await claude(clis, board.url, tmp_path / "home", model)
    assert code == 0, err[-2000:]
    assert "up says: switchboard-tool-ran" in out
    turns = [r for r in up.requests if r.method == "POST"]
    assert len(turns) >= 2 and all(TOKEN not in str(r.headers) for r in up.requests)
    assert turns[-1].path == ("/v1/messages" if native else "/v1/chat/completions")


@pytest.mark.parametrize("native", [False, True], ids=["translated", "native"])
async def test_codex_completes_a_turn_with_a_tool(
    clis: Path, sops_project: SopsProject, tmp_path: Path, native: bool
) -> None:
    async with FakeUpstream(name="up", api_key=CANARY, tool_calls=TOOL_CALLS) as up:
        write_provider(
            sops_project,
            "up",
            server_type="vllm" if native else "llamacpp",
            base_url=up.base_url,
            api_key=CANARY,
        )
        write_routing(sops_project, chat="up")
        write_clients(sops_project, {"codex": (TOKEN, ["completions"])})
        async with running(sops_project) as board:
            code, out, err = await codex(clis, board.url, tmp_path / "home", "fake-model")
    assert code == 0, err[-2000:]
    assert "switchboard-tool-ran" in out and "up says:" in out
    turns = [r for r in up.requests if r.method == "POST"]
    assert len(turns) >= 2 and all(TOKEN not in str(r.headers) for r in up.requests)
    assert turns[-1].path == ("/v1/responses" if native else "/v1/chat/completions")

"""The README's client example, as written, runs to completion against a real service, and its
`litellm.acompletion(**params, ...)` reaches the vendor with the model named, not `*`."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import SopsProject
from tests.support.gateway import CANARY, running, write_clients, write_provider, write_routing
from tests.support.upstreams import FakeUpstream

README = Path(__file__).resolve().parents[2] / "README.md"
TOKEN = "sb_readme_example_0a1b2c3d4e5f6a7b"


def client_example() -> str:
    """The README's Python block that uses the client, as a reader would copy it."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = [b for b in blocks if "from service.client import Switchboard" in b]
    assert len(found) == 1, "the README has one client example"
    return found[0]


@pytest.mark.timeout(120)
async def test_the_readme_client_example_runs_to_completion_and_names_the_model(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    example = client_example()
    assert 'Switchboard("http://127.0.0.1:8080", token="sb_…")' in example
    async with FakeUpstream(name="openrouter", api_key=CANARY) as vendor:
        # An OpenRouter key, as the examples ship it: it declares no models (it serves any), and
        # maps the README's model to OpenRouter's name for it.
        write_provider(
            sops_project,
            "openrouter-default",
            provider="openrouter",
            base_url=vendor.base_url,
            api_key=CANARY,
            model_map={"gpt-4o-mini": "openai/gpt-4o-mini"},
        )
        write_routing(sops_project, chat="openrouter-default")
        write_clients(sops_project, {"app": (TOKEN, ["config:read", "secrets:read", "admin"])})
        async with running(sops_project) as board:
            script = tmp_path / "example.py"
            script.write_text(example.replace("http://127.0.0.1:8080", board.url).replace("sb_…", TOKEN))
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=100)
    assert process.returncode == 0, err.decode()[-3000:]
    completions = [r for r in vendor.requests if r.path.endswith("/chat/completions")]
    assert [r.json["model"] for r in completions] == ["openai/gpt-4o-mini"]
    assert completions[0].headers["authorization"] == f"Bearer {CANARY}"
    lines = out.decode().splitlines()
    assert "openrouter says: hi" in lines
    assert any(line.startswith("1 service.started") for line in lines), lines

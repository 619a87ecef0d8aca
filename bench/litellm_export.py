"""LiteLLM's real proxy started from `switchboard export litellm`'s file as it is, and asked.

    python -m bench.litellm_proxy setup      # once: the proxy in bench/.litellm-venv
    python -m bench.litellm_export           # exit 0 when every check holds

The demo's world (the shipped examples, each provider pointed at a local stand-in that
speaks its protocol, keys encrypted to a throwaway identity) is exported; the proxy starts
from that file unchanged, given only what its header names (`LITELLM_MASTER_KEY` and each
`SWITCHBOARD_KEY_<ID>`). Then requests through it are counted where they land: chat for a
model two weighted primaries serve, chat for a model only the catch-all serves, embeddings
by the TEI server's own name, and a request with another key than the master key (refused).

The test suite checks the same file against litellm's `Router` in-process
(`tests/config/test_export_routing.py`); this is the slower proof with the proxy itself,
whose start (about 30 s here) and 750 MB venv are too much for every test run.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.litellm_proxy import LiteLLMProxy
from demo.world import world
from service.config.export import litellm_export
from service.config.snapshot import load_folder
from service.formats import key_variable
from tests.support.upstreams import FakeUpstream

CHAT = "llama-3.1-8b"
"""Served by the examples' two weighted chat primaries (OpenRouter 3, vLLM 1)."""
REQUESTS = 40


async def check(folder: Path) -> list[str]:
    """Run the checks in a demo world made in `folder`; what failed (empty: all held)."""
    failed: list[str] = []
    async with world(0, folder) as demo:
        export = litellm_export(load_folder(demo.settings.providers_dir, "providers.d", None))
        config = folder / "litellm-config.yaml"
        config.write_text(export.yaml())
        master = "sk-" + secrets.token_hex(32)
        env = {"LITELLM_MASTER_KEY": master}
        env |= {key_variable(pid): up.api_key for pid, up in demo.upstreams.items() if up.api_key}
        started = time.perf_counter()
        async with LiteLLMProxy(upstream_base_url="", config_path=config, env=env) as proxy:
            print(f"the proxy started from the exported file in {time.perf_counter() - started:.1f} s")
            ups = demo.upstreams
            async with aiohttp.ClientSession() as http:
                auth = {"Authorization": f"Bearer {master}"}

                async def ask(path: str, body: dict[str, object], headers: dict[str, str] = auth) -> int:
                    async with http.post(f"{proxy.url}/v1/{path}", json=body, headers=headers) as response:
                        text = await response.text()
                        if response.status != 200:
                            print(f"  {response.status}: {text[:300]}")
                        return response.status

                chat = {"messages": [{"role": "user", "content": "hello"}]}
                for up in ups.values():
                    up.requests.clear()  # the proxy lists models as it starts
                statuses = [await ask("chat/completions", {"model": CHAT, **chat}) for _ in range(REQUESTS)]
                shares = _landed(ups, "/chat/completions")
                print(f"chat {CHAT!r} x{REQUESTS}: {dict(Counter(statuses))}, landed {shares}")
                if set(statuses) != {200} or set(shares) != {"openrouter-default", "local-vllm"}:
                    failed.append(f"chat {CHAT}: {shares} (both weighted primaries expected)")
                elif not shares["openrouter-default"] > shares["local-vllm"]:
                    failed.append(f"chat {CHAT}: {shares} (3 to 1 expected)")

                for up in ups.values():
                    up.requests.clear()
                status = await ask("chat/completions", {"model": "gpt-4o-mini", **chat})
                shares = _landed(ups, "/chat/completions")
                print(f"chat 'gpt-4o-mini' (declared by none): {status}, landed {shares}")
                if status != 200 or shares != {"openrouter-default": 1}:
                    failed.append(f"chat gpt-4o-mini: {status} {shares} (the catch-all expected)")

                for up in ups.values():
                    up.requests.clear()
                status = await ask("embeddings", {"model": "local-tei/bge-m3", "input": ["hello"]})
                shares = _landed(ups, "/embeddings")
                print(f"embeddings 'local-tei/bge-m3': {status}, landed {shares}")
                if status != 200 or shares != {"local-tei": 1}:
                    failed.append(f"embeddings: {status} {shares} (local-tei expected)")

                wrong = {"Authorization": "Bearer sk-" + secrets.token_hex(32)}
                status = await ask("chat/completions", {"model": CHAT, **chat}, headers=wrong)
                # Refused; how depends on LiteLLM (1.108: 400 `no_db_connection` without a database).
                print(f"with another key than the master key: {status}")
                if status < 400:
                    failed.append(f"a request with another key was answered {status}")
    return failed


def _landed(ups: dict[str, FakeUpstream], path: str) -> dict[str, int]:
    counts = {pid: sum(r.path.endswith(path) for r in up.requests) for pid, up in ups.items()}
    return {pid: n for pid, n in counts.items() if n}


def main() -> int:
    """Run the checks; print what failed and exit 1 on any, or the proxy's log when it fails."""
    with tempfile.TemporaryDirectory(prefix="switchboard-litellm-export-") as folder:
        failed = asyncio.run(check(Path(folder)))
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    print("every check held" if not failed else f"{len(failed)} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

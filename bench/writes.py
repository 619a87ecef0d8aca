"""Benchmark of writes over HTTP (issue 10): a create answered once encrypted, committed, applied.

    python -m bench.writes                 # 30 creates, 20 concurrent writes, 5 rounds
    python -m bench.writes --runs 10 --rounds 3

A fresh git repository with one routed server and `.sops.yaml` for a throwaway identity is
served by `switchboard serve` in its own process (writes in `commit` mode). Measured:

- a create: `POST /api/v1/llm-config/api-keys` with a plaintext key, until the answer
  (validated, encrypted by sops, committed, the branch and file moved, reloaded through the
  watcher's path and applied), p50/p99 over the sequential creates of every round;
- 20 concurrent writes (creates of keyless servers, as 20 clients at once): the time until
  the last is answered, median over the rounds; they land as 20 commits, one at a time;
- for scale, one `sops encrypt` and one `sops decrypt` of such a file, timed alone.

Only 127.0.0.1 is contacted. Results print as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import aiohttp

from bench.config import CACHE, Service
from bench.load import percentile
from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops

API = "/api/v1/llm-config"


def _git(root: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost"}
    env |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def build_project() -> tuple[Path, Path]:
    """A fresh repository: a routed server, `.sops.yaml` for a throwaway identity; (root, key file)."""
    root = CACHE / "writes"
    key_file = CACHE / "age" / "keys.txt"
    if not key_file.exists():
        write_identity(key_file)
    shutil.rmtree(root, ignore_errors=True)
    (root / "providers.d").mkdir(parents=True)
    recipient = next(x.split(": ")[1] for x in key_file.read_text().splitlines() if "public key" in x)
    add_recipient(root / ".sops.yaml", recipient)
    (root / ".gitignore").write_text("var/\n")
    (root / "providers.d" / "gpu.yaml").write_text(
        "kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: http://127.0.0.1:9/v1\n"
    )
    routing = "kind: routing\npurposes:\n  chat:\n    primary: [gpu]\n"
    (root / "providers.d" / "routing.yaml").write_text(routing)
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "bench: start")
    return root, key_file


async def _create(http: aiohttp.ClientSession, url: str, body: dict[str, object], path: str) -> float:
    started = time.perf_counter()
    async with http.post(url + API + path, json=body) as response:
        await response.read()
        if response.status != 201:
            raise RuntimeError(f"{path} answered {response.status}: {await response.text()}")
    return time.perf_counter() - started


async def round_(runs: int, tag: int) -> tuple[list[float], float]:
    root, key_file = build_project()
    service = Service(root, key_file)
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            creates = []
            for index in range(runs):
                key = f"sk-bench-{tag:02d}-{index:04d}-0123456789abcdef"
                body = {"id": f"k{index:04d}", "provider": "openai", "api_key": key, "purposes": ["chat"]}
                creates.append(await _create(http, service.url, body, "/api-keys"))
            bodies = [
                {"id": f"s{i:02d}", "server_type": "vllm", "base_url": f"http://127.0.0.1:{9000 + i}/v1"}
                for i in range(20)
            ]
            started = time.perf_counter()
            await asyncio.gather(*(_create(http, service.url, b, "/servers") for b in bodies))
            burst = time.perf_counter() - started
        commits = int(_git(root, "rev-list", "--count", "HEAD"))
        assert commits == 1 + runs + 20, f"expected {1 + runs + 20} commits, found {commits}"
        assert _git(root, "status", "--porcelain") == "", "the working tree is not clean"
    finally:
        service.stop()
    return creates, burst


def sops_alone(samples: int = 10) -> tuple[float, float]:
    root, key_file = build_project()
    sops = Sops(age_key_file=key_file, project_root=root)
    text = b"kind: api_key\nid: x\nprovider: openai\napi_key: sk-0123456789abcdef\n"
    name = str(root / "providers.d" / "x.yaml")
    enc, dec = [], []
    for _ in range(samples):
        started = time.perf_counter()
        data = sops.encrypt(text, name)
        enc.append(time.perf_counter() - started)
        started = time.perf_counter()
        sops.decrypt(data, "providers.d/x.yaml")
        dec.append(time.perf_counter() - started)
    return statistics.median(enc), statistics.median(dec)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="sequential creates per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    creates: list[float] = []
    bursts: list[float] = []
    for tag in range(args.rounds):
        sample, burst = await round_(args.runs, tag)
        creates += sample
        bursts.append(burst)
        print(f"round {tag + 1}: create p50 {percentile(sample, 50) * 1000:.0f} ms, 20 at once {burst:.2f} s")
    encrypt, decrypt = sops_alone()
    ms = [x * 1000 for x in creates]
    print()
    print("| measure | value |")
    print("|---|---:|")
    print(f"| create answered (encrypt, commit, applied), p50 | {percentile(ms, 50):.0f} ms |")
    print(f"| create answered, p99 | {percentile(ms, 99):.0f} ms |")
    burst = statistics.median(bursts)
    print(f"| 20 concurrent writes, all answered (median of {args.rounds}) | {burst:.2f} s |")
    print(f"| one `sops encrypt` alone | {encrypt * 1000:.0f} ms |")
    print(f"| one `sops decrypt` alone | {decrypt * 1000:.0f} ms |")


if __name__ == "__main__":
    asyncio.run(main())

"""Benchmark of the configuration service (issue 3): reload latency, cold start, lookups.

    python -m bench.config                      # sizes 10 100 1000, 20 reloads each
    python -m bench.config --sizes 10 --runs 5  # quick

For each size N it builds a project of N encrypted `api_key` files (real sops, a throwaway
age identity; cached in bench/.cache/), starts `switchboard serve` as its own process, and
measures:

- cold start: process start -> `/readyz` 200 (every file decrypted, events recorded);
- reload: one encrypted file replaced atomically (as git checkout or an editor does) -> the
  new key's mask served by `GET /api/v1/llm-config/providers/{id}`, p50/p99 over the runs;
- lookups (once, at the middle size): `GET /api/v1/llm-config/active/chat` throughput and
  p99 with a loopback load generator at concurrency 32.

Only 127.0.0.1 is contacted. Results print as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp

from bench.load import percentile
from service.config.secret import mask
from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops

CACHE = Path(__file__).resolve().parent / ".cache"
KEY = "sk-bench-{index:04d}-0123456789abcdef-{variant}{variant}{variant}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_project(size: int) -> tuple[Path, Path, dict[str, bytes]]:
    """A project of `size` encrypted providers; returns (root, key file, variants of p0000)."""
    root = CACHE / f"config-{size}"
    key_file = CACHE / "age" / "keys.txt"
    if not key_file.exists():
        write_identity(key_file)
    marker = root / ".complete"
    sops = Sops(age_key_file=key_file, project_root=root)
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        (root / "providers.d").mkdir(parents=True)
        recipient = next(x.split(": ")[1] for x in key_file.read_text().splitlines() if "public key" in x)
        add_recipient(root / ".sops.yaml", recipient)

        def make(index: int) -> None:
            path = root / "providers.d" / f"p{index:04d}.yaml"
            path.write_text(_provider(index, "a"))
            sops.encrypt_in_place(path)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(make, range(size)))
        (root / "providers.d" / "routing.yaml").write_text(
            "kind: routing\npurposes:\n  chat:\n    primary: [p0000]\n"
        )
        marker.touch()
    variants = {}
    for variant in ("a", "b"):
        data = _provider(0, variant).encode()
        variants[variant] = sops.encrypt(data, str(root / "providers.d" / "p0000.yaml"))
    (root / "providers.d" / "p0000.yaml").write_bytes(variants["a"])
    return root, key_file, variants


def _provider(index: int, variant: str) -> str:
    key = KEY.format(variant=variant, index=index)
    return f"kind: api_key\nid: p{index:04d}\nprovider: openai\napi_key: {key}\npurposes: [chat]\n"


class Service:
    """`switchboard serve` in its own process; `code` runs another checkout's (a baseline)."""

    def __init__(
        self,
        root: Path,
        key_file: Path,
        *,
        code: Path | None = None,
        name: str = "var",
        env: dict[str, str] | None = None,
    ) -> None:
        self.root, self.key_file, self.code = root, key_file, code
        self.env = env or {}
        """Variables the process gets besides the bench's own (`SWITCHBOARD_OTEL_EXPORTER`...)."""
        self.events = root / name / "events.jsonl"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> float:
        """Start, and return the seconds until `/readyz` answers 200."""
        shutil.rmtree(self.events.parent, ignore_errors=True)
        env = {
            **os.environ,
            "SOPS_AGE_KEY_FILE": str(self.key_file),
            "SWITCHBOARD_LOG_LEVEL": "WARNING",
            **self.env,
        }
        if self.code is not None:  # `python -m service` from there imports that checkout's code
            env["PYTHONPATH"] = str(self.code)
        started = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "service",
            "--root",
            str(self.root),
            "serve",
            "--port",
            str(self.port),
        ]
        self.process = subprocess.Popen(
            [*command, "--events", str(self.events)],
            env=env,
            cwd=self.code,
            stdout=subprocess.DEVNULL,
        )
        async with aiohttp.ClientSession() as session:
            while time.perf_counter() - started < 300:
                try:
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return time.perf_counter() - started
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.01)
        raise RuntimeError("the service did not become ready in 300 s")

    @property
    def pid(self) -> int | None:
        """The serving process's id, once started."""
        return self.process.pid if self.process is not None else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


async def measure_reloads(service: Service, variants: dict[str, bytes], runs: int) -> list[float]:
    """Seconds from an atomic replace of p0000.yaml to its new mask being served."""
    path = service.root / "providers.d" / "p0000.yaml"
    url = f"{service.url}/api/v1/llm-config/providers/p0000"
    latencies = []
    async with aiohttp.ClientSession() as session:
        for run in range(runs):
            variant = "b" if run % 2 == 0 else "a"
            wanted = mask(KEY.format(variant=variant, index=0))
            tmp = path.with_name(".p0000.yaml.tmp")
            tmp.write_bytes(variants[variant])
            started = time.perf_counter()
            tmp.replace(path)
            while True:
                async with session.get(url) as response:
                    body = await response.json()
                if body.get("api_key") == wanted:
                    break
                if time.perf_counter() - started > 10:
                    raise RuntimeError("the change was not served within 10 s")
                await asyncio.sleep(0.002)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.2)  # let the watcher settle between runs
    return latencies


async def measure_lookups(url: str, concurrency: int, seconds: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of GETs to `url`, `concurrency` at once for `seconds`."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(50):  # warm up
            async with session.get(url) as response:
                await response.read()
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"lookup answered {response.status}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = [x * 1000 for x in latencies]
    return len(latencies) / elapsed, percentile(ms, 50), percentile(ms, 99)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--lookup-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    rows = []
    lookups = None
    for size in args.sizes:
        print(f"preparing {size} encrypted files...", file=sys.stderr, flush=True)
        root, key_file, variants = build_project(size)
        service = Service(root, key_file)
        try:
            cold = await service.start()
            reloads = [x * 1000 for x in await measure_reloads(service, variants, args.runs)]
            if size == args.sizes[len(args.sizes) // 2] and args.lookup_seconds > 0:
                lookups = await measure_lookups(
                    f"{service.url}/api/v1/llm-config/active/chat", 32, args.lookup_seconds
                )
        finally:
            service.stop()
        rows.append((size, cold, statistics.median(reloads or [0.0]), percentile(reloads, 99)))
        print(f"  {size}: cold start {cold:.2f} s, reload p50 {rows[-1][2]:.0f} ms", file=sys.stderr)
    print("| files | cold start to ready | reload p50 | reload p99 |")
    print("|---:|---:|---:|---:|")
    for size, cold, p50, p99 in rows:
        print(f"| {size} | {cold:.2f} s | {p50:.0f} ms | {p99:.0f} ms |")
    if lookups is not None:
        rps, p50, p99 = lookups
        route = "`GET /api/v1/llm-config/active/chat`"
        print(f"\n{route}, concurrency 32: {rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())

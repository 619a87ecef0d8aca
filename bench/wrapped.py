"""`switchboard serve` under a wrapper script, for the benches that look inside it
(`bench.pauses`, `bench.phases`).

The wrapper (the bench's own Python text, written into a temporary folder and run as the
service's main script, so that its folder comes first on the service's path) installs what it
observes, runs `python -m service`, and writes what it saw at exit to the file named by the
`BENCH_WRAPPED_OUT` environment variable. The service is metered as `bench.gateway` serves it:
the project of `build_project` (an encrypted, priced provider with a budget, a client with
every limit) and the usage ledger on, in the temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.config import _free_port
from bench.gateway import build_project
from bench.upstream import UpstreamProcess


@dataclass
class Wrapped:
    """A running wrapped service: its process, URL, a client's token, and where it writes."""

    process: subprocess.Popen[bytes]
    url: str
    token: str
    work: Path
    out: Path

    def stop(self) -> None:
        """Stop the service (SIGTERM: the wrapper writes `out` at exit)."""
        self.process.terminate()
        self.process.wait(timeout=30)


def start(upstream: UpstreamProcess, wrapper: str, *, code: Path | None = None, prefix: str) -> Wrapped:
    """Start `code`'s service (this checkout's when None) under `wrapper`, in front of `upstream`."""
    root, key_file, token = build_project(upstream.base_url)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "wrapper.py").write_text(wrapper)
    out = work / "out.json"
    port = _free_port()
    env = {
        **os.environ,
        "SOPS_AGE_KEY_FILE": str(key_file),
        "SWITCHBOARD_LOG_LEVEL": "WARNING",
        "SWITCHBOARD_USAGE_DB": str(work / "usage.db"),
        "SWITCHBOARD_USAGE_SPOOL": str(work / "usage-spool"),
        "PYTHONPATH": str(code or Path.cwd()),  # the wrapper's folder is first on its path, not a checkout
        "BENCH_WRAPPED_OUT": str(out),
    }
    command = [
        sys.executable, str(work / "wrapper.py"), "--root", str(root), "serve", "--port", str(port),
        "--events", str(work / "events.jsonl"),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=code, stdout=subprocess.DEVNULL)
    return Wrapped(process, f"http://127.0.0.1:{port}", token, work, out)


async def until_ready(service: Wrapped, name: str, timeout_s: float = 120.0) -> None:
    """Wait until the service's `/readyz` says 200; RuntimeError past `timeout_s`."""
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        while True:
            try:
                async with session.get(f"{service.url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"{name}: the service did not become ready in {timeout_s:g} s")
            await asyncio.sleep(0.2)

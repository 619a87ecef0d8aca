"""The fake upstream (`tests.support.upstreams`) in its own process, apart from the load."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class UpstreamProcess:
    """``python -m tests.support.upstreams`` on a free loopback port, as an async context manager."""

    name: str = "upstream"
    api_key: str = "sk-upstream"
    latency_ms: float = 0.0
    protocol: str = "openai"
    url: str = field(default="", init=False)
    """The server root, known once started."""
    _process: asyncio.subprocess.Process | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        """The root plus ``/v1``."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        """Its process's id, once started."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> UpstreamProcess:
        """Start it and wait for its ``listening on URL`` line."""
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.upstreams", "--port", "0", "--protocol", self.protocol,
            "--name", self.name, "--api-key", self.api_key, "--latency-ms", str(self.latency_ms),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), 30)
        if not line.startswith(b"listening on "):
            await self.stop()
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        self.url = line.decode().removeprefix("listening on ").strip()
        return self

    async def stop(self) -> None:
        """Terminate it."""
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()
        self._process = None

    async def __aenter__(self) -> UpstreamProcess:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

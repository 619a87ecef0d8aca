"""LiteLLM's proxy as a benchmark contender: its own venv, a generated config, a managed process.

The proxy lives in ``bench/.litellm-venv`` (git-ignored), apart from the project's litellm,
so that ``litellm[proxy]``'s pins (fastapi, uvicorn, an older litellm...) cannot disturb
the service. `ensure_venv` creates it once from PyPI; `LiteLLMProxy` writes a config that
sends one model to a fake upstream, starts ``litellm --config``, and waits until it answers::

    ensure_venv()
    async with LiteLLMProxy(upstream_base_url="http://127.0.0.1:8001/v1") as proxy:
        ...  # POST proxy.chat_url with "Authorization: Bearer " + proxy.master_key

    python -m bench.litellm_proxy setup
    python -m bench.litellm_proxy serve --upstream http://127.0.0.1:8001/v1 --port 8002
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

VENV = Path(__file__).resolve().parent / ".litellm-venv"
REQUIREMENT = "litellm[proxy]"
_MARKER = ".switchboard-bench-installed"

# Every variable here keeps the proxy off the network and away from any database.
PROXY_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else it fetches the cost map from GitHub at import
    "LITELLM_MODE": "PRODUCTION",  # else it loads a .env found above its install folder
    "LITELLM_TELEMETRY": "False",
    "DISABLE_ADMIN_UI": "True",
    "LITELLM_LOG": "ERROR",
    "NO_DOCS": "True",
}
_UNSET = ("DATABASE_URL", "DIRECT_URL", "DATABASE_HOST", "REDIS_HOST", "REDIS_URL")


def ensure_venv(path: Path = VENV, requirement: str = REQUIREMENT) -> Path:
    """Create the venv and install `requirement` unless done before; return its ``litellm``."""
    litellm = path / "bin" / "litellm"
    marker = path / _MARKER
    if litellm.exists() and marker.exists() and marker.read_text() == requirement:
        return litellm
    if not (path / "bin" / "python").exists():
        venv.create(path, with_pip=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, requirement], check=True)
    marker.write_text(requirement)
    return litellm


def write_config(
    path: Path, *, upstream_base_url: str, model: str, upstream_key: str, master_key: str
) -> Path:
    """Write a proxy config sending `model` to an OpenAI-compatible upstream, and return `path`."""
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": upstream_base_url,
                    "api_key": upstream_key,
                },
            }
        ],
        # No retries: a benchmark must see one upstream request per client request.
        "litellm_settings": {"telemetry": False, "num_retries": 0, "callbacks": [], "request_timeout": 60},
        "general_settings": {"master_key": master_key, "disable_spend_logs": True},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(slots=True)
class LiteLLMProxy:
    """A running ``litellm --config`` process on 127.0.0.1, as an async context manager."""

    upstream_base_url: str
    model: str = "fake-model"
    upstream_key: str = "sk-upstream"
    master_key: str = "sk-litellm-master"
    port: int = 0
    workers: int = 1
    ready_timeout_s: float = 120.0
    log_path: Path | None = None
    """Where the proxy's output goes; a temporary file when None."""
    config_path: Path | None = None
    """A config file to start from as it is (`switchboard export litellm`'s); one sending
    `model` to the upstream is written when None."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables the config reads (`os.environ/...`), added to the proxy's environment."""
    _process: asyncio.subprocess.Process | None = field(default=None, init=False)
    _workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        """The proxy root."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def chat_url(self) -> str:
        """Its chat completions endpoint."""
        return f"{self.url}/v1/chat/completions"

    @property
    def pid(self) -> int | None:
        """The proxy's process id, once started (with one worker, the one that serves)."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> LiteLLMProxy:
        """Start the proxy and wait until its liveness endpoint answers."""
        litellm = VENV / "bin" / "litellm"
        if not litellm.exists():
            raise RuntimeError(f"{litellm} is missing: run `python -m bench.litellm_proxy setup` first")
        if self.port == 0:
            self.port = _free_port()
        self._workdir = tempfile.TemporaryDirectory(prefix="litellm-bench-")
        workdir = Path(self._workdir.name)
        config = self.config_path or write_config(
            workdir / "config.yaml",
            upstream_base_url=self.upstream_base_url,
            model=self.model,
            upstream_key=self.upstream_key,
            master_key=self.master_key,
        )
        self.log_path = self.log_path or workdir / "proxy.log"
        env = {k: v for k, v in os.environ.items() if k not in _UNSET} | PROXY_ENV | self.env
        args = ["--config", str(config), "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                str(litellm), *args, "--num_workers", str(self.workers),
                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        await self._wait_ready()
        return self

    async def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                if self._process.returncode is not None:
                    raise RuntimeError(f"litellm exited with {self._process.returncode}:\n{self.log_tail()}")
                try:
                    async with session.get(f"{self.url}/health/liveliness") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.25)
        await self.stop()
        raise TimeoutError(f"litellm not ready after {self.ready_timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The end of the proxy's output."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self) -> None:
        """Terminate the proxy (then kill it if it lingers) and remove its files."""
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        self._process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    async def __aenter__(self) -> LiteLLMProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main(argv: list[str] | None = None) -> None:
    """``setup``: create the venv. ``serve``: run a proxy in front of an upstream until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m bench.litellm_proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help=f"create {VENV} with {REQUIREMENT}")
    serve = sub.add_parser("serve", help="run the proxy in front of an upstream")
    serve.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:8001/v1")
    serve.add_argument("--port", type=int, default=4000)
    serve.add_argument("--model", default="fake-model")
    serve.add_argument("--upstream-key", default="sk-upstream")
    serve.add_argument("--master-key", default="sk-litellm-master")
    serve.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "setup":
        print(ensure_venv())
        return

    async def serve_forever() -> None:
        proxy = LiteLLMProxy(
            args.upstream,
            model=args.model,
            upstream_key=args.upstream_key,
            master_key=args.master_key,
            port=args.port,
            workers=args.workers,
        )
        async with proxy:
            print(f"litellm proxy ready on {proxy.url} (log: {proxy.log_path})", flush=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(serve_forever())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()

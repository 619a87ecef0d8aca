"""A real Switchboard for gateway tests: real encrypted files, a real server on port 0.

`project_files` writes provider, routing and clients files the way a user does (keys
encrypted by sops); `running` serves `create_app` on 127.0.0.1 with aiohttp's handler
cancellation (as `serve` runs it) and waits for `/readyz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from service.http.context import HEALTH_EVENTS
from tests.conftest import SopsProject, serve

CANARY = "sk-canary-5e1f0c9a7b3d2e4f6a8b"
"""A key that must never come back out: in no answer, log line, event or metric."""


def write_provider(project: SopsProject, provider_id: str, **fields: Any) -> Path:
    """Write `providers.d/<id>.yaml`; an `api_key` field is encrypted with sops."""
    doc: dict[str, Any] = {"kind": "api_key" if "provider" in fields else "ai_server", "id": provider_id}
    if doc["kind"] == "ai_server":
        doc["server_type"] = fields.pop("server_type", "vllm")
    doc.update({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()})
    path = project.providers / f"{provider_id}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    if "api_key" in doc:
        project.sops.encrypt_in_place(path)
    return path


def write_routing(project: SopsProject, **purposes: dict[str, Any] | str | list[str]) -> Path:
    """Write `routing.yaml`; a purpose given as an id or list of ids is its primary."""
    routes = {p: r if isinstance(r, dict) else {"primary": r} for p, r in purposes.items()}
    path = project.providers / "routing.yaml"
    path.write_text(yaml.safe_dump({"kind": "routing", "purposes": routes}, sort_keys=False))
    return path


def write_clients(project: SopsProject, clients: dict[str, tuple[str, Iterable[str]]]) -> Path:
    """Write `clients.yaml` from {name: (token, scopes)}."""
    path = project.providers / "clients.yaml"
    path.write_text(clients_text(clients))
    return path


def clients_text(clients: dict[str, tuple[str, Iterable[str]]]) -> str:
    """A `kind: clients` file's text from {name: (token, scopes)}."""
    entries = [
        {"name": name, "token_sha256": hashlib.sha256(token.encode()).hexdigest(), "scopes": list(scopes)}
        for name, (token, scopes) in clients.items()
    ]
    return yaml.safe_dump({"kind": "clients", "clients": entries}, sort_keys=False)


@dataclass
class Switchboard:
    """A running service and a client session to call it."""

    url: str
    app: web.Application
    project: SopsProject
    http: aiohttp.ClientSession
    events_file: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        lines = self.events_file.read_text().splitlines() if self.events_file.exists() else []
        events = [json.loads(line) for line in lines]
        return [e for e in events if event_type is None or e["type"] == event_type]

    async def chat(
        self, content: str = "hi", *, token: str | None = None, **body: Any
    ) -> aiohttp.ClientResponse:
        """POST a chat completion; the response is read (`await r.json()` / `r.text()` work after)."""
        payload = {"model": "fake-model", "messages": [{"role": "user", "content": content}], **body}
        return await self.post("/v1/chat/completions", payload, token=token)

    async def post(self, path: str, payload: Any, *, token: str | None = None) -> aiohttp.ClientResponse:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.post(self.url + path, json=payload, headers=headers) as response:
            await response.read()
            return response

    async def get(self, path: str, *, token: str | None = None) -> aiohttp.ClientResponse:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.get(self.url + path, headers=headers) as response:
            await response.read()
            return response

    async def recorded(self) -> None:
        """Wait until the health events queued so far are in the log."""
        await asyncio.wait_for(self.app[HEALTH_EVENTS].join(), timeout=5)

    async def metrics(self) -> str:
        return await (await self.get("/metrics")).text()

    async def wait_for_generation(self, generation: int, timeout: float = 10) -> None:
        """Wait until the service applied a configuration of at least `generation`."""
        async with asyncio.timeout(timeout):
            while True:
                response = await self.get("/readyz")
                if response.status == 200 and (await response.json())["generation"] >= generation:
                    return
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(project: SopsProject, **settings: Any) -> AsyncIterator[Switchboard]:
    """Serve the project until the block ends (health checks off unless asked for)."""
    async with serve(project, **settings) as service:
        yield Switchboard(service.url, service.app, project, service.http, service.events_file)

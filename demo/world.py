"""The demo's world: the example configuration made servable on a fresh clone.

The examples in `providers.d/` are encrypted to a recipient whose identity was thrown away,
so the demo makes its own world in a folder (`.demo/` by default, git-ignored):

1. a throwaway age identity (`age/keys.txt`) and a `.sops.yaml` naming it;
2. one local stand-in upstream per example provider, speaking its protocol (OpenAI's,
   Anthropic's, or TEI's for a TEI server), so every provider's health check passes;
3. a copy of every example with its `base_url` pointed at its stand-in and its key replaced
   by a demo key, encrypted with sops to the throwaway identity, committed to a git
   repository so that events carry a commit and an author;
4. Switchboard serving that copy, watching its `providers.d/`.

`python -m demo` serves it until stopped; `python -m demo.screenshots` photographs the web
console on it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from service import console
from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops
from service.http.app import create_app
from service.settings import Settings
from tests.support.upstreams import FakeUpstream, Protocol

REPO = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("SWITCHBOARD_DEMO_DIR", REPO / ".demo")).resolve()


def _identity(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "age" / "keys.txt"
    if not key_file.exists():
        write_identity(key_file)
    recipient = next(
        line.split(": ", 1)[1] for line in key_file.read_text().splitlines() if "public key" in line
    )
    add_recipient(folder / ".sops.yaml", recipient)
    return key_file


async def _stand_ins(examples: dict[str, dict[str, Any]]) -> dict[str, FakeUpstream]:
    ups = {}
    for provider_id, doc in examples.items():
        models = tuple(str(m) for m in doc.get("models") or [])
        models += tuple(str(m) for m in (doc.get("model_map") or {}).values())
        up = FakeUpstream(
            protocol=_protocol(doc),
            name=provider_id,
            models=tuple(dict.fromkeys(models)) or ("demo-model",),
        )
        ups[provider_id] = await up.start()
    return ups


def _protocol(doc: dict[str, Any]) -> Protocol:
    """What the stand-in of an example speaks: Anthropic's protocol for an Anthropic key, TEI's
    own for a TEI server (its health check asks TEI's `/info`), OpenAI's for the rest."""
    if doc.get("provider") == "anthropic":
        return "anthropic"
    if doc.get("server_type") == "tei":
        return "tei"
    return "openai"


_PRICED: dict[str, dict[str, Any]] = {
    "local-vllm": {
        "pricing": {"*": {"input": "0.20", "output": "0.60"}},
        "budget": {"usd": "25", "period": "month"},
    },
    "openrouter-default": {
        "pricing": {"*": {"input": "0.50", "output": "1.50", "cached_input": "0.25"}},
        "budget": {"usd": "100", "period": "month"},
    },
    "anthropic-main": {"pricing": {"*": {"input": "3.00", "output": "15.00"}}},
    "local-tei": {"pricing": {"*": {"input": "0.02"}}},
}
"""The demo is priced (USD per million tokens), so its Usage page has costs and budgets to show."""


def _write_providers(
    root: Path, examples: dict[str, dict[str, Any]], ups: dict[str, FakeUpstream], sops: Sops
) -> None:
    folder = root / "providers.d"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for provider_id, doc in examples.items():
        up = ups[provider_id]
        doc = dict(doc)
        doc["base_url"] = up.url if up.protocol == "anthropic" else up.base_url
        if doc["kind"] == "api_key":
            key = f"demo-{provider_id}-{secrets.token_hex(8)}"
            doc["api_key"] = key
            up.api_key = key  # the stand-in accepts only the key the gateway decrypts
        doc.update(_PRICED.get(provider_id, {}))
        path = folder / f"{provider_id}.yaml"
        modeline = f"# yaml-language-server: $schema=../../schemas/{doc['kind']}.schema.json\n"
        path.write_text(modeline + yaml.safe_dump(doc, sort_keys=False))
        if "api_key" in doc:
            sops.encrypt_in_place(path)
    shutil.copy(REPO / "providers.d" / "routing.yaml", folder / "routing.yaml")


def _commit(folder: Path) -> None:
    git = ["git", "-c", "user.name=Switchboard Demo", "-c", "user.email=demo@switchboard.invalid"]
    if not (folder / ".git").exists():
        subprocess.run([*git, "init", "-q", "-b", "main"], cwd=folder, check=True)
        (folder / ".gitignore").write_text("age/\nvar/\n")
    subprocess.run([*git, "add", "-A"], cwd=folder, check=True)
    subprocess.run(
        [*git, "commit", "-q", "--allow-empty", "-m", "demo configuration"], cwd=folder, check=True
    )


def _examples() -> dict[str, dict[str, Any]]:
    examples = {}
    for path in sorted((REPO / "providers.d").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") in ("ai_server", "api_key"):
            doc.pop("sops", None)
            examples[doc["id"]] = doc
    return examples


@dataclass
class World:
    """The demo running: its settings, its URL and the stand-in upstreams."""

    settings: Settings
    url: str
    upstreams: dict[str, FakeUpstream]


@contextlib.asynccontextmanager
async def world(port: int, folder: Path = DEMO) -> AsyncIterator[World]:
    """Make the demo's world in `folder` (identity, stand-ins, committed files); serve it on `port`."""
    key_file = _identity(folder)
    examples = _examples()
    ups = await _stand_ins(examples)
    try:
        sops = Sops(age_key_file=key_file, project_root=folder)
        _write_providers(folder, examples, ups, sops)
        _commit(folder)
        settings = Settings(root=folder, providers=Path("providers.d"), age_key_file=key_file, port=port)
        runner = web.AppRunner(create_app(settings, pages=(console,)), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.host, port).start()
            port = runner.addresses[0][1]
            yield World(settings, f"http://{settings.host}:{port}", ups)
        finally:
            await runner.cleanup()
    finally:
        for up in ups.values():
            await up.close()

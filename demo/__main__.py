"""`python -m demo` (`just demo`): serve the example configuration on a fresh clone.

The examples in `providers.d/` are encrypted to a recipient whose identity was thrown away,
so the demo makes its own world in `.demo/` (git-ignored):

1. a throwaway age identity (`.demo/age/keys.txt`) and a `.demo/.sops.yaml` naming it;
2. one local stand-in upstream per example provider (OpenAI's protocol, or Anthropic's);
3. a copy of every example with its `base_url` pointed at its stand-in and its key replaced
   by a demo key, encrypted with sops to the throwaway identity, committed to a git
   repository so that events carry a commit and an author;
4. Switchboard serving that copy on http://127.0.0.1:8080 (SWITCHBOARD_PORT to change it),
   watching `.demo/providers.d/`: edit a file there and see it reload.

SWITCHBOARD_DEMO_DIR puts the demo's world elsewhere than `.demo/` (the tests use it).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from service.crypto.keys import add_recipient, write_identity
from service.crypto.sops import Sops
from service.http.app import create_app
from service.settings import Settings
from tests.support.upstreams import FakeUpstream

REPO = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("SWITCHBOARD_DEMO_DIR", REPO / ".demo")).resolve()


def _identity() -> Path:
    key_file = DEMO / "age" / "keys.txt"
    if not key_file.exists():
        write_identity(key_file)
    recipient = next(
        line.split(": ", 1)[1] for line in key_file.read_text().splitlines() if "public key" in line
    )
    add_recipient(DEMO / ".sops.yaml", recipient)
    return key_file


async def _stand_ins(examples: dict[str, dict[str, Any]]) -> dict[str, FakeUpstream]:
    ups = {}
    for provider_id, doc in examples.items():
        models = tuple(str(m) for m in doc.get("models") or [])
        models += tuple(str(m) for m in (doc.get("model_map") or {}).values())
        anthropic = doc.get("provider") == "anthropic"
        up = FakeUpstream(
            protocol="anthropic" if anthropic else "openai",
            name=provider_id,
            models=tuple(dict.fromkeys(models)) or ("demo-model",),
        )
        ups[provider_id] = await up.start()
    return ups


def _write_providers(examples: dict[str, dict[str, Any]], ups: dict[str, FakeUpstream], sops: Sops) -> None:
    folder = DEMO / "providers.d"
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
        path = folder / f"{provider_id}.yaml"
        modeline = f"# yaml-language-server: $schema=../../schemas/{doc['kind']}.schema.json\n"
        path.write_text(modeline + yaml.safe_dump(doc, sort_keys=False))
        if "api_key" in doc:
            sops.encrypt_in_place(path)
    shutil.copy(REPO / "providers.d" / "routing.yaml", folder / "routing.yaml")


def _commit() -> None:
    git = ["git", "-c", "user.name=Switchboard Demo", "-c", "user.email=demo@switchboard.invalid"]
    if not (DEMO / ".git").exists():
        subprocess.run([*git, "init", "-q", "-b", "main"], cwd=DEMO, check=True)
        (DEMO / ".gitignore").write_text("age/\nvar/\n")
    subprocess.run([*git, "add", "-A"], cwd=DEMO, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "demo configuration"], cwd=DEMO, check=True)


async def main() -> None:
    DEMO.mkdir(exist_ok=True)
    key_file = _identity()
    examples = {}
    for path in sorted((REPO / "providers.d").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") in ("ai_server", "api_key"):
            doc.pop("sops", None)
            examples[doc["id"]] = doc
    ups = await _stand_ins(examples)
    sops = Sops(age_key_file=key_file, project_root=DEMO)
    _write_providers(examples, ups, sops)
    _commit()
    port = int(os.environ.get("SWITCHBOARD_PORT", "8080"))
    settings = Settings(root=DEMO, providers=Path("providers.d"), age_key_file=key_file, port=port)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, port).start()
    base = f"http://{settings.host}:{port}"
    print(f"Switchboard demo: serving {DEMO / 'providers.d'} on {base}", flush=True)
    print(f"  curl {base}/readyz", flush=True)
    print(f"  curl {base}/api/v1/llm-config/active/chat", flush=True)
    print(
        f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
        """-d '{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hello"}]}'""",
        flush=True,
    )
    print("Press Ctrl+C to stop.", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        for up in ups.values():
            await up.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

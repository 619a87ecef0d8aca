"""Tracing off (the default) costs nothing (docs/reference.md §14): in a process of its own, a service that
relays requests, streams and a client's `traceparent` imports nothing while it serves, has
loaded none of Switchboard's tracing nor OpenTelemetry's tracer, propagator or exporters, and
sends no trace header upstream.

(redis-py 8 imports OpenTelemetry's metrics SDK on its own when it is installed, for its own
optional instrumentation, which nothing turns on: `service/runtime/fanout.py` imports redis
when the app is built. That is a one-time import at start, not on the request path.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

_SCRIPT = """
import asyncio, json, sys
from pathlib import Path

import aiohttp
from aiohttp import web

from service.http.app import create_app
at_start = set(sys.modules)
from service.settings import Settings
from tests.support.upstreams import FakeUpstream

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def main(root: Path) -> None:
    async with FakeUpstream(name="a") as up:
        providers = root / "providers.d"
        providers.mkdir()
        (providers / "a.yaml").write_text(
            f"kind: ai_server\\nid: a\\nserver_type: vllm\\nbase_url: {up.base_url}\\npurposes: [chat]\\n"
        )
        (providers / "routing.yaml").write_text("kind: routing\\npurposes:\\n  chat:\\n    primary: a\\n")
        settings = Settings(
            root=root, providers=providers, events=root / "events.jsonl", port=0, health_interval_s=0
        )
        runner = web.AppRunner(create_app(settings))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        statuses = []
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                async with http.get(url + "/readyz") as ready:
                    if ready.status == 200:
                        break
                await asyncio.sleep(0.05)
            said = [{"role": "user", "content": "hi"}]
            for path, body in (
                ("/v1/chat/completions", {"model": "m", "messages": said}),
                ("/v1/chat/completions", {"model": "m", "stream": True, "messages": said}),
                ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": said}),
                ("/v1/responses", {"model": "m", "input": "hi", "stream": True}),
            ):
                async with http.post(url + path, json=body, headers={"traceparent": TRACEPARENT}) as response:
                    await response.read()
                    statuses.append(response.status)
        await runner.cleanup()
        serving = sorted(set(sys.modules) - at_start - {"encodings.idna", "stringprep"})
        loaded = sorted(
            name
            for name in sys.modules
            if name.startswith(("service.gateway.tracing.", "opentelemetry.sdk.trace"))
            or name.startswith(("opentelemetry.exporter", "opentelemetry.trace.propagation.tracecontext"))
        )
        sent = [r.headers.get("traceparent") for r in up.requests if r.method == "POST"]
        print(json.dumps({"statuses": statuses, "loaded": loaded, "sent": sent, "serving": serving}))


asyncio.run(main(Path(sys.argv[1])))
"""


def test_off_loads_nothing_of_opentelemetry_and_sends_no_trace_header(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWITCHBOARD_", "OTEL_", "SOPS_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [200, 200, 200, 200]
    assert result["loaded"] == [], result
    assert [m for m in result["serving"] if "opentelemetry" in m or "tracing" in m] == []
    assert result["sent"] == [None, None, None, None]

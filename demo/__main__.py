"""`python -m demo` (`just demo`): serve the example configuration on a fresh clone.

The demo makes its own world in `.demo/` (git-ignored; `demo/world.py` says what is in it)
and serves it on http://127.0.0.1:8080 (SWITCHBOARD_PORT to change it), watching
`.demo/providers.d/`: edit a file there and see it reload (the web console at
http://127.0.0.1:8080/ui/ shows it live).

SWITCHBOARD_DEMO_DIR puts the demo's world elsewhere than `.demo/` (the tests use it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from demo.world import DEMO, world


async def main() -> None:
    port = int(os.environ.get("SWITCHBOARD_PORT", "8080"))
    async with world(port) as demo:
        base = demo.url
        print(f"Switchboard demo: serving {DEMO / 'providers.d'} on {base}", flush=True)
        print(f"  the web console: {base}/ui/", flush=True)
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
        await stop.wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

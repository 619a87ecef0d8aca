"""Benchmark of change push (issue 11): a file saved -> held queries answered, events delivered.

    python -m bench.push                          # 1,000 held queries, 100 streams, 20 saves
    python -m bench.push --held 200 --streams 20 --saves 10

`switchboard serve` runs in its own process on a folder with one server routed for chat
(no key, so no sops in the measure: what is timed is the watcher, the registry and the push).
This process holds `--held` blocking queries (`GET …/active/chat?index=N&wait=60s`) and
`--streams` event streams open, then saves the server's file `--saves` times (a temporary
file renamed over it, as editors and git do), one save at a time, and measures from each
save to:

- (a) each held query answered with the new index (it is then held again at that index);
- (b) each stream delivering the save's event.

It reports p50/p99 over every answer and every delivery, and the service's RSS before and
with everything held (its growth divided by the number held: the memory of one). The load
and the service share the machine's two cores, so the numbers include answering 1,100
clients one after another on one event loop. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from bench.config import CACHE, _free_port
from bench.load import percentile

API = "/api/v1/llm-config"


def _server(port: int) -> str:
    return f"kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: http://127.0.0.1:{port}/v1\n"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _save(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--saves", type=int, default=20)
    args = parser.parse_args(argv)
    root = CACHE / "push"
    shutil.rmtree(root, ignore_errors=True)
    (root / "providers.d").mkdir(parents=True)
    target = root / "providers.d" / "gpu.yaml"
    target.write_text(_server(9))
    routing = "kind: routing\npurposes:\n  chat:\n    primary: gpu\n"
    (root / "providers.d" / "routing.yaml").write_text(routing)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SWITCHBOARD_LOG_LEVEL": "WARNING",
        "SWITCHBOARD_HEALTH_INTERVAL_S": "0",
        "SWITCHBOARD_MAX_WATCHERS": str(args.held + args.streams + 10),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--root", str(root), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    saved: dict[int, float] = {}
    """index the save produced -> when the file was saved."""
    query_lag: list[float] = []
    stream_lag: list[float] = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            for _ in range(600):
                try:
                    async with http.get(f"{url}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            async with http.get(f"{url}{API}/active/chat") as response:
                index = int(response.headers["X-Switchboard-Index"])
            before = _rss_kb(process.pid)
            started = asyncio.Event()
            held = 0

            host = f"127.0.0.1:{port}"

            async def hold(index: int) -> None:
                # A bare HTTP/1.1 keep-alive client, as wrk would be: the load generator shares the
                # two cores with the service, and aiohttp's client would cost more than what it times.
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    while True:
                        path = f"{API}/active/chat?index={index}&wait=60s"
                        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                        head = await reader.readuntil(b"\r\n\r\n")
                        arrived = time.perf_counter()
                        fields = dict(
                            line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
                        )
                        await reader.readexactly(int(fields["Content-Length"]))
                        new = int(fields["X-Switchboard-Index"])
                        if new in saved:
                            query_lag.append(arrived - saved[new])
                        index = new
                finally:
                    writer.close()

            async def stream() -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET {API}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                try:
                    while line := await reader.readline():
                        if line.startswith(b"id: "):
                            arrived = time.perf_counter()
                            seq = int(line[4:])
                            if seq in saved:
                                stream_lag.append(arrived - saved[seq])
                finally:
                    writer.close()

            tasks = [asyncio.create_task(hold(index)) for _ in range(args.held)]
            tasks += [asyncio.create_task(stream()) for _ in range(args.streams)]
            expected = args.held + args.streams
            await asyncio.sleep(2)  # every request sent and held
            with_held = _rss_kb(process.pid)
            started.set()
            for number in range(args.saves):
                answered = len(query_lag) + len(stream_lag)
                t0 = time.perf_counter()
                _save(target, _server(10_000 + number))
                index += 1  # one provider.updated per save
                saved[index] = t0
                deadline = time.perf_counter() + 10
                while len(query_lag) + len(stream_lag) < answered + expected:
                    if time.perf_counter() > deadline:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # everyone held again before the next save
            held = len(tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        process.terminate()
        process.wait()
    per_held = (with_held - before) / max(held, 1)
    q = [x * 1000 for x in query_lag]
    s = [x * 1000 for x in stream_lag]
    print(f"| measure ({args.held} held queries, {args.streams} streams, {args.saves} saves) | value |")
    print("|---|---:|")
    print(f"| file saved -> held query answered, p50 | {percentile(q, 50):.0f} ms |")
    print(f"| file saved -> held query answered, p99 | {percentile(q, 99):.0f} ms |")
    print(f"| file saved -> event on a stream, p50 | {percentile(s, 50):.0f} ms |")
    print(f"| file saved -> event on a stream, p99 | {percentile(s, 99):.0f} ms |")
    everyone = args.saves * (args.held + args.streams)
    print(f"| answers and deliveries measured | {len(q)} + {len(s)} of {everyone} |")
    print(f"| service RSS before / with all held | {before / 1024:.1f} / {with_held / 1024:.1f} MB |")
    print(f"| memory per held request | {per_held:.1f} KB |")


if __name__ == "__main__":
    asyncio.run(main())

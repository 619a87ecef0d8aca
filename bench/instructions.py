"""Instructions per relayed request, counted by valgrind's callgrind: a measure of the gateway's
own work that the machine's other load does not move (wall clock on a shared 2-core machine
moves by ±30% between runs; an instruction count by well under 1%).

    python -m bench.instructions                          # this checkout
    python -m bench.instructions --baseline ../base       # and another, one after the other
    python -m bench.instructions --requests 2000 --concurrency 8 --stream
    python -m bench.instructions --stream --chunk-interval 0.002   # each event in a read of its own

`switchboard serve` runs under `valgrind --tool=callgrind --instr-atstart=no` in front of the
fake upstream (its own process, not counted), metered as `bench.gateway` serves it (the ledger
on, a client with every limit, a priced provider with a budget). After a warm-up, counting is
turned on (`callgrind_control -i on`) for `--requests` chat completions at `--concurrency`,
then off; the count covers every thread of the service (the ledger's too) and is divided by
the requests. The service runs with `PYTHONHASHSEED=0` unless the environment sets another: with
a random seed the loop thread's count moves by ~0.7 % between runs, with a fixed one ~0.1 %.
`--chunk-interval S` makes the fake upstream pause S seconds between a stream's events, so that
each reaches the gateway in a read of its own: the count then holds the per-chunk work, which a
stream whose events all come in one read (the default) does not show.
Needs Debian's `valgrind`; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.config import Service
from bench.gateway import MODEL, UPSTREAM_KEY, build_project
from bench.load import run_load
from bench.upstream import UpstreamProcess


class Counted(Service):
    """`switchboard serve` under callgrind, counting only when told."""

    def __init__(self, root: Path, key_file: Path, name: str, out: Path, code: Path | None = None) -> None:
        env = {
            "SWITCHBOARD_USAGE_DB": str(root / name / "usage.db"),
            "SWITCHBOARD_USAGE_SPOOL": str(root / name / "usage-spool"),
        }
        super().__init__(root, key_file, code=code, name=name, env=env)
        self.out = out

    async def start(self) -> float:
        shutil.rmtree(self.events.parent, ignore_errors=True)
        env = {**os.environ, "SOPS_AGE_KEY_FILE": str(self.key_file), "SWITCHBOARD_LOG_LEVEL": "WARNING"}
        env.setdefault(
            "PYTHONHASHSEED", "0"
        )  # a fixed hash seed: the count repeats within ~0.1 %, not ~0.7 %
        env |= self.env
        if self.code is not None:
            env["PYTHONPATH"] = str(self.code)
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={self.out}",
            sys.executable, "-m", "service", "--root", str(self.root), "serve", "--port", str(self.port),
            "--events", str(self.events),
        ]  # fmt: skip
        started = time.perf_counter()
        self.process = subprocess.Popen(
            command, env=env, cwd=self.code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        async with aiohttp.ClientSession() as session:
            while time.perf_counter() - started < 900:
                try:
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return time.perf_counter() - started
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("the service did not become ready under valgrind in 900 s")


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _totals(out: Path) -> tuple[int, int]:
    """The instructions counted in the dumps of `out`: (the main thread's, every thread's).

    With `--separate-threads=yes` each thread has its own file, `out.1-01` the main thread's
    (the event loop's), the others the ledger's and the worker threads'."""
    main = every = 0
    for path in out.parent.glob(out.name + ".*"):
        counted = sum(int(n) for n in re.findall(rb"^totals: (\d+)", path.read_bytes(), re.MULTILINE))
        every += counted
        if path.name.endswith("-01"):
            main += counted
    return main, every


async def count(
    upstream: UpstreamProcess, code: Path | None, name: str, requests: int, concurrency: int, stream: bool
) -> tuple[float, float]:
    """Instructions per request of `code`'s service (this checkout's when None): on the event
    loop's thread, and on every thread."""
    root, key_file, token = build_project(upstream.base_url)
    workdir = Path(tempfile.mkdtemp(prefix="callgrind-"))
    service = Counted(root, key_file, name, workdir / "callgrind.out", code)
    url = f"{service.url}/v1/chat/completions"
    try:
        await service.start()
        assert service.process is not None
        await run_load(url, token=token, model=MODEL, requests=200, concurrency=concurrency, stream=stream)
        _control(service.process.pid, "-z")  # zero what the warm-up counted
        _control(service.process.pid, "-i", "on")
        result = await run_load(
            url, token=token, model=MODEL, requests=requests, concurrency=concurrency, stream=stream, warmup=0
        )
        _control(service.process.pid, "-i", "off")
        _control(service.process.pid, "-d")
        if result.errors:
            raise RuntimeError(f"{result.errors} errors: {result.statuses}")
    finally:
        service.stop()
    await asyncio.sleep(1)
    main, every = _totals(workdir / "callgrind.out")
    return main / result.ok, every / result.ok


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT", help="count another checkout too")
    parser.add_argument(
        "--chunk-interval", type=float, default=0.0, metavar="S", help="the upstream's pause between events"
    )
    args = parser.parse_args(argv)
    async with UpstreamProcess(name="bench", api_key=UPSTREAM_KEY) as upstream:
        if args.chunk_interval:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{upstream.url}/_control", json={"chunk_interval_s": args.chunk_interval}
                ) as set_,
            ):
                set_.raise_for_status()
        counted = await count(upstream, None, "var", args.requests, args.concurrency, args.stream)
        counts = {"switchboard": counted}
        if args.baseline is not None:
            base = args.baseline.resolve()
            counts["switchboard@base"] = await count(
                upstream, base, "var-base", args.requests, args.concurrency, args.stream
            )
    kind = "stream" if args.stream else "chat completion"
    if args.stream and args.chunk_interval:
        kind += f", its events {args.chunk_interval:g} s apart"
    print(f"instructions per {kind} ({args.requests} at c={args.concurrency}):")
    print(f"  {'':<17} {'loop thread':>12} {'all threads':>12}")
    for name, (main, every) in counts.items():
        print(f"  {name:<17} {main:>12,.0f} {every:>12,.0f}")
    if "switchboard@base" in counts:
        (main, every), (base_main, base_every) = counts["switchboard"], counts["switchboard@base"]
        print(f"  ratio             {main / base_main:>12.3f} {every / base_every:>12.3f}")


if __name__ == "__main__":
    asyncio.run(main())

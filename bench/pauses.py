"""How long CPython's cyclic collector stops `switchboard serve` under load (issue 22).

    python -m bench.pauses                              # this checkout
    python -m bench.pauses --baseline ../base           # and another, one after the other
    python -m bench.pauses --requests 20000 --concurrency 1

`switchboard serve`, metered as `bench.gateway` serves it, in front of the fake upstream: a
wrapper script (on the service's path, ahead of its code) notes every collection with
`gc.callbacks` (its generation, when, how long), and writes them at exit. After the first
configuration is loaded and a settling pause, `--requests` chat completions are sent at
`--concurrency`; reported: per generation, the collections during the load, the longest and
their sum. A collection holds the GIL: every request in flight waits for it. A full
(generation 2) collection walks every object the collector tracks, frozen ones aside
(`gc.freeze`, which `serve` does once the first configuration is loaded). Wall clock: the
durations are meaningful on a quiet machine; the counts are not moved by its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench import wrapped
from bench.gateway import MODEL, UPSTREAM_KEY
from bench.load import run_load
from bench.upstream import UpstreamProcess

WRAPPER = """\
import atexit, gc, json, os, runpy, sys, time

_seen, _start = [], [0.0]


def _note(phase, info):
    if phase == "start":
        _start[0] = time.perf_counter()
    else:
        _seen.append((time.time(), info["generation"], time.perf_counter() - _start[0]))


def _write():
    with open(os.environ["BENCH_WRAPPED_OUT"], "w") as out:
        json.dump(_seen, out)


gc.callbacks.append(_note)
atexit.register(_write)
sys.argv = ["service", *sys.argv[1:]]
runpy.run_module("service", run_name="__main__", alter_sys=True)
"""


async def pauses(
    upstream: UpstreamProcess, code: Path | None, name: str, requests: int, concurrency: int, settle_s: float
) -> dict[int, list[float]]:
    """The collections of `code`'s service (this checkout's when None) during the load, by
    generation: their durations in seconds."""
    service = wrapped.start(upstream, WRAPPER, code=code, prefix="pauses-")
    try:
        await wrapped.until_ready(service, name)
        await asyncio.sleep(settle_s)
        began = time.time()
        result = await run_load(
            f"{service.url}/v1/chat/completions",
            token=service.token,
            model=MODEL,
            requests=requests,
            concurrency=concurrency,
        )
        ended = time.time()
        if result.errors:
            raise RuntimeError(f"{name}: {result.errors} errors: {result.statuses}")
    finally:
        service.stop()
    found: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for at, generation, seconds in json.loads(service.out.read_text()):
        if began <= at <= ended:
            found[generation].append(seconds)
    return found


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between ready and the load")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT", help="measure another checkout too")
    args = parser.parse_args(argv)
    async with UpstreamProcess(name="bench", api_key=UPSTREAM_KEY) as upstream:
        runs = {
            "switchboard": await pauses(
                upstream, None, "switchboard", args.requests, args.concurrency, args.settle
            )
        }
        if args.baseline is not None:
            runs["switchboard@base"] = await pauses(
                upstream, args.baseline.resolve(), "base", args.requests, args.concurrency, args.settle
            )
    print(f"collections during {args.requests} chat completions at c={args.concurrency}:")
    print(f"  {'':<18}{'gen':>4}{'count':>7}{'longest ms':>12}{'sum ms':>9}")
    for name, found in runs.items():
        for generation, seconds in found.items():
            longest = max(seconds, default=0.0) * 1000
            print(f"  {name:<18}{generation:>4}{len(seconds):>7}{longest:>12.2f}{sum(seconds) * 1000:>9.1f}")


if __name__ == "__main__":
    asyncio.run(main())

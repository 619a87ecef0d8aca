"""An async load generator for OpenAI-style chat completions, bounded and loopback-only.

`run_load` sends ``POST`` chat completions with a bearer token from `concurrency` workers
sharing one keep-alive connection pool, until a request count or a duration is reached,
and reports latency percentiles, requests/s and, for streams, time to first byte::

    result = await run_load("http://127.0.0.1:8001/v1/chat/completions", token="sk", concurrency=64)

    python -m bench.load http://127.0.0.1:8001/v1/chat/completions --token sk -c 64 -n 3000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

MAX_CONCURRENCY = 1024
MAX_REQUESTS = 1_000_000
MAX_DURATION_S = 600.0


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one run measured; latencies in milliseconds, over successful requests only."""

    url: str
    concurrency: int
    stream: bool
    ok: int
    errors: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float | None
    ttfb_p99_ms: float | None
    statuses: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One human line."""
        line = (
            f"c={self.concurrency:<3} ok={self.ok} err={self.errors} rps={self.rps:8.1f} "
            f"p50={self.p50_ms:7.2f}ms p99={self.p99_ms:7.2f}ms"
        )
        if self.ttfb_p50_ms is not None:
            line += f" ttfb_p50={self.ttfb_p50_ms:7.2f}ms ttfb_p99={self.ttfb_p99_ms:7.2f}ms"
        return line


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100) of `values`; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def check_loopback(url: str) -> None:
    """Refuse any target but 127.0.0.1: this tool must never load a real service."""
    host = urlsplit(url).hostname
    if host != "127.0.0.1":
        raise ValueError(f"load targets must be on 127.0.0.1, not {host!r}")


def chat_body(model: str, *, stream: bool, prompt: str = "Say hello in one sentence.") -> dict[str, Any]:
    """A small chat completion request body."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def run_load(
    url: str,
    *,
    token: str,
    model: str = "fake-model",
    concurrency: int = 1,
    requests: int | None = 1000,
    duration_s: float | None = None,
    stream: bool = False,
    warmup: int = 20,
    timeout_s: float = 30.0,
    body: dict[str, Any] | None = None,
) -> LoadResult:
    """Send chat completions to `url` and measure them.

    Stops after `requests` requests or `duration_s` seconds, whichever comes first (one of
    them is required). `warmup` requests are sent first, sequentially, and not measured, so
    that connections are open and lazy imports done.
    """
    check_loopback(url)
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be within 1..{MAX_CONCURRENCY}")
    if requests is None and duration_s is None:
        raise ValueError("give a request count, a duration, or both")
    budget = min(requests if requests is not None else MAX_REQUESTS, MAX_REQUESTS)
    deadline_s = min(duration_s if duration_s is not None else MAX_DURATION_S, MAX_DURATION_S)
    payload = json.dumps(body or chat_body(model, stream=stream)).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    ttfbs: list[float] = []
    statuses: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        try:
            async with session.post(url, data=payload, headers=headers) as response:
                first = await response.content.readany()
                ttfb = time.perf_counter() - start
                while await response.content.readany():
                    pass
                key = str(response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            key = type(exc).__name__
        else:
            if response.status == 200 and first:
                latencies.append(time.perf_counter() - start)
                ttfbs.append(ttfb)
        statuses[key] = statuses.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(warmup):
            await one(session)
        latencies.clear()
        ttfbs.clear()
        statuses.clear()
        started = time.perf_counter()
        end = started + deadline_s
        remaining = budget

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 and time.perf_counter() < end:
                remaining -= 1
                await one(session)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started

    ms = [x * 1000 for x in latencies]
    ttfb_ms = [x * 1000 for x in ttfbs]
    return LoadResult(
        url=url,
        concurrency=concurrency,
        stream=stream,
        ok=len(ms),
        errors=sum(statuses.values()) - len(ms),
        duration_s=elapsed,
        rps=len(ms) / elapsed if elapsed else 0.0,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        ttfb_p50_ms=percentile(ttfb_ms, 50) if stream else None,
        ttfb_p99_ms=percentile(ttfb_ms, 99) if stream else None,
        statuses=statuses,
    )


def median_result(results: list[LoadResult]) -> dict[str, float]:
    """Medians over several runs of the same load, field by field."""
    fields = ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms")
    medians: dict[str, float] = {}
    for name in fields:
        values = [v for r in results if (v := getattr(r, name)) is not None]
        if values:
            medians[name] = statistics.median(values)
    return medians


def main(argv: list[str] | None = None) -> None:
    """Command line: run the load `--runs` times and print each run and the medians."""
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="full chat completions URL on 127.0.0.1")
    parser.add_argument("--token", required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=1000)
    parser.add_argument("-d", "--duration", type=float, default=None, help="seconds, at most")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead")
    args = parser.parse_args(argv)

    async def runs() -> list[LoadResult]:
        results = []
        for _ in range(args.runs):
            result = await run_load(
                args.url,
                token=args.token,
                model=args.model,
                concurrency=args.concurrency,
                requests=args.requests,
                duration_s=args.duration,
                stream=args.stream,
            )
            print(json.dumps(asdict(result)) if args.json else result.summary(), flush=True)
            results.append(result)
        return results

    results = asyncio.run(runs())
    if args.runs > 1:
        medians = median_result(results)
        print(json.dumps({"median": medians}) if args.json else f"median: {medians}")


if __name__ == "__main__":
    main()

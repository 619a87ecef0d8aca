"""Benchmark of tracing (issue 21): throughput with tracing on against off, and off against the code
before tracing, to show that off costs nothing.

    python -m bench.tracing                               # or: just bench
    python -m bench.tracing --runs 5 --seconds 3
    mkdir /tmp/base && git archive ef83f2a | tar -x -C /tmp/base   # the commit before tracing
    python -m bench.tracing --baseline /tmp/base

One fake OpenAI-protocol upstream (its own process), an OTLP sink (its own process: it takes
the exports and throws them away, as a collector's receiver would, answering at once), and
`switchboard serve` (each its own process) with one encrypted provider for the upstream:

- off: tracing off (the default);
- on: `SWITCHBOARD_OTEL_EXPORTER=otlp`, spans and metrics to the sink, every request sampled,
  batches as the SDK's defaults have them (5 s, 512 spans), metrics every 5 s;
- on@10%: the same, one trace in ten sampled (`OTEL_TRACES_SAMPLER=traceidratio`, `0.1`): the
  metrics are still recorded for every request;
- base (with `--baseline`): the same project served by another checkout, tracing off.

Each round sends, alternating between the services, chat completions at concurrency 1, 32
and 64 and a stream at concurrency 1; the table gives medians over rounds, and the ratios
of each round taken within it, then their median (the machine is shared: a round's
neighbours are what it is compared with). The run starts with what a traced request's spans
and metrics cost in process, which the noise of a shared machine does not blur. Only
127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.config import Service, _free_port
from bench.gateway import UPSTREAM_KEY, build_project
from bench.load import LoadResult, chat_body, run_load
from bench.upstream import UpstreamProcess

LOADS = [
    ("c1", {"concurrency": 1, "stream": False}),
    ("c32", {"concurrency": 32, "stream": False}),
    ("c64", {"concurrency": 64, "stream": False}),
    ("stream", {"concurrency": 1, "stream": True}),
]


# -- in process ----------------------------------------------------------------------------------


def span_costs(count: int = 20000) -> str:
    """What one traced request's spans and metrics cost: a request span, an attempt span, the
    `traceparent` it sends, two histograms, through the SDK's batch processor (to an exporter
    that drops what it gets)."""
    from aiohttp.test_utils import make_mocked_request
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from service.config.models import AiServer
    from service.gateway.call import Call
    from service.gateway.tracing.spans import Tracing

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=count * 2))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    tracing = Tracing(tracer_provider.get_tracer("bench"), meter_provider.get_meter("bench"))
    provider = AiServer.model_validate(
        {"kind": "ai_server", "id": "a", "server_type": "vllm", "base_url": "http://127.0.0.1:9/v1"}
        | {"purposes": ["chat"]}
    )
    answer = web.Response(body=b"{}")
    data = chat_body("fake-model", stream=False)

    def per_call_us(work: Any) -> float:
        batches = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(count // 5):
                work()
            batches.append((time.perf_counter() - started) / (count // 5) * 1e6)
        return statistics.median(batches)

    def call_of(request: Any) -> Call:
        call = Call(request, "chat", "/chat/completions", b"{}", data)
        call.usage, call.answer_model = {"prompt_tokens": 6, "completion_tokens": 7}, "fake-model"
        return call

    plain = make_mocked_request("POST", "/v1/chat/completions")
    untraced = per_call_us(lambda: call_of(plain))  # what the loop costs without tracing
    rows = [
        "| a client's traceparent | spans and metrics of one request (one attempt) |",
        "|---|---:|",
    ]
    for label, headers in (
        ("none", {}),
        ("continued", {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}),
    ):
        request = make_mocked_request("POST", "/v1/chat/completions", headers=headers)

        def traced(request: Any = request) -> None:
            with tracing.request(call_of(request)) as trace:
                trace.attempt(provider)
                trace.succeeded(answer)

        rows.append(f"| {label} | {per_call_us(traced) - untraced:.1f} µs |")
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return "\n".join(rows)


# -- the OTLP sink ---------------------------------------------------------------------------------


def sink(port: int) -> None:
    """Take OTLP/HTTP exports and drop them, answering at once (an empty protobuf answer)."""

    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", take)
    app.router.add_post("/v1/metrics", take)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class Sink:
    """The sink in its own process."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        command = [sys.executable, "-m", "bench.tracing", "sink", "--port", str(self.port)]
        self.process = subprocess.Popen(command)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


# -- end to end --------------------------------------------------------------------------------------


def cli(argv: list[str] | None = None) -> None:
    """`python -m bench.tracing [--runs N] [--seconds S] [--baseline DIR]`, or `sink --port P`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds; the table gives medians")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each load")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT", help="also serve this checkout, off")
    sub = parser.add_subparsers(dest="command")
    serve_sink = sub.add_parser("sink", help="run the OTLP sink (used by the bench itself)")
    serve_sink.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "sink":
        sink(args.port)
    else:
        asyncio.run(main(args))


async def main(args: argparse.Namespace) -> None:
    print(span_costs(), flush=True)

    upstream = await UpstreamProcess(name="bench", api_key=UPSTREAM_KEY).start()
    root, key_file, token = build_project(upstream.base_url)
    otlp = Sink().start()
    traced = {
        "SWITCHBOARD_OTEL_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}",
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",
    }
    sampled = {**traced, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    services = {
        "off": Service(root, key_file, name="var-off"),
        "on": Service(root, key_file, name="var-on", env=traced),
        "on@10%": Service(root, key_file, name="var-sampled", env=sampled),
    }
    if args.baseline is not None:
        services["base"] = Service(root, key_file, code=args.baseline.resolve(), name="var-base")
    results: dict[tuple[str, str], list[LoadResult]] = defaultdict(list)
    try:
        for service in services.values():
            await service.start()
        for run in range(args.runs):
            for load, options in LOADS:
                for name, service in services.items():
                    result = await run_load(
                        f"{service.url}/v1/chat/completions",
                        token=token,
                        requests=None,
                        duration_s=args.seconds,
                        warmup=50,
                        **options,
                    )
                    if result.errors:
                        print(f"  {name} {load}: {result.errors} errors {result.statuses}", file=sys.stderr)
                    results[(name, load)].append(result)
                    line = f"round {run + 1} {name:<6} {load:<7} {result.summary()}"
                    print(line, file=sys.stderr, flush=True)
    finally:
        for service in services.values():
            service.stop()
        otlp.stop()
        await upstream.stop()
    print()
    print(_table(results, list(services)))


def _median(results: list[LoadResult], field: str) -> float:
    return statistics.median(float(getattr(r, field) or 0.0) for r in results)


def _ratio(results: dict[tuple[str, str], list[LoadResult]], a: str, b: str, load: str, field: str) -> float:
    """The median over rounds of `a`'s `field` over `b`'s, each round's taken within it."""
    pairs = zip(results[(a, load)], results[(b, load)], strict=True)
    return statistics.median(float(getattr(x, field)) / float(getattr(y, field)) for x, y in pairs)


def _table(results: dict[tuple[str, str], list[LoadResult]], names: list[str]) -> str:
    rows = [
        "| tracing | c=1 req/s | c=1 p50 | c=32 req/s | c=64 req/s | c=64 p99 | stream TTFB p50 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        cells = [
            name,
            f"{_median(results[(name, 'c1')], 'rps'):,.0f}",
            f"{_median(results[(name, 'c1')], 'p50_ms'):.2f} ms",
            f"{_median(results[(name, 'c32')], 'rps'):,.0f}",
            f"{_median(results[(name, 'c64')], 'rps'):,.0f}",
            f"{_median(results[(name, 'c64')], 'p99_ms'):.1f} ms",
            f"{_median(results[(name, 'stream')], 'ttfb_p50_ms'):.2f} ms",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    rows += [
        "",
        "| ratio (median of each round's) | c=1 req/s | c=32 req/s | c=64 req/s |",
        "|---|---:|---:|---:|",
    ]
    pairs = [("on", "off"), ("on@10%", "off")] + ([("off", "base")] if "base" in names else [])
    for a, b in pairs:
        ratios = (f"{_ratio(results, a, b, load, 'rps'):.3f}" for load in ("c1", "c32", "c64"))
        cells = [f"{a} / {b}", *ratios]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    cli()

"""Where a request's time goes inside `switchboard serve`, one request at a time (issue 22).

    python -m bench.phases                      # 5,000 chat completions at c=1
    python -m bench.phases --requests 20000 --runs 3

`switchboard serve`, metered as `bench.gateway` serves it, in front of the fake upstream: a
wrapper script (on the service's path, ahead of its code) stamps each relayed request with
`time.perf_counter_ns` at seven points and writes the stamps at exit. The points wrap methods
by name (the gateway's own connections, `http/fast.py`, and aiohttp's server and writer, the
gateway's upstream client, its metering), so the wrapper follows this checkout's code, not
another's. Reported, after a warm-up, per phase: p50, p90 and p99 in µs, and the latency the
load generator saw, through Switchboard and straight to the upstream (medians over `--runs`):

- `in → upstream out`: the request's bytes read, parsed, authenticated, admitted, routed,
  and written to the upstream;
- `upstream out → its bytes in`: the upstream's own time and two loopback hops;
- `its bytes in → answer read`: the upstream's answer parsed and its waiter woken;
- `answer read → metering`: the answer made (`web.Response`), health and metrics;
- `metering`: priced, settled, recorded (`Metered.served`);
- `handler → write`: the answer and its head made into bytes (the fast path's, or aiohttp's);
- `write`: the system call that hands the answer to the client. It returns late when the
  client, woken by it, takes the core first: that time is the client's, not on its path.

The gateway's part of the client's latency is the sum of all but the second and the last.
The rest of what it adds is the two loopback hops more (client to gateway, gateway to upstream
and back), each a process woken on a core. To see that floor, the same run measures a relay
that only copies bytes (`RELAY`: uvloop, one upstream connection a client connection, no
parsing) between the load generator and the upstream: what any process in the path adds here.
Wall clock: meaningful on a quiet machine (at c=1 each request wakes a cold loop).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from bench import wrapped
from bench.config import _free_port
from bench.gateway import MODEL, UPSTREAM_KEY, _cpu_s
from bench.load import percentile, run_load
from bench.upstream import UpstreamProcess

WRAPPER = """\
import atexit, json, os, runpy, sys, time

_ns = time.perf_counter_ns
_arrived, _now, _rows = {}, {}, []


def _wrap(owner, name, before=None, after=None):
    inner = getattr(owner, name)

    def wrapped(self, *args, **kwargs):
        if before:
            before(self)
        result = inner(self, *args, **kwargs)
        if after:
            after(self)
        return result

    setattr(owner, name, wrapped)


def _wrap_async(owner, name, before=None, after=None):
    inner = getattr(owner, name)

    async def wrapped(self, *args, **kwargs):
        if before:
            before(self)
        result = await inner(self, *args, **kwargs)
        if after:
            after(self, args)
        return result

    setattr(owner, name, wrapped)


def _stamp(key):
    def note(*_):
        _now[key] = _ns()
    return note


def _out(_):
    _now["out"], _now["back"] = _ns(), 0


def _back(_):
    if not _now.get("back"):
        _now["back"] = _ns()


def _written(handler, args):
    request = args[0]
    if request.path.startswith("/v1/"):
        _rows.append([_arrived.get(id(handler), 0), *(_now.get(k, 0) for k in _KEYS), _ns()])


_KEYS = ("out", "back", "read", "metering", "metered", "handled", "write", "wrote")


def _went(connection, request, response):
    _now["wrote"] = _ns()  # its bytes were just handed to the transport (`_answer`, `write_eof`)
    _written(connection, (request,))


def _install():
    from aiohttp import http_writer, web_protocol
    from service.gateway import metering
    from service.gateway.transports import exchange, openai
    from service.http import fast, gateway

    def arrived(handler):
        _arrived[id(handler)] = _ns()

    # aiohttp's server: the requests the fast path hands it
    _wrap(web_protocol.RequestHandler, "data_received", before=arrived)
    _wrap_async(web_protocol.RequestHandler, "finish_response", after=_written)
    _wrap_async(gateway.Gateway, "handle", after=_stamp("handled"))
    # the gateway's own connections (`serve`'s fast path), where a relayed request goes
    _wrap(fast.FastConnection, "data_received", before=arrived)
    _wrap_async(gateway.Gateway, "relayed", after=_stamp("handled"))
    _wrap(fast.FastConnection, "_answer", before=_stamp("write"))
    went = fast.FastConnection._went

    def wrapped_went(self, request, response):
        _went(self, request, response)
        return went(self, request, response)

    fast.FastConnection._went = wrapped_went
    # both
    _wrap(exchange.Connection, "send", before=_out)
    _wrap(exchange.Connection, "data_received", before=_back)
    _wrap_async(openai.OpenAITransport, "exchange", after=_stamp("read"))
    _wrap_async(metering.Metered, "served", before=_stamp("metering"), after=_stamp("metered"))
    _wrap(http_writer.StreamWriter, "_writelines", before=_stamp("write"), after=_stamp("wrote"))


def _dump():
    with open(os.environ["BENCH_WRAPPED_OUT"], "w") as out:
        json.dump(_rows, out)


_install()
atexit.register(_dump)
sys.argv = ["service", *sys.argv[1:]]
runpy.run_module("service", run_name="__main__", alter_sys=True)
"""

RELAY = """\
import asyncio, sys

import uvloop

UP_HOST, UP_PORT, PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


class Side(asyncio.Protocol):
    def __init__(self, other=None):
        self.other, self.transport, self.pending = other, None, []

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(6, 1, 1)  # TCP_NODELAY
        if self.other is None:  # a client: open its upstream side
            asyncio.ensure_future(self.connect())
        else:
            self.other.other = self
            for data in self.other.pending:
                transport.write(data)

    async def connect(self):
        await asyncio.get_running_loop().create_connection(lambda: Side(self), UP_HOST, UP_PORT)

    def data_received(self, data):
        peer = self.other
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc):
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


async def main():
    server = await asyncio.get_running_loop().create_server(Side, "127.0.0.1", PORT)
    print("ready", flush=True)
    await server.serve_forever()


uvloop.run(main())
"""
"""A process that only copies bytes between a client and the upstream: the floor of a hop."""

PHASES = (
    ("in → upstream out", 0, 1),
    ("upstream out → its bytes in", 1, 2),
    ("its bytes in → answer read", 2, 3),
    ("answer read → metering", 3, 4),
    ("metering", 4, 5),
    ("handler → write", 6, 7),
    ("write", 7, 8),
)
"""A phase: its name, and the indexes of its first and last stamp in a row."""
OWN = (
    "in → upstream out",
    "its bytes in → answer read",
    "answer read → metering",
    "metering",
    "handler → write",
)


Run = tuple[list[list[int]], float, float, float, tuple[float, ...]]
"""A run: the stamps of each request; the p50 (ms) through Switchboard, direct, through the relay;
the service's CPU seconds a request: all its threads, its loop's, and the loop's in the kernel."""


async def measured(upstream: UpstreamProcess, requests: int) -> Run:
    """One run: the service's stamps a request, and the p50 the load generator saw through
    Switchboard, straight to the upstream and through the relay (ms)."""
    service = wrapped.start(upstream, WRAPPER, prefix="phases-")
    up = urlsplit(upstream.base_url)
    relay_port = _free_port()
    (service.work / "relay.py").write_text(RELAY)
    relay = subprocess.Popen(
        [
            sys.executable,
            str(service.work / "relay.py"),
            up.hostname or "127.0.0.1",
            str(up.port),
            str(relay_port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None
        if relay.stdout.readline().strip() != "ready":
            raise RuntimeError("the relay did not start")
        await wrapped.until_ready(service, "switchboard")
        cpu = _cpu_s(service.process.pid), *_thread_cpu_s(service.process.pid)
        switchboard = await run_load(
            f"{service.url}/v1/chat/completions",
            token=service.token,
            model=MODEL,
            requests=requests,
            concurrency=1,
        )
        now = _cpu_s(service.process.pid), *_thread_cpu_s(service.process.pid)
        used = tuple((b - a) / requests for a, b in zip(cpu, now, strict=True))
        direct = await run_load(
            f"{upstream.base_url}/chat/completions",
            token=UPSTREAM_KEY,
            model=MODEL,
            requests=requests,
            concurrency=1,
        )
        relayed = await run_load(
            up._replace(netloc=f"127.0.0.1:{relay_port}").geturl() + "/chat/completions",
            token=UPSTREAM_KEY,
            model=MODEL,
            requests=requests,
            concurrency=1,
        )
        if switchboard.errors or direct.errors or relayed.errors:
            raise RuntimeError(f"errors: {switchboard.statuses} {direct.statuses} {relayed.statuses}")
    finally:
        service.stop()
        relay.terminate()
        relay.wait(timeout=30)
    rows = [row for row in json.loads(service.out.read_text()) if all(row)]
    # the first fifth: a warm-up
    return rows[len(rows) // 5 :], switchboard.p50_ms, direct.p50_ms, relayed.p50_ms, used


def _thread_cpu_s(pid: int) -> tuple[float, float]:
    """The CPU seconds the main thread of process `pid` (its event loop's) has used so far, in
    all and in the kernel."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick


def table(runs: list[Run]) -> str:
    """The phases' p50/p90/p99 (µs), medians over the runs, and the latency seen from outside."""
    lines = [f"  {'phase':<30}{'p50 µs':>9}{'p90 µs':>9}{'p99 µs':>9}"]
    own = []
    for name, first, last in PHASES:
        cells = []
        for q in (50, 90, 99):
            cells.append(
                statistics.median(
                    percentile([(r[last] - r[first]) / 1000 for r in rows], q) for rows, *_ in runs
                )
            )
        if name in OWN:
            own.append(cells[0])
        lines.append(f"  {name:<30}" + "".join(f"{c:9.1f}" for c in cells))
    gaps = [
        statistics.median((b[0] - a[-1]) / 1000 for a, b in itertools.pairwise(rows)) for rows, *_ in runs
    ]
    lines.append(f"  {'answer written → next request in':<30}{statistics.median(gaps):9.1f}")
    through = statistics.median(r[1] for r in runs)
    direct = statistics.median(r[2] for r in runs)
    relayed = statistics.median(r[3] for r in runs)
    lines.append(
        f"  the gateway's own part (sum of p50s, the upstream and the write left out): {sum(own):.1f} µs"
    )
    lines.append(
        f"  seen by the load generator: p50 {through:.3f} ms through Switchboard, {direct:.3f} ms direct, "
        f"added {through - direct:+.3f} ms"
    )
    cpu = statistics.median(r[4][0] for r in runs) * 1e6
    loop = statistics.median(r[4][1] for r in runs) * 1e6
    kernel = statistics.median(r[4][2] for r in runs) * 1e6
    lines.append(
        f"  the service's CPU a request: {cpu:.0f} µs, of which its loop's thread {loop:.0f} µs "
        f"({kernel:.0f} µs in the kernel)"
    )
    lines.append(
        f"  a relay that only copies bytes: p50 {relayed:.3f} ms, added {relayed - direct:+.3f} ms "
        "(the floor of a process in the path here)"
    )
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    async with UpstreamProcess(name="bench", api_key=UPSTREAM_KEY) as upstream:
        runs = [await measured(upstream, args.requests) for _ in range(args.runs)]
    print(f"phases of a chat completion at c=1, {args.requests} requests x {args.runs} (medians):")
    print(table(runs))


if __name__ == "__main__":
    asyncio.run(main())

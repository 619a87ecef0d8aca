"""How long the usage ledger's thread keeps the event loop from running (issue 22).

    python -m bench.ledger_stall                      # in process: loop lag, ledger CPU a record
    python -m bench.ledger_stall --rate 3000 --seconds 10 --runs 5
    python -m bench.ledger_stall --switch-interval 0.001
    python -m bench.ledger_stall --serve --seconds 10 # `switchboard serve` at c=1: p50/p99/max

In process (the default): a real `Ledger` (SQLite in a temporary folder, its spool beside it,
started as the service starts it) and an asyncio loop that writes `--rate` records a second
(`encoding.fields`, as the gateway makes them) while a probe on the same loop sleeps 1 ms over
and over and notes how late it wakes. A late wake-up is time the loop thread could not run:
mostly the GIL held by the ledger's thread (CPython makes a waiting thread wait up to
`sys.getswitchinterval()` before it forces a switch). Reported: the probe's lateness (p50, p99,
p99.9, max; the same with the ledger off, for the floor), and the ledger thread's CPU time per
record (its `time.thread_time`, over every cycle). Medians over `--runs`.

`--serve`: `switchboard serve` metered as `bench.gateway` serves it, in front of the fake
upstream, one request at a time: the latency distribution (p50, p99, max), and the same of the
upstream direct; `--switch-interval` then sets the service's (a `sitecustomize` on its path).
Wall clock: meaningful only on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.load import percentile
from service.usage.encoding import fields
from service.usage.ledger import Ledger
from service.usage.stores import open_store


class _Timed(Ledger):
    """A ledger that adds up the CPU time its thread spends in cycles."""

    cpu_s = 0.0
    cycles = 0

    def _cycle(self, *, final: bool = False, purge: bool = True) -> None:
        if threading.current_thread().name != "switchboard-ledger":
            super()._cycle(final=final, purge=purge)
            return
        started = time.thread_time()
        super()._cycle(final=final, purge=purge)
        self.cpu_s += time.thread_time() - started
        self.cycles += 1


def _values(n: int) -> list[Any]:
    return fields(
        uuid.uuid4().hex,
        time.time_ns() // 1000,
        "bench-client",
        "chat",
        "fake-model",
        "upstream",
        "fake-model",
        200,
        False,
        1,
        round(1.234 + n % 7, 3),
        round(0.9 + n % 5, 3),
        120 + n % 13,
        0,
        0,
        40 + n % 11,
        0,
        (120 + n % 13) * 150_000_000_000 + (40 + n % 11) * 600_000_000_000,  # atto-dollars
        True,
        False,
        "bench",
        False,
    )


async def _probe(stop: float, lags: list[float], held: list[float], ledger: Ledger | None) -> None:
    """Sleep 1 ms over and over: how late each wake-up is, and how much of it the ledger's
    thread ran meanwhile (its CPU time in the window, at most the lateness: the part of the
    lateness it can be blamed for, whatever else the machine runs)."""
    clock = None
    if ledger is not None and ledger._thread is not None and ledger._thread.ident is not None:
        clock = time.pthread_getcpuclockid(ledger._thread.ident)
    while True:
        started = time.perf_counter()
        cpu = time.clock_gettime(clock) if clock is not None else 0.0
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        late = (now - started - 0.001) * 1000
        lags.append(late)
        if clock is not None:
            held.append(min(late, (time.clock_gettime(clock) - cpu) * 1000))
        if now >= stop:
            return


async def _busy(stop: float, done: list[int]) -> None:
    """Keep the loop busy as at concurrency 64: Python work in ~0.2 ms pieces, each a turn of
    the loop; `done` counts the pieces (the loop's throughput)."""
    while time.perf_counter() < stop:
        total = 0
        for i in range(4000):
            total += i
        done[0] += 1
        await asyncio.sleep(0)


async def _writer(ledger: Ledger | None, rate: float, stop: float) -> int:
    started = time.perf_counter()
    written = 0
    while (now := time.perf_counter()) < stop:
        due = int((now - started) * rate)
        while written < due:
            values = _values(written)
            if ledger is not None:
                ledger.write(values)
            written += 1
        await asyncio.sleep(0.0005)
    return written


async def run_once(rate: float, seconds: float, *, ledger_on: bool, busy: bool = False) -> dict[str, float]:
    """One run: the probe's lateness (ms) and, with the ledger on, its thread's µs a record."""
    with tempfile.TemporaryDirectory(prefix="ledger-stall-") as tmp:
        folder = Path(tmp)
        ledger = None
        if ledger_on:
            ledger = _Timed(open_store(str(folder / "usage.db"), folder), folder / "spool")
            await ledger.start()
        lags: list[float] = []
        held: list[float] = []
        stop = time.perf_counter() + seconds
        try:
            done = [0]
            tasks = [_writer(ledger, rate, stop), _probe(stop, lags, held, ledger)]
            written, *_ = await asyncio.gather(*tasks, *([_busy(stop, done)] if busy else []))
            if ledger is not None:
                await ledger.flush()
        finally:
            if ledger is not None:
                await ledger.stop()
        lags = lags[len(lags) // 20 :]  # the start (the ledger's first cycles) left out
        result = {
            "p50": percentile(lags, 50),
            "p99": percentile(lags, 99),
            "p99.9": percentile(lags, 99.9),
            "max": max(lags),
        }
        if busy:
            result["busy/s"] = done[0] / seconds
        if held:
            held = held[len(held) // 20 :]
            result["held p99.9"] = percentile(held, 99.9)
            result["held max"] = max(held)
            result["held ms/s"] = sum(held) / seconds
        if ledger is not None:
            result["us/record"] = ledger.cpu_s / max(ledger.stored, 1) * 1e6
            result["records"] = ledger.stored
            result["cycles"] = ledger.cycles
        else:
            result["records"] = written
        return result


_LETTING_GO = frozenset(
    ("execute", "executemany", "fsync", "open", "close", "rename", "unlink", "write", "sleep", "dup", "stat")
)
"""The C calls of the ledger's thread that let the GIL go (SQLite's statements, system calls)."""


class _Stretches(Ledger):
    """A ledger whose thread notes, in each cycle, the CPU time it ran Python between two calls
    that let the GIL go: how long it held the GIL at a stretch (the profiler's own cost in)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.longest: list[float] = []
        self.held = 0.0
        self._since: float | None = None

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") in _LETTING_GO and self._since is not None:
            stretch = time.thread_time() - self._since
            self.held += stretch
            self.longest[-1] = max(self.longest[-1], stretch)
            self._since = None
        elif event == "c_return" and getattr(arg, "__name__", "") in _LETTING_GO and self.longest:
            self._since = time.thread_time()

    def _cycle(self, *, final: bool = False, purge: bool = True) -> None:
        if threading.current_thread().name != "switchboard-ledger":
            super()._cycle(final=final, purge=purge)
            return
        self.longest.append(0.0)
        self._since = time.thread_time()
        sys.setprofile(self._profile)
        try:
            super()._cycle(final=final, purge=purge)
        finally:
            sys.setprofile(None)
            if self._since is not None:
                stretch = time.thread_time() - self._since
                self.held += stretch
                self.longest[-1] = max(self.longest[-1], stretch)
            self._since = None


async def counted(records: int, batch: int, *, stretches: bool = False) -> None:
    """Write `records` in groups of `batch`, each stored by the ledger's thread before the next
    (what `--callgrind` counts: the same work whatever the machine's load). `stretches`: print
    the longest time the ledger's thread ran Python without letting the GIL go, per cycle."""
    with tempfile.TemporaryDirectory(prefix="ledger-stall-") as tmp:
        folder = Path(tmp)
        kind = _Stretches if stretches else Ledger
        ledger = kind(open_store(str(folder / "usage.db"), folder), folder / "spool", linger_s=0.0)
        await ledger.start()
        try:
            for start in range(0, records, batch):
                with ledger._drain_lock:  # the ledger's thread takes the group whole
                    for n in range(start, min(start + batch, records)):
                        ledger.write(_values(n))
                while ledger.stored < min(start + batch, records):
                    await asyncio.sleep(0.001)
        finally:
            await ledger.stop()
        print(f"{ledger.stored} records stored")
        if isinstance(ledger, _Stretches):
            longest = sorted(ledger.longest)
            print(
                f"GIL held at a stretch by the ledger's thread, a cycle of {batch} records (ms, CPU time, "
                f"profiled): median {statistics.median(longest) * 1000:.3f}, max {longest[-1] * 1000:.3f}; "
                f"in all {ledger.held / ledger.stored * 1e6:.2f} us a record"
            )


_RELEASED = ("sqlite3_step", "sqlite3_prepare_v2", "sqlite3_reset", "sqlite3_finalize")
"""SQLite's calls that `_sqlite3` makes with the GIL released."""


def callgrind(records: int, batch: int, code: Path | None) -> dict[str, float]:
    """Count `counted` under callgrind: per record on the threads but the main one (the
    ledger's, and the workers of its start and stop), every instruction, those in SQLite's calls
    made without the GIL, the rest (the GIL held), and how often the GIL was let go."""
    out = Path(tempfile.mkdtemp(prefix="ledger-callgrind-")) / "callgrind.out"
    env = {**os.environ, **({"PYTHONPATH": str(code)} if code is not None else {})}
    command = [
        "valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
        sys.executable, "-m", "bench.ledger_stall", "--count", str(records), "--batch", str(batch),
    ]  # fmt: skip
    subprocess.run(command, env=env, cwd=code, check=True, capture_output=True)
    total = released = drops = 0
    for path in out.parent.glob(out.name + "-*"):
        if path.name.endswith("-01"):
            continue
        data = path.read_text()
        total += sum(int(n) for n in re.findall(r"^totals: (\d+)", data, re.MULTILINE))
        annotated = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for line in annotated.splitlines():
            found = re.match(r"\s*([\d,]+) .*:(\w+) \[", line)
            if found and found.group(2) in _RELEASED:
                released += int(found.group(1).replace(",", ""))
        names: dict[str, str] = {}
        callee = ""
        for line in data.splitlines():
            named = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line)
            if named:
                if named.group(2):
                    names[named.group(1)] = named.group(2)
                callee = names.get(named.group(1), "") if line.startswith("cfn") else ""
            elif line.startswith("calls=") and callee == "PyEval_SaveThread":
                drops += int(line[6:].split()[0])
    shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "all": total / records,
        "sqlite, GIL let go": released / records,
        "GIL held": (total - released) / records,
        "GIL let go, times": drops / records,
    }


def _row(name: str, runs: list[dict[str, float]]) -> str:
    keys = ("p50", "p99", "p99.9", "max", "held p99.9", "held max", "held ms/s", "us/record", "busy/s")
    cells = []
    for key in keys:
        values = [r[key] for r in runs if key in r]
        cells.append(f"{statistics.median(values):9.3f}" if values else f"{'-':>9}")
    return f"  {name:<10}" + "".join(cells)


async def in_process(args: argparse.Namespace) -> None:
    on: list[dict[str, float]] = []
    off: list[dict[str, float]] = []
    for _ in range(args.runs):
        off.append(await run_once(args.rate, args.seconds, ledger_on=False, busy=args.busy))
        on.append(await run_once(args.rate, args.seconds, ledger_on=True, busy=args.busy))
        print("  run: ledger on " + ", ".join(f"{k} {v:.3f}" for k, v in on[-1].items()), file=sys.stderr)
    print(
        f"loop lateness (ms) at {args.rate:.0f} records/s, {args.seconds:.0f} s x {args.runs} "
        f"(medians), switch interval {sys.getswitchinterval() * 1000:.2f} ms:"
    )
    print(
        f"  {'':<10}"
        + "".join(
            f"{k:>9}"
            for k in ("p50", "p99", "p99.9", "max", "held.999", "held max", "ms/s", "us/rec", "busy/s")
        )
    )
    print(_row("ledger off", off))
    print(_row("ledger on", on))


async def _sequential(url: str, token: str, seconds: float) -> list[float]:
    """Chat completions to `url` one at a time for `seconds` (after 50 unmeasured): their
    latencies in ms."""
    import aiohttp

    from bench.gateway import MODEL
    from bench.load import chat_body, check_loopback

    check_loopback(url)
    payload = json.dumps(chat_body(MODEL, stream=False)).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def one() -> float:
            started = time.perf_counter()
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}")
            return (time.perf_counter() - started) * 1000

        for _ in range(50):
            await one()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            latencies.append(await one())
    return latencies


async def served(args: argparse.Namespace) -> None:
    from bench.gateway import UPSTREAM_KEY, build_project, metered_service
    from bench.upstream import UpstreamProcess

    async with UpstreamProcess(name="bench", api_key=UPSTREAM_KEY) as upstream:
        root, key_file, token = build_project(upstream.base_url)
        service = metered_service(root, key_file, "stall")
        if args.switch_interval is not None:  # the service's, through a sitecustomize of its own
            site = Path(tempfile.mkdtemp(prefix="ledger-stall-site-"))
            (site / "sitecustomize.py").write_text(
                f"import sys\nsys.setswitchinterval({args.switch_interval!r})\n"
            )
            service.env["PYTHONPATH"] = str(site)
        await service.start()
        try:
            targets = {
                "direct": (f"{upstream.base_url}/chat/completions", UPSTREAM_KEY),
                "switchboard": (f"{service.url}/v1/chat/completions", token),
            }
            found: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(args.runs):
                for name, (url, key) in targets.items():
                    ms = await _sequential(url, key, args.seconds)
                    found[name].append(
                        {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms), "n": len(ms)}
                    )
        finally:
            service.stop()
    interval = "5 ms (default)" if args.switch_interval is None else f"{args.switch_interval * 1000:g} ms"
    print(f"latency at c=1 (ms), {args.seconds:.0f} s x {args.runs} (medians), switch interval {interval}:")
    print(f"  {'':<12}{'p50':>9}{'p99':>9}{'max':>9}")
    for name, runs in found.items():
        cells = "".join(f"{statistics.median(r[k] for r in runs):9.3f}" for k in ("p50", "p99", "max"))
        print(f"  {name:<12}{cells}")
    direct, switchboard = found["direct"], found["switchboard"]
    added = [{k: s[k] - d[k] for k in ("p50", "p99")} for d, s in zip(direct, switchboard, strict=True)]
    print(
        f"  added       {statistics.median(a['p50'] for a in added):9.3f}"
        f"{statistics.median(a['p99'] for a in added):9.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="records a second")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval, in seconds")
    parser.add_argument(
        "--count", type=int, metavar="N", help="write N records, stored in groups (for callgrind)"
    )
    parser.add_argument("--batch", type=int, default=200, help="records a group with --count")
    parser.add_argument("--callgrind", action="store_true", help="count instructions a record (valgrind)")
    parser.add_argument(
        "--baseline", type=Path, metavar="CHECKOUT", help="with --callgrind: another checkout too"
    )
    parser.add_argument("--busy", action="store_true", help="keep the loop busy too (as at c=64): pieces/s")
    parser.add_argument("--stretches", action="store_true", help="with --count: the GIL held at a stretch")
    parser.add_argument("--serve", action="store_true", help="`switchboard serve` at c=1 instead")
    args = parser.parse_args(argv)
    if args.switch_interval is not None and not args.serve:
        sys.setswitchinterval(args.switch_interval)
    if args.callgrind:
        records = 2000
        counts = {"ledger": callgrind(records, args.batch, None)}
        if args.baseline is not None:
            counts["ledger@base"] = callgrind(records, args.batch, args.baseline.resolve())
        print(f"ledger threads, per record ({records} records, {args.batch} a cycle):")
        print(f"  {'':<28}" + "".join(f"{name:>14}" for name in counts))
        for key in counts["ledger"]:
            print(f"  {key:<28}" + "".join(f"{c[key]:>14,.1f}" for c in counts.values()))
        return
    if args.count is not None:
        asyncio.run(counted(args.count, args.batch, stretches=args.stretches))
        return
    asyncio.run(served(args) if args.serve else in_process(args))


if __name__ == "__main__":
    main()

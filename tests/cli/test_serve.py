"""`switchboard serve`'s own preparations (the service it starts is tested under tests/http)."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys

import uvloop

from service.cli.serve import OPEN_FILES, event_loop


def test_serve_raises_a_low_open_file_limit_towards_the_hard_one() -> None:
    """The upstream pools are limited per upstream, not in total: a soft limit of 1,024 open
    files would refuse connections long before the pools are full."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = (
        "import resource\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from service.cli.serve import raise_open_files_limit\n"
        "raise_open_files_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    expected = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    assert int(done.stdout) == max(256, expected)


def test_serve_runs_on_uvloop() -> None:
    """uvloop spends fewer instructions per relayed request than asyncio's own loop
    (BENCHMARKS.md, issue 22); it is a dependency, so `serve` runs on it."""
    loop = event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()

"""The followers of `serve --workers N`, as processes (docs/reference.md §3.2).

The leader starts each follower (`python -m service serve … --follow DIR --worker K`, with its
own environment) and keeps it running: one that exits while the leader runs is started again
after a back-off (1 s, doubled up to 30 s; back to 1 s after a follower that ran 30 s), each
exit logged. At the leader's stop each is sent SIGTERM and given `stop_timeout_s` to finish
what it serves (as the leader gives its own requests), then killed. A follower does not
outlive its leader (`follow_parent`, and `service.http.follower`'s watch).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("service.workers")

FIRST_BACKOFF_S = 1.0
MOST_BACKOFF_S = 30.0
STEADY_S = 30.0
"""A follower that ran this long before it exited is started again after the first back-off."""

_PR_SET_PDEATHSIG = 1


class Followers:
    """Followers 1 to `count`, each started with `command(K)`."""

    def __init__(self, command: Callable[[int], Sequence[str]], count: int, stop_timeout_s: float) -> None:
        self.command = command
        self.count = count
        self.stop_timeout_s = stop_timeout_s
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        workers = range(1, self.count + 1)
        self._tasks = [asyncio.create_task(self._keep(k), name=f"switchboard-worker-{k}") for k in workers]

    async def _keep(self, worker: int) -> None:
        loop = asyncio.get_running_loop()
        backoff = FIRST_BACKOFF_S
        while not self._stopping:
            began = loop.time()
            try:
                # a session of its own: a terminal's Ctrl-C reaches the leader alone, which then
                # stops the followers in order (not restarting one that the same key stopped)
                process = await asyncio.create_subprocess_exec(*self.command(worker), start_new_session=True)
            except OSError as exc:
                log.error("workers: worker %d cannot start (%s)", worker, exc)
            else:
                self.processes[worker] = process
                log.info("workers: worker %d started (pid %d)", worker, process.pid)
                code = await process.wait()
                if self._stopping:
                    return
                log.warning("workers: worker %d (pid %d) exited (%s)", worker, process.pid, _exit(code))
            if loop.time() - began >= STEADY_S:
                backoff = FIRST_BACKOFF_S
            log.warning("workers: worker %d starts again in %.0f s", worker, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MOST_BACKOFF_S)
            self.restarts += 1

    async def stop(self) -> None:
        """SIGTERM to each follower; killed after `stop_timeout_s`."""
        self._stopping = True
        running = [p for p in self.processes.values() if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in running]
        if waits:
            _, late = await asyncio.wait(waits, timeout=self.stop_timeout_s)
            for process in running:
                if process.returncode is None:
                    log.warning("workers: worker pid %d did not stop in time: killed", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if late:
                await asyncio.wait(late)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def follow_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent (the leader) dies; elsewhere the
    follower's watch of its parent does it (`service.http.follower`)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def gone(pid: int) -> bool:
    """Whether process `pid` (a follower's leader) has ended, or is ending: a zombie counts, as
    a leader killed with threads running is while its other threads end. Its followers are
    sent SIGTERM when its main thread ends, and `getppid()` still names it until the last ends:
    that alone does not tell them it is gone. Where /proc is not, what `getppid()` says."""
    if not Path("/proc/self/stat").exists():
        return os.getppid() != pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X", "x")

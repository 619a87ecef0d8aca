"""The cyclic garbage collector settled once `switchboard serve` has loaded its first
configuration (`settled_collector`, docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from service.http.context import REGISTRY
from service.runtime.registry import Outcome, Registry

log = logging.getLogger("service.http.app")  # the logger `serve`'s operators configured before the split

YOUNG_ALLOCATIONS = 50_000
"""The cyclic collector's youngest generation is collected after this many allocations (net of
frees) once `serve` is settled; CPython's default is 700. At most this many young objects wait,
a few MB, for a collection of their cycles."""

YOUNG_PERIOD_S = 1.0
"""…and at least this often, whatever was allocated: the two younger generations are collected
on a timer too, so a cycle that holds a large body (a request's, an answer's) lives about a
second at most, not until 50,000 allocations have come."""


async def settled_collector(app: web.Application) -> AsyncIterator[None]:
    """What `switchboard serve` adds: once the first configuration is loaded, the garbage of
    the start is collected and what is left is frozen (`gc.freeze`, docs/architecture.md).

    CPython's cyclic collector now and then walks every object it tracks (a full collection);
    after a start that is ~90k objects (modules, schemas, the registry), which stopped the
    whole service for 50-160 ms on this project's benchmark machine, every request waiting.
    Frozen, they are left out of every later collection, which walks only what came since.
    The youngest generation is then collected every `YOUNG_ALLOCATIONS` allocations instead of
    CPython's 700: what such a collection walks is what is alive of the young, the requests in
    flight, whatever the threshold, so fewer collections walk them fewer times (BENCHMARKS.md).
    What a reload replaces is freed as before (by its reference count; a snapshot holds no
    cycles). The two younger generations are also collected every `YOUNG_PERIOD_S`, so that a
    cycle the code should not have made (holding a body, say) is freed within about a second
    even when little is allocated. Not for a process that starts many services (tests): each
    start would freeze the last one's objects for good.
    """
    thresholds = gc.get_threshold()
    task = asyncio.create_task(_settle(app[REGISTRY]), name="switchboard-settle-collector")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.set_threshold(*thresholds)


async def _settle(registry: Registry) -> None:
    loop = asyncio.get_running_loop()
    applied = asyncio.Event()

    def wake(outcome: Outcome) -> None:  # in the applying thread
        loop.call_soon_threadsafe(applied.set)

    registry.on_apply.append(wake)
    try:
        while not registry.state.ready:
            applied.clear()
            await applied.wait()
    finally:
        registry.on_apply.remove(wake)
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_ALLOCATIONS, *gc.get_threshold()[1:])
    log.info(
        "collector settled: %d objects frozen in %.0f ms",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1000,
    )
    while True:
        await asyncio.sleep(YOUNG_PERIOD_S)
        gc.collect(1)

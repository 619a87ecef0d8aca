"""`run`: what `aiohttp.web.run_app` does for the service, with the gateway's own connections.

The same duties as `run_app`'s (the app's startup and cleanup, SIGINT and SIGTERM, a graceful
shutdown within `shutdown_timeout`: a request in flight, a stream too, is cut after it; one
aiohttp's server answers may have it twice over), but the listening socket is a `FastSite`'s:
each connection is the gateway's fast path until a request hands it to aiohttp
(`service.http.fast`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from service.http.fast import KEEPALIVE_S
from service.http.fast_site import FastSite
from service.http.forward import Forwarder
from service.http.gateway import GATEWAY

Beside = Callable[[web.AppRunner, FastSite], contextlib.AbstractAsyncContextManager[None]]
"""What runs beside the site once it listens, until the stop (`serve --workers N`'s leader and
followers: `service.cli.serve`)."""


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    say: Callable[[str], None],
    *,
    reuse_port: bool = False,
    forward: str | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
    beside: Beside | None = None,
    **kwargs: Any,
) -> None:
    # aiohttp's connections are kept alive as long as the fast path's: `run_app`'s default
    runner = web.AppRunner(app, handle_signals=True, keepalive_timeout=KEEPALIVE_S, **kwargs)
    await runner.setup()
    forwarder = None
    if forward is not None:
        send_timeout_s = app[GATEWAY].send_timeout_s
        forwarder = Forwarder(forward, asyncio.get_running_loop(), send_timeout_s=send_timeout_s)
    try:
        if ready is not None:  # a follower listens once it can answer (service.http.follower)
            await ready()
        gateway = app[GATEWAY]
        site = FastSite(runner, gateway, host, port, reuse_port=reuse_port, forward=forwarder)
        await site.start()
        say(f"======== Running on {site.name} ========\n(Press CTRL+C to quit)")
        async with beside(runner, site) if beside is not None else contextlib.nullcontext():
            await asyncio.Event().wait()  # until cancelled (SIGINT, SIGTERM)
    finally:
        stopping = asyncio.get_running_loop().time()
        await runner.cleanup()  # no new connection, each answer in flight given
        if forwarder is not None:  # then the connections piped, closed by the leader (`Leader.drain`)
            timeout_s = kwargs.get("shutdown_timeout", 60.0)
            await forwarder.aclose(max(0.0, stopping + timeout_s - asyncio.get_running_loop().time()))


def run(
    app: web.Application,
    loop: asyncio.AbstractEventLoop,
    *,
    host: str,
    port: int,
    say: Callable[[str], None],
    **kwargs: Any,
) -> None:
    """Serve `app` on `host:port` until SIGINT or SIGTERM; `kwargs` go to `_serve` (`reuse_port`,
    `forward`, `ready`, `beside`: `serve --workers N`'s) and on to aiohttp's `AppRunner`
    (`shutdown_timeout`, `handler_cancellation`, `access_log`...), as `run_app` gives them."""
    main = loop.create_task(_serve(app, host, port, say, **kwargs))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel(asyncio.all_tasks(loop), loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _cancel(tasks: set[asyncio.Task[Any]], loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left and wait for it, as `asyncio.run` does at its end."""
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )

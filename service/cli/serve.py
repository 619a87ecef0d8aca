"""`switchboard serve [--providers DIR] [--host H] [--port P] [--events FILE] [--workers N]`: run
the service; with `--workers N` (2 or more), as a leader and N-1 followers on one port
(docs/reference.md §3.2: `service.http.leader`, `service.http.follower`, `service.cli.workers`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from service import console
from service.cli.folders import providers_folder
from service.cli.workers import Followers, follow_parent, gone
from service.config.loader import MAX_FILE_BYTES, config_files, declared_kind
from service.config.upstreams import AllowedUpstreams
from service.files import leads_outside, read_limited
from service.gateway.tracing import missing_packages
from service.http import server
from service.http.app import create_app
from service.http.auth import is_loopback
from service.http.collector import settled_collector
from service.http.context import WORKER
from service.http.fast_site import FastSite
from service.http.follower import Follower
from service.http.leader import (
    LEADER,
    LEADER_SOCKET,
    Leader,
    remove_private,
    remove_worker_folder,
    worker_folder,
)
from service.runtime.sync import parse_pull
from service.settings import Settings
from service.usage import spool
from service.vcs.authorship import Identity
from service.vcs.gitrepo import GitRepo


def has_clients_file(folder: Path, root: Path | None = None) -> bool:
    """Whether a file of `folder` is a clients file: by its kind, never by its name (docs/reference.md §2.3).

    A file that fails to load counts when its text says `kind: clients` (`declared_kind`):
    the service counts it the same way, so it starts with authentication on and answers 503
    until a good version loads. Refusing to start instead would turn one typo into an
    outage of a service whose operator plainly meant it to check tokens, and gain nothing:
    no request is served without a valid token either way. A file that cannot be read at
    all counts too, for the same reason: without good clients, a service on an address
    other than loopback answers 503 to every protected endpoint (it fails closed). So does a
    link out of the repository `root` (which the service refuses unread): it is not read here.
    And so does a folder that cannot be listed: the service is not ready until it can be.
    """
    try:
        paths = config_files(folder)
    except OSError:
        return True
    for path in paths:
        if root is not None and leads_outside(path, root):
            return True
        try:
            data, _ = read_limited(path, MAX_FILE_BYTES)
        except FileNotFoundError:
            continue
        except OSError:
            return True
        if declared_kind(data) == "clients":
            return True
    return False


OPEN_FILES = 65536
"""The open-file limit the service asks for (each client and upstream connection is one)."""


def raise_open_files_limit() -> None:
    """Raise the soft open-file limit towards the hard one: the upstream pools are limited
    per upstream, not in total, and a soft limit of 1,024 (a common default) would refuse
    connections long before the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # not allowed here: keep what we have
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def event_loop() -> asyncio.AbstractEventLoop:
    """The loop the service runs on: uvloop's where it is installed (a dependency, but for
    Windows), which spends fewer instructions per relayed request than asyncio's own
    (BENCHMARKS.md, issue 22); asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serving_app(settings: Settings) -> web.Application:
    """The application as `serve` runs it: the service, the web console, and the collector
    settled once the first configuration is loaded (`settled_collector`)."""
    app = create_app(settings, pages=(console,))
    app.cleanup_ctx.append(settled_collector)
    return app


SHUTDOWN_S = 10.0
"""A request in flight is given this long at a stop (docs/reference.md §3.2); a follower too."""


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM; refuses a non-loopback address without a clients file."""
    worker = getattr(ns, "worker", None)
    tag = f"worker-{worker} " if getattr(ns, "follow", None) and worker else ""
    logging.basicConfig(
        level=settings.log_level, format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"
    )
    providers_folder(settings)
    if settings.workers > 1 and settings.redis_url is None:
        print(
            f"switchboard: error: --workers {settings.workers} needs SWITCHBOARD_REDIS_URL: limits, "
            "budgets and health are shared between workers through Redis, as between replicas "
            "(docs/reference.md §12, §13)",
            file=sys.stderr,
        )
        return 2
    try:
        AllowedUpstreams.parse(settings.allowed_upstreams)
    except ValueError as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        return 2
    try:
        Identity.parse(settings.git_committer)
    except ValueError as exc:
        print(f"switchboard: error: SWITCHBOARD_GIT_COMMITTER: {exc}", file=sys.stderr)
        return 2
    if settings.git_pull is not None:
        try:
            parse_pull(settings.git_pull)
        except ValueError as exc:
            print(f"switchboard: error: {exc}", file=sys.stderr)
            return 2
        if GitRepo.find(settings.providers_dir) is None:
            print(
                f"switchboard: error: SWITCHBOARD_GIT_PULL is set, but {settings.providers_dir} "
                "is not in a git repository (clone the remote first)",
                file=sys.stderr,
            )
            return 1
    if not is_loopback(settings.host) and not has_clients_file(settings.providers_dir, settings.files_root):
        print(
            f"switchboard: error: refusing to listen on {settings.host} without authentication: "
            f"there is no clients file in {settings.providers_dir} "
            "(create one with `switchboard token create`), or listen on 127.0.0.1",
            file=sys.stderr,
        )
        return 1
    if settings.tracing and (missing := missing_packages(*settings.otlp_protocols)):
        print(
            "switchboard: error: SWITCHBOARD_OTEL_EXPORTER=otlp needs the Python packages "
            f"{', '.join(missing)}, which are not installed (pip install {' '.join(missing)}), "
            "or unset SWITCHBOARD_OTEL_EXPORTER",
            file=sys.stderr,
        )
        return 1
    raise_open_files_limit()
    if getattr(ns, "follow", None) and worker:
        return _follow(settings, Path(ns.follow), worker, ns.leader)
    adopt_follower_spools(settings)
    app = serving_app(settings)
    options: dict[str, Any] = {}
    if settings.workers > 1:
        options = _leading(app, settings)
    _serve(app, settings, **options)
    return 0


def _serve(app: web.Application, settings: Settings, **options: Any) -> None:
    """Serve `app` on the settings' address until SIGINT or SIGTERM; `options` are a worker's
    (`server.run`'s `reuse_port`, `forward`, `ready`, `beside`)."""
    server.run(
        app,
        event_loop(),
        host=settings.host,
        port=settings.port,
        access_log=None,
        shutdown_timeout=SHUTDOWN_S,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        say=lambda line: logging.getLogger("service").info(line.strip()),
        **options,
    )


def _leading(app: web.Application, settings: Settings) -> dict[str, Any]:
    """`server.run`'s options for the leader of `--workers N`: the port shared (SO_REUSEPORT),
    its private sockets, and N-1 followers started once it listens (`service.cli.workers`)."""
    leader = app[LEADER] = Leader(app, settings.workers - 1)

    @contextlib.asynccontextmanager
    async def beside(runner: web.AppRunner, site: FastSite) -> AsyncIterator[None]:
        await leader.start(runner)
        port = site.port

        def command(worker: int) -> list[str]:
            return _follower_command(settings, port, leader.private, worker)

        followers = Followers(command, settings.workers - 1, SHUTDOWN_S + 5)
        followers.start()
        logging.getLogger("service.workers").info(
            "workers: %d followers; private sockets in %s", settings.workers - 1, leader.private
        )
        try:
            yield
        finally:
            await site.stop()  # new connections go to the followers, stopping too: none stays
            await leader.drain(runner, followers.stop())
            await leader.aclose()

    return {"reuse_port": True, "beside": beside}


def _follower_command(settings: Settings, port: int, folder: Path, worker: int) -> list[str]:
    """The follower's command line: the leader's settings given as flags (its environment is the
    leader's), the port it listens on (the one chosen for port 0), and where its leader is."""
    return [
        sys.executable,
        "-m",
        "service",
        "--root",
        str(settings.root),
        "serve",
        "--providers",
        str(settings.providers),
        "--host",
        settings.host,
        "--port",
        str(port),
        "--events",
        str(settings.events),
        "--workers",
        str(settings.workers),
        "--follow",
        str(folder),
        "--worker",
        str(worker),
        "--leader",
        str(os.getpid()),
    ]


def adopt_follower_spools(settings: Settings) -> None:
    """Move into the leader's usage spool the spools of followers it does not start (`worker-K`,
    K ≥ N: a run with more workers left them), which no follower would drain."""
    folder = settings.usage_spool_dir
    for path in folder.glob("worker-*") if folder.is_dir() else ():
        number = path.name.removeprefix("worker-")
        if path.is_dir() and number.isdigit() and int(number) >= settings.workers:
            with contextlib.suppress(OSError):
                moved = spool.adopt(folder, path)
                if moved:
                    logging.getLogger("service.usage").warning(
                        "usage spool %s: %d segments of a follower not started are this one's", path, moved
                    )


def follower_settings(settings: Settings, worker: int, private: Path) -> Settings:
    """A follower's settings: its own event log (in `private`, read by nothing), spool and name
    to Redis; no pull, push or health checks (the leader's, adopted through Redis)."""
    suffix = f":w{worker}"
    return settings.model_copy(
        update={
            "events": private / "events.jsonl",
            "usage_spool": settings.usage_spool_dir / f"worker-{worker}",
            "replica": settings.replica[: 253 - len(suffix)] + suffix,
            "git_pull": None,
            "git_push": None,
            "health_interval_s": 0.0,
        }
    )


def _stop_starting(signum: int, frame: object) -> None:
    """SIGTERM before the server's own handler: the stop it would make (`server.run` takes it)."""
    raise web.GracefulExit


def _follow(settings: Settings, folder: Path, worker: int, leader: int | None) -> int:
    """Serve as follower `worker` of the leader `leader` whose private folder is `folder`."""
    signal.signal(signal.SIGTERM, _stop_starting)  # until the server's own handler: its folders removed
    follow_parent()
    if leader is None or os.getppid() != leader:  # gone before this one could follow it
        if leader is not None:
            remove_private(folder)  # what the leader made alone: anything else in it stays
        print("switchboard: error: the leader of this worker is gone", file=sys.stderr)
        return 1
    private = worker_folder(folder, worker)  # in the leader's: removed with it, whatever ends this one
    try:
        app = serving_app(follower_settings(settings, worker, private))
        app[WORKER] = worker
        follower = Follower(app, folder, worker, leader)

        @contextlib.asynccontextmanager
        async def beside(runner: web.AppRunner, site: FastSite) -> AsyncIterator[None]:
            await follower.start()
            try:
                yield
            finally:
                await follower.aclose()

        _serve(
            app,
            settings,
            reuse_port=True,
            forward=str(folder / LEADER_SOCKET),
            ready=follower.ready,
            beside=beside,
        )
    except web.GracefulExit:  # stopped before `server.run` (`_stop_starting`)
        pass
    finally:
        remove_worker_folder(private)
        if os.getppid() != leader or gone(leader):  # its leader was killed: no one else removes its folder
            remove_private(folder)
    # Stopped, every cleanup done: exit now. A worker thread of anyio's (watchfiles') left
    # waiting for work was seen to hold the interpreter's exit for good in a follower stopped
    # soon after its start (its leader killed): a follower outliving its leader is what must
    # never happen.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

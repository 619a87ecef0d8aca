"""`switchboard serve [--providers DIR] [--host H] [--port P] [--events FILE]`: run the service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import sys
from pathlib import Path

from aiohttp import web

from service import console
from service.cli.folders import providers_folder
from service.config.loader import MAX_FILE_BYTES, config_files, declared_kind
from service.config.upstreams import AllowedUpstreams
from service.files import leads_outside, read_limited
from service.gateway.tracing import missing_packages
from service.http import server
from service.http.app import create_app
from service.http.auth import is_loopback
from service.http.collector import settled_collector
from service.runtime.sync import parse_pull
from service.settings import Settings
from service.vcs.commit import Identity
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


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM; refuses a non-loopback address without a clients file."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    providers_folder(settings)
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
    server.run(
        serving_app(settings),
        event_loop(),
        host=settings.host,
        port=settings.port,
        access_log=None,
        shutdown_timeout=10,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        say=lambda line: logging.getLogger("service").info(line.strip()),
    )
    return 0

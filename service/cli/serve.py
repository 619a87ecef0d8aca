"""`switchboard serve [--providers DIR] [--host H] [--port P] [--events FILE]`: run the service."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from service.http.app import create_app
from service.http.auth import is_loopback
from service.settings import Settings


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM; refuses a non-loopback address without a clients file."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.providers_dir.is_dir():
        print(f"switchboard: error: {settings.providers_dir}: no such folder", file=sys.stderr)
        return 1
    has_clients = any((settings.providers_dir / f"clients.{ext}").exists() for ext in ("yaml", "yml"))
    if not has_clients and not is_loopback(settings.host):
        print(
            f"switchboard: error: refusing to listen on {settings.host} without authentication: "
            f"there is no clients file in {settings.providers_dir} "
            "(create one with `switchboard token create`), or listen on 127.0.0.1",
            file=sys.stderr,
        )
        return 1
    app = create_app(settings)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log=None,
        shutdown_timeout=10,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        print=lambda line: logging.getLogger("service").info(line.strip()),
    )
    return 0

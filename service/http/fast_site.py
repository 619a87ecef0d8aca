"""The gateway's own server's listening site: aiohttp's `TCPSite` whose connections are the fast
path's (`service.http.fast.FastConnection`), and the check, at its start, that the installed
aiohttp still has what the fast path uses of it (`missing`; without, aiohttp's site alone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.web_runner import BaseRunner
from aiohttp.web_server import Server

from service.http import fast_check, fast_request
from service.http.fast import KEEPALIVE_S, MAX_HEAD, FastConnection
from service.http.forward import Forwarder

if TYPE_CHECKING:
    from service.http.gateway import Gateway

log = logging.getLogger("service.http.fast")  # its lines as before the split (fast_site.py)


class FastSite(web.TCPSite):
    """aiohttp's `TCPSite` whose connections are `FastConnection`s."""

    def __init__(
        self,
        runner: BaseRunner,
        gateway: Gateway,
        host: str | None,
        port: int | None,
        *,
        keepalive_s: float = KEEPALIVE_S,
        reuse_port: bool = False,
        forward: Forwarder | None = None,
    ) -> None:
        super().__init__(runner, host, port, reuse_port=reuse_port or None)
        self.gateway = gateway
        self.send_timeout_s = gateway.send_timeout_s
        """A stalled client is let go of after this long (`service.http.stalls`)."""
        self.receive_timeout_s = gateway.receive_timeout_s
        """A request that does not come in this long is answered 408 (`service.http.stalls`)."""
        self.keepalive_s = keepalive_s
        """An idle connection of the fast path is closed after this long."""
        self.cuts = gateway.metrics.cuts
        """The app's metrics' series of the connections cut (`switchboard_http_cut_total`)."""
        self.handed_off = 0
        """Connections handed to aiohttp so far."""
        self.loop = asyncio.get_running_loop()
        self.most = gateway.max_body_bytes + MAX_HEAD
        """A connection holds no more unanswered bytes than a request's most (pipelined ones wait)."""
        self.endpoints = gateway.endpoints()
        """The endpoints' paths, each with its route's name, its match and its `Endpoint`."""
        self.forward = forward
        """A follower's (`serve --workers N`): every connection aiohttp would answer goes to the leader."""

    @property
    def server(self) -> Server:
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        return server

    async def start(self) -> None:
        lacking = missing(self) if self.gateway.fast() else []
        if lacking:  # an aiohttp that changed what the fast path uses of it: aiohttp's alone
            log.warning(
                "aiohttp %s lacks %s: every request is served by aiohttp (no fast path)",
                aiohttp.__version__,
                ", ".join(lacking),
            )
        if not self.gateway.fast() or lacking:  # the app's answers need aiohttp's signals: all its own
            if self.forward is None:
                await super().start()
                return
            factory: Callable[[], asyncio.Protocol] = self.forward.protocol  # a follower: all the leader's
        else:
            factory = lambda: FastConnection(self)  # noqa: E731
        self._runner._reg_site(self)
        self._server = await self.loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_port=self._reuse_port
        )
        if self._server.sockets and hasattr(self, "_bound_port"):  # `port`: the one chosen for 0
            self._bound_port = self._server.sockets[0].getsockname()[1]


_SITE_PRIVATE = ("_runner", "_server", "_host", "_port", "_backlog", "_reuse_port")
"""What `FastSite.start` reads and sets of aiohttp's `BaseSite`, private."""
_SERVER_READS = frozenset(
    {"_connections", "_task_handler", "add_done_callback", "pop", "close", "shutdown"}
    | {"asyncio", "gather", "clear"}
)
"""The names aiohttp's `Server` uses where it keeps a connection: what it reads of ours is among
them (`_task_handler`, `close`, `shutdown`); a name not in this set may be one it reads and
`FastConnection` lacks (a `_task_handler` renamed)."""
_SERVER_KEEPS = ("connection_made", "connection_lost", "pre_shutdown", "shutdown")


def missing(site: web.BaseSite) -> list[str]:
    """The private names of aiohttp the fast path uses that this aiohttp lacks (see the module):
    with any, `FastSite.start` is `TCPSite`'s. (`_task_handler` is what aiohttp's `Server`
    reads of a connection: without it, it reads nothing of ours.)"""
    lacking = [f"BaseSite.{name}" for name in _SITE_PRIVATE if not hasattr(site, name)]
    if not callable(getattr(getattr(site, "_runner", None), "_reg_site", None)):
        lacking.append("BaseRunner._reg_site")
    if fast_request._serialize_headers is fast_request._absent:
        lacking.append("aiohttp.http_writer._serialize_headers")
    else:
        amiss = fast_check.unlike_aiohttp()
        if amiss is not None:
            lacking.append(f"a fast request or answer as aiohttp's ({amiss})")
    for name in _SERVER_KEEPS:
        code = getattr(getattr(Server, name, None), "__code__", None)
        if code is None:
            lacking.append(f"Server.{name}")
            continue
        inner = [c for c in code.co_consts if hasattr(c, "co_names")]  # its lambdas, generators
        unknown = {*code.co_names, *(n for c in inner for n in c.co_names)} - _SERVER_READS
        lacking += [f"Server.{name} as it was (it uses {n})" for n in sorted(unknown)]
    return lacking

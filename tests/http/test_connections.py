"""aiohttp's server as the service runs it (service/http/connections.py): made of aiohttp's own
server's parts, or aiohttp's own when one of them is gone. Its connections' timeouts are
tests/http/test_stalls.py's and test_stalls_receive.py's."""

from __future__ import annotations

import pytest

from service.http import connections
from tests.conftest import SopsProject
from tests.http.test_fast_path import _exchange, _request
from tests.http.test_stalls import TOKEN, _Endless, _metered


async def test_an_aiohttp_lacking_what_the_timeout_reads_keeps_its_own_server(
    sops_project: SopsProject, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`connections.Server` is made of aiohttp's own server's private parts: an aiohttp without one
    of them keeps its own server, says so in one line, and serves on (without the timeout)."""
    monkeypatch.setattr(
        connections, "_HANDLER_PRIVATE", (*connections._HANDLER_PRIVATE, "_not_in_this_aiohttp")
    )
    async with _metered(sops_project, _Endless(count=3, size=10).app(), fast=False) as (service, _):
        server = service.runner.server
        assert server is not None and not isinstance(server, connections.Server)
        (answer,) = await _exchange(service, _request(token=TOKEN))
        assert answer.status == 200
    assert (
        "aiohttp's server lacks RequestHandler._not_in_this_aiohttp: its connections have no send or "
        "receive timeout" in caplog.text
    )

"""Promises of docs/reference.md §9 held to their exact words: the index's events, its
course across a restart, the event stream's frames, and the defaults of the bounds."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from service.http import push
from service.settings import Settings
from tests.conftest import Service, SopsProject, eventually, serve, write_routing, write_server
from tests.http.test_push import API, get

NOT_CHANGES = ("secret.read", "service.started")


def index_of_log(service: Service) -> int:
    """The seq of the last event of the log other than `secret.read` and `service.started`."""
    return max(e.seq for e in service.events() if e.type not in NOT_CHANGES)


async def test_the_index_is_the_last_event_but_secret_reads_and_starts_and_holds_across_a_restart(
    sops_project: SopsProject,
) -> None:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project) as service:
        before = int((await get(service, API + "/active")).headers[push.INDEX_HEADER])
        assert before == index_of_log(service)
        assert (await get(service, API + "/active/chat/litellm?model=m")).status == 200
        assert service.events()[-1].type == "secret.read"
        assert int((await get(service, API + "/active")).headers[push.INDEX_HEADER]) == before
    async with serve(sops_project) as again:  # the same log: a `service.started` more
        assert again.events()[-1].type == "service.started" and again.events()[-1].seq > before
        assert int((await get(again, API + "/active")).headers[push.INDEX_HEADER]) == before
        write_server(sops_project, "gpu", base_url="http://127.0.0.1:7001/v1")

        async def moved() -> bool:  # a health check of the changed provider may append after it
            index = int((await get(again, API + "/active")).headers[push.INDEX_HEADER])
            return index == index_of_log(again) > before

        await eventually(moved)


async def test_an_event_is_one_frame_of_id_event_and_data_lines_its_data_the_logged_line(
    running_service: Service,
) -> None:
    """`id:` its seq, `event:` its type, `data:` its JSON (the line of the log), a blank line."""
    url = f"{running_service.url}{API}/events"
    async with running_service.http.get(url, timeout=aiohttp.ClientTimeout(total=20)) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
        assert "ETag" not in response.headers and response.headers[push.REPLICA_HEADER]
        assert await response.content.readline() == b": connected\n"
        assert await response.content.readline() == b"\n"
        write_server(running_service.project, "gpu", base_url="http://127.0.0.1:7002/v1")
        lines = [await asyncio.wait_for(response.content.readline(), 10) for _ in range(4)]
    event = running_service.events()[-1]
    assert event.type == "provider.updated"
    assert lines[0] == f"id: {event.seq}\n".encode() and lines[1] == b"event: provider.updated\n"
    assert lines[2].startswith(b"data: ") and lines[3] == b"\n"
    logged = running_service.events_file.read_text().splitlines()[-1]
    assert json.loads(lines[2][len(b"data: ") :]) == json.loads(logged)


def test_the_bounds_default_to_2000_and_100_and_are_set_by_their_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = Settings()
    assert (defaults.max_watchers, defaults.max_watchers_per_client) == (2000, 100)
    monkeypatch.setenv("SWITCHBOARD_MAX_WATCHERS", "7")
    monkeypatch.setenv("SWITCHBOARD_MAX_WATCHERS_PER_CLIENT", "3")
    assert (Settings().max_watchers, Settings().max_watchers_per_client) == (7, 3)


def test_the_wait_defaults_to_60_s_at_most_300_and_the_keep_alive_is_15_s() -> None:
    assert push.parse_wait(None) == 60 and push.parse_wait("5m") == 300 and push.parse_wait("301") == 300
    assert push.parse_wait("500ms") == 0.5 and push.parse_wait("30s") == 30 and push.parse_wait("7") == 7
    assert push.KEEPALIVE_S == 15

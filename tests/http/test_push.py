"""Change push (docs/reference.md §9) against a real server: ETags, blocking queries, the event stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from service.http import push
from service.http.app import create_app
from service.http.changes import CHANGES
from service.http.context import REGISTRY
from service.journal.reader import verify
from service.settings import Settings
from tests.conftest import Service, SopsProject, eventually, serve, write_routing, write_server
from tests.support.gateway import write_clients
from tests.support.upstreams import FakeUpstream

API = "/api/v1/llm-config"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def get(service: Service, path: str, headers: dict[str, str] | None = None) -> Answer:
    async with service.http.get(service.url + path, headers=headers or {}) as response:
        return Answer(response.status, response.headers, await response.read())


def move(project: SopsProject, port: int) -> None:
    """A change to the configuration: `gpu` moves to another port."""
    write_server(project, "gpu", base_url=f"http://127.0.0.1:{port}/v1")


async def moved(service: Service, port: int) -> None:
    """`move`, and wait until the service applied it (each move is then an event of its own)."""
    move(service.project, port)
    await eventually(lambda: service.registry.snapshot.providers["gpu"].endpoint.endswith(f":{port}/v1"))


# -- conditional GETs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/active", "/active/chat", "/providers", "/servers", "/servers/gpu", "/providers/gpu"]
)
async def test_every_get_has_an_etag_and_answers_304_while_it_holds(
    running_service: Service, path: str
) -> None:
    first = await get(running_service, API + path)
    assert first.status == 200
    tag = first.headers["ETag"]
    assert first.headers[push.INDEX_HEADER].isdigit() and first.headers[push.REPLICA_HEADER]
    again = await get(running_service, API + path, {"If-None-Match": tag})
    assert again.status == 304 and again.headers["ETag"] == tag and again.body == b""
    move(running_service.project, 7001)
    changed = await eventually(lambda: _tag_changed(running_service, API + path, tag))
    assert changed.status == 200


async def _tag_changed(service: Service, path: str, tag: str) -> Answer:
    response = await get(service, path, {"If-None-Match": tag})
    assert response.status == 200 and response.headers["ETag"] != tag
    return response


@pytest.mark.parametrize("path", ["/replicas", "/state"])
async def test_an_answer_that_shows_the_time_keeps_its_tag_until_it_changes(
    running_service: Service, path: str
) -> None:
    """`replicas` shows when each replica was last heard from (`seen_at`), `state` the time it is
    the configuration at (`at`, now by default): measurements beside what the answer means, so
    asked again with its tag the answer is 304 (it was a new tag on every request, never a 304)."""
    first = await get(running_service, API + path)
    assert first.status == 200
    tag = first.headers["ETag"]
    again = await get(running_service, API + path, {"If-None-Match": tag})
    assert again.status == 304 and again.headers["ETag"] == tag and again.body == b""
    await moved(running_service, 7003)
    changed = await eventually(lambda: _tag_changed(running_service, API + path, tag))
    assert changed.status == 200


@pytest.mark.parametrize("path", ["/audit", "/whoami", "/api-keys"])
async def test_the_other_gets_have_an_etag_too(running_service: Service, path: str) -> None:
    """ "Every `GET` under `/api/v1/llm-config/` carries an `ETag`" (docs/reference.md §9)."""
    first = await get(running_service, API + path)
    assert first.status == 200 and first.headers[push.REPLICA_HEADER]
    again = await get(running_service, API + path, {"If-None-Match": first.headers["ETag"]})
    assert again.status == 304 and again.body == b""


async def test_the_secrets_answer_has_no_etag_and_moves_no_index(running_service: Service) -> None:
    """The `secrets:read` endpoint carries no `ETag`, and its `secret.read` event is no change."""
    index = (await get(running_service, API + "/active")).headers[push.INDEX_HEADER]
    secrets = await get(running_service, API + "/active/chat/litellm?model=m")
    assert secrets.status == 200 and "ETag" not in secrets.headers
    assert any(e.type == "secret.read" for e in running_service.events())
    assert (await get(running_service, API + "/active")).headers[push.INDEX_HEADER] == index


async def test_one_providers_tag_is_weak_its_blob_its_commit_and_a_hash(running_service: Service) -> None:
    from service.vcs.gitrepo import blob_sha

    response = await get(running_service, API + "/providers/gpu")
    blob = blob_sha((running_service.project.providers / "gpu.yaml").read_bytes())
    commit = response.json()["commit"] or "-"
    assert re.fullmatch(rf'W/"{blob}\.{commit}\.[0-9a-f]{{24}}"', response.headers["ETag"])


async def test_saving_the_same_content_keeps_the_tag(running_service: Service) -> None:
    tag = (await get(running_service, API + "/active/chat")).headers["ETag"]
    path = running_service.project.providers / "gpu.yaml"
    path.write_bytes(path.read_bytes())
    await asyncio.sleep(0.2)
    assert (await get(running_service, API + "/active/chat")).headers["ETag"] == tag


# -- blocking queries -----------------------------------------------------------------------------


async def test_a_held_query_is_answered_when_a_file_is_saved(running_service: Service) -> None:
    first = await get(running_service, API + "/active/chat")
    index = first.headers[push.INDEX_HEADER]
    held = asyncio.create_task(get(running_service, f"{API}/active/chat?index={index}&wait=30s"))
    await asyncio.sleep(0.3)
    assert not held.done()
    saved = time.monotonic()
    move(running_service.project, 7002)
    answer = await asyncio.wait_for(held, 10)
    assert time.monotonic() - saved < 5
    assert int(answer.headers[push.INDEX_HEADER]) > int(index)
    assert answer.json()["primary"][0]["base_url"].endswith(":7002/v1")


async def test_a_held_query_answers_when_its_wait_runs_out(running_service: Service) -> None:
    index = (await get(running_service, API + "/active")).headers[push.INDEX_HEADER]
    started = time.monotonic()
    answer = await get(running_service, f"{API}/active?index={index}&wait=300ms")
    assert answer.status == 200 and 0.25 < time.monotonic() - started < 3
    assert answer.headers[push.INDEX_HEADER] == index


@pytest.mark.parametrize(("wait", "seconds"), [("500ms", 0.5), ("0.4", 0.4), ("1s", 1.0)])
async def test_wait_is_in_ms_s_or_plain_seconds(running_service: Service, wait: str, seconds: float) -> None:
    index = (await get(running_service, API + "/active")).headers[push.INDEX_HEADER]
    started = time.monotonic()
    answer = await get(running_service, f"{API}/active?index={index}&wait={wait}")
    assert answer.status == 200 and seconds - 0.05 < time.monotonic() - started < seconds + 2


@pytest.mark.parametrize("wait", ["5m", "10m"])
async def test_a_wait_in_minutes_holds_and_is_at_most_five(running_service: Service, wait: str) -> None:
    """`5m` is a wait, and one longer than 300 s is held for 300 s, not refused."""
    index = (await get(running_service, API + "/active")).headers[push.INDEX_HEADER]
    held = asyncio.create_task(get(running_service, f"{API}/active?index={index}&wait={wait}"))
    await asyncio.sleep(1)
    assert not held.done()
    await moved(running_service, 7004)
    assert (await asyncio.wait_for(held, 10)).status == 200


async def test_an_index_without_a_wait_holds_for_the_default(running_service: Service) -> None:
    """`wait` defaults to 60 s: `?index=N` alone is a blocking query, not an answer at once."""
    index = (await get(running_service, API + "/active")).headers[push.INDEX_HEADER]
    held = asyncio.create_task(get(running_service, f"{API}/active?index={index}"))
    await asyncio.sleep(2)
    assert not held.done()
    await moved(running_service, 7005)
    answer = await asyncio.wait_for(held, 10)
    assert answer.status == 200 and int(answer.headers[push.INDEX_HEADER]) > int(index)


@pytest.mark.parametrize("wait", ["301", "9" * 400, "999999999ms", "1000000m"])
async def test_a_wait_past_five_minutes_in_any_unit_is_held_not_refused(
    running_service: Service, wait: str
) -> None:
    """A wait longer than 300 s is clamped to 300 s however it is written (a number too large
    for a float included), never a 400 nor a 500."""
    index = (await get(running_service, API + "/active")).headers[push.INDEX_HEADER]
    held = asyncio.create_task(get(running_service, f"{API}/active?index={index}&wait={wait}"))
    await asyncio.sleep(1)
    assert not held.done()
    await moved(running_service, 7006)
    assert (await asyncio.wait_for(held, 10)).status == 200


@pytest.mark.parametrize("form", ["bare", "weak", "star", "list"])
async def test_if_none_match_compares_weakly_and_takes_a_list_or_a_star(
    running_service: Service, form: str
) -> None:
    """`If-None-Match` is compared weakly (RFC 9110 §13.1.2): the tag with or without `W/`, `*`,
    or a list holding it, is 304 with no body; a list of other tags is the content."""
    tag = (await get(running_service, API + "/active/chat")).headers["ETag"]
    header = {
        "bare": tag.removeprefix("W/"),
        "weak": tag,
        "star": "*",
        "list": f'"other", W/"another",{tag.removeprefix("W/")}',
    }[form]
    answer = await get(running_service, API + "/active/chat", {"If-None-Match": header})
    assert answer.status == 304 and answer.body == b"" and answer.headers["ETag"] == tag
    others = await get(running_service, API + "/active/chat", {"If-None-Match": '"other", W/"another"'})
    assert others.status == 200 and others.headers["ETag"] == tag


async def test_an_index_ahead_of_the_service_answers_at_once(running_service: Service) -> None:
    started = time.monotonic()
    answer = await get(running_service, f"{API}/active?index=999999&wait=30s")
    assert answer.status == 200 and time.monotonic() - started < 2


@pytest.mark.parametrize(
    "query", ["index=x", "index=-1", "index=1&wait=soon", "index=1&wait=10h", "index=%C2%B2", "index=%D9%A1"]
)
async def test_bad_index_or_wait_is_400(running_service: Service, query: str) -> None:
    assert (await get(running_service, f"{API}/active?{query}")).status == 400


@pytest.mark.parametrize("query", ["wait=soon", "wait=-1", "wait=10h", "wait=%EF%BC%91", "wait=1.%D9%A1s"])
async def test_a_bad_wait_is_400_even_when_nothing_would_hold(running_service: Service, query: str) -> None:
    """A bad query parameter (`wait`) is 400 (docs/reference.md §6.4): without `index` or a tag
    it was not read, and the answer came at once as if the client had not asked to wait."""
    answer = await get(running_service, f"{API}/active?{query}")
    assert answer.status == 400 and "`wait`" in answer.json()["error"]["message"]


@pytest.mark.parametrize("where", ["query", "header"])
@pytest.mark.parametrize("value", ["²", "-1", "x", "1" * 19])
async def test_a_bad_last_event_id_is_400(running_service: Service, where: str, value: str) -> None:
    # `²` is a digit to str.isdigit, which int() refuses: it made a 500
    if where == "query":
        answer = await get(running_service, f"{API}/events?after={quote(value)}")
    else:
        answer = await get(running_service, f"{API}/events", {"Last-Event-ID": value})
    error = answer.json()["error"]
    assert answer.status == 400 and error["type"] == "bad_request"
    assert ("`Last-Event-ID`" if where == "header" else "`after`") in error["message"]  # not `index`


async def test_held_queries_are_bounded(sops_project: SopsProject) -> None:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project, max_watchers=2) as service:
        index = (await get(service, API + "/active")).headers[push.INDEX_HEADER]
        held = [asyncio.create_task(get(service, f"{API}/active?index={index}&wait=30s")) for _ in range(2)]
        await eventually(lambda: service.app[CHANGES].held == 2)
        refused = await get(service, f"{API}/active?index={index}&wait=30s")
        assert refused.status == 503 and refused.headers["Retry-After"].isdigit()
        assert refused.json()["error"]["type"] == "busy"
        move(sops_project, 7003)
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]


async def test_streams_and_held_queries_share_the_bound(sops_project: SopsProject) -> None:
    """`SWITCHBOARD_MAX_WATCHERS` counts held queries and event streams alike: with streams
    taking every slot, a held query and another stream are 503 `busy` with `Retry-After`, and
    a query that holds nothing is answered as ever."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project, max_watchers=2) as service:
        first = await get(service, API + "/active")
        async with (
            service.http.get(service.url + API + "/events") as one,
            service.http.get(service.url + API + "/events") as two,
        ):
            assert one.status == two.status == 200
            await eventually(lambda: service.app[CHANGES].held == 2)
            for path, headers in (
                (f"{API}/active?index={first.headers[push.INDEX_HEADER]}&wait=30s", {}),
                (f"{API}/active?wait=30s", {"If-None-Match": first.headers["ETag"]}),
                (f"{API}/events", {}),
            ):
                refused = await get(service, path, headers)
                assert refused.status == 503 and refused.headers["Retry-After"].isdigit(), path
                assert refused.json()["error"]["type"] == "busy"
            assert (await get(service, API + "/active")).status == 200
        await eventually(lambda: service.app[CHANGES].held == 0)
        assert (await get(service, f"{API}/active?index=0&wait=30s")).status == 200  # a slot again


async def test_one_client_cannot_take_every_held_slot(sops_project: SopsProject) -> None:
    """One `config:read` token could hold every query and stream slot, leaving none to the
    others: each authenticated client has its own bound, queries and streams counted alike."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    write_clients(sops_project, {"greedy": ("tok-g", ["config:read"]), "other": ("tok-o", ["config:read"])})
    greedy, other = {"Authorization": "Bearer tok-g"}, {"Authorization": "Bearer tok-o"}
    async with serve(sops_project, max_watchers=10, max_watchers_per_client=2) as service:
        first = await get(service, API + "/active", greedy)
        blocking = f"{API}/active?index={first.headers[push.INDEX_HEADER]}&wait=30s"
        on_tag = {**greedy, "If-None-Match": first.headers["ETag"]}
        query = asyncio.create_task(get(service, API + "/active?wait=30s", on_tag))
        async with service.http.get(service.url + API + "/events", headers=greedy) as stream:
            assert stream.status == 200
            await eventually(lambda: service.app[CHANGES].held == 2)
            for path, headers in (
                (blocking, greedy),
                (API + "/events", greedy),
                (API + "/active?wait=30s", on_tag),
            ):
                refused = await get(service, path, headers)
                assert refused.status == 503 and refused.headers["Retry-After"].isdigit()
                error = refused.json()["error"]
                assert error["type"] == "busy" and "SWITCHBOARD_MAX_WATCHERS_PER_CLIENT" in error["message"]
            assert (await get(service, API + "/active", greedy)).status == 200  # unheld reads go on
            held = [asyncio.create_task(get(service, blocking, other)) for _ in range(2)]
            await eventually(lambda: service.app[CHANGES].held == 4)  # the other client is held
        await eventually(lambda: service.app[CHANGES].held == 3)  # the stream ended: a slot again
        again = asyncio.create_task(get(service, blocking, greedy))
        await eventually(lambda: service.app[CHANGES].held == 4)
        move(sops_project, 7004)
        answers = await asyncio.wait_for(asyncio.gather(query, again, *held), 10)
        assert [a.status for a in answers] == [200] * 4
        assert service.app[CHANGES].held_by == {}


async def test_without_authentication_there_is_no_per_client_bound(sops_project: SopsProject) -> None:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project, max_watchers=10, max_watchers_per_client=1) as service:
        index = (await get(service, API + "/active")).headers[push.INDEX_HEADER]
        held = [asyncio.create_task(get(service, f"{API}/active?index={index}&wait=30s")) for _ in range(3)]
        await eventually(lambda: service.app[CHANGES].held == 3)
        move(sops_project, 7005)
        assert [a.status for a in await asyncio.wait_for(asyncio.gather(*held), 10)] == [200] * 3


async def test_nothing_is_held_before_the_client_is_known(sops_project: SopsProject) -> None:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    write_clients(sops_project, {"reader": ("tok-r", ["config:read"])})
    async with serve(sops_project) as service:
        started = time.monotonic()
        answer = await get(service, f"{API}/active?index=1&wait=30s")
        assert answer.status == 401 and time.monotonic() - started < 2
        assert service.app[CHANGES].held == 0


async def test_a_held_query_whose_token_is_revoked_meanwhile_is_refused(sops_project: SopsProject) -> None:
    """The token is checked again when the wait ends: a query held for minutes was answered
    with the configuration after its token had been removed, or had lost its scope."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    clients = {"gone": ("tok-g", ["config:read"]), "narrowed": ("tok-n", ["config:read"])}
    write_clients(sops_project, clients)
    async with serve(sops_project) as service:
        auth = {name: {"Authorization": f"Bearer {token}"} for name, (token, _) in clients.items()}
        index = (await get(service, API + "/active", auth["gone"])).headers[push.INDEX_HEADER]
        held = {
            name: asyncio.create_task(get(service, f"{API}/active?index={index}&wait=30s", headers))
            for name, headers in auth.items()
        }
        await eventually(lambda: service.app[CHANGES].held == 2)
        write_clients(sops_project, {"narrowed": ("tok-n", ["completions"])})  # moves the index
        answers = {name: await asyncio.wait_for(task, 10) for name, task in held.items()}
    assert answers["gone"].status == 401
    assert answers["narrowed"].status == 403
    assert b"gpu" not in answers["gone"].body and b"gpu" not in answers["narrowed"].body


async def test_shutdown_answers_held_queries_at_once(sops_project: SopsProject) -> None:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project) as service:
        index = (await get(service, API + "/active")).headers[push.INDEX_HEADER]
        held = asyncio.create_task(get(service, f"{API}/active?index={index}&wait=300s"))
        await eventually(lambda: service.app[CHANGES].held == 1)
        started = time.monotonic()
        await service.stop()
        answer = await asyncio.wait_for(held, 10)
        assert answer.status == 200 and time.monotonic() - started < 5


# -- the event stream ---------------------------------------------------------------------------


async def sse(
    service: Service, headers: dict[str, str] | None = None, query: str = ""
) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
    """(kind, event) for each frame: ("event", data) or ("comment", None)."""
    async with service.http.get(
        f"{service.url}{API}/events{query}", headers=headers or {}, timeout=aiohttp.ClientTimeout(total=30)
    ) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert "ETag" not in response.headers
        fields: dict[str, str] = {}
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                yield "comment", None
            elif line == "":
                if "data" in fields:
                    data = json.loads(fields["data"])
                    assert int(fields["id"]) == data["seq"] and fields["event"] == data["type"]
                    yield "event", data
                fields = {}
            else:
                name, _, value = line.partition(": ")
                fields[name] = value


async def take(stream: AsyncIterator[tuple[str, dict[str, Any] | None]], count: int) -> list[dict[str, Any]]:
    found = []
    async for kind, data in stream:
        if kind == "event" and data is not None:
            found.append(data)
            if len(found) == count:
                return found
    return found


async def test_the_stream_gives_live_events_then_resumes_without_gap_or_duplicate(
    running_service: Service,
) -> None:
    live = sse(running_service)
    first_frame = await anext(live)
    assert first_frame == ("comment", None)
    move(running_service.project, 7010)
    (updated,) = await asyncio.wait_for(take(live, 1), 10)
    assert updated["type"] == "provider.updated" and updated["subject"] == "gpu"
    await live.aclose()
    await moved(running_service, 7011)  # missed while disconnected
    await moved(running_service, 7012)
    everything = [e.seq for e in running_service.events()]
    resumed = sse(running_service, {"Last-Event-ID": str(updated["seq"])}, "?after=1")  # the header wins
    missed = await asyncio.wait_for(take(resumed, 2), 10)
    assert [e["seq"] for e in missed] == [s for s in everything if s > updated["seq"]][:2]
    move(running_service.project, 7013)
    (next_one,) = await asyncio.wait_for(take(resumed, 1), 10)
    assert next_one["seq"] == missed[-1]["seq"] + 1
    await resumed.aclose()
    from_start = sse(running_service, query="?after=0")
    replayed = await asyncio.wait_for(take(from_start, len(everything)), 10)
    assert [e["seq"] for e in replayed] == everything
    await from_start.aclose()


@pytest.mark.parametrize("where", ["header", "query"])
async def test_a_last_event_id_ahead_of_the_log_starts_from_now(running_service: Service, where: str) -> None:
    """An id this log never reached (another replica's, or a log replaced) replays nothing and
    does not wait for the log to reach it: the next event is sent, though its seq is lower."""
    ahead = str(running_service.events()[-1].seq + 1000)
    stream = (
        sse(running_service, {"Last-Event-ID": ahead})
        if where == "header"
        else sse(running_service, query=f"?after={ahead}")
    )
    assert await asyncio.wait_for(anext(stream), 5) == ("comment", None)  # nothing replayed
    move(running_service.project, 7014)
    (updated,) = await asyncio.wait_for(take(stream, 1), 10)
    assert updated["type"] == "provider.updated" and updated["seq"] < int(ahead)
    await stream.aclose()


async def test_a_last_event_id_of_zero_replays_the_whole_log(running_service: Service) -> None:
    everything = [e.seq for e in running_service.events()]
    stream = sse(running_service, {"Last-Event-ID": "0"})
    replayed = await asyncio.wait_for(take(stream, len(everything)), 10)
    assert [e["seq"] for e in replayed] == everything and replayed[0]["type"] == "service.started"
    await stream.aclose()


@pytest.mark.parametrize("path", ["/events", "/replicas"])
async def test_the_stream_and_the_replicas_need_config_read(sops_project: SopsProject, path: str) -> None:
    """`…/events` and `…/replicas` are `config:read`'s: no token is 401, a token without the
    scope 403 (nothing streamed, nothing held), the scope 200."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    clients = {
        "app": ("tok-c", ["completions"]),
        "auditor": ("tok-a", ["admin"]),
        "ops": ("tok-r", ["config:read"]),
    }
    write_clients(sops_project, clients)
    async with serve(sops_project) as service:
        assert (await get(service, API + path)).status == 401
        for token in ("tok-c", "tok-a"):
            refused = await get(service, API + path, {"Authorization": f"Bearer {token}"})
            assert refused.status == 403 and refused.json()["error"]["type"] == "forbidden"
        assert service.app[CHANGES].held == 0
        async with service.http.get(
            service.url + API + path, headers={"Authorization": "Bearer tok-r"}
        ) as allowed:
            assert allowed.status == 200


async def test_head_of_the_stream_is_its_headers_alone(running_service: Service) -> None:
    """ "Every `GET` also answers `HEAD`" (docs/reference.md §6.2): `HEAD …/events` wrote the
    stream's first comment after its headers, where a HEAD answer has no content (RFC 9110), so
    the client read it as the next answer's status line; and the stream held its slot for good."""
    host = running_service.url.removeprefix("http://")
    reader, writer = await asyncio.open_connection(*host.split(":"))
    try:
        writer.write(f"HEAD {API}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())  # the same connection
        after = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        assert after.startswith(b"HTTP/1.1 200 "), after
    finally:
        writer.close()
    assert running_service.app[CHANGES].held == 0


async def test_secret_reads_and_clients_go_to_admin_streams_only(sops_project: SopsProject) -> None:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    clients = {
        "reader": ("tok-r", ["config:read"]),
        "boss": ("tok-a", ["config:read", "admin", "secrets:read"]),
    }
    write_clients(sops_project, clients)
    async with serve(sops_project) as service:
        auth = {"reader": {"Authorization": "Bearer tok-r"}, "boss": {"Authorization": "Bearer tok-a"}}
        streams = {name: sse(service, headers, "?after=0") for name, headers in auth.items()}
        await get(service, API + "/active/chat/litellm?model=m", auth["boss"])  # a secret.read
        clients["new"] = ("tok-n", ["completions"])
        write_clients(sops_project, clients)  # a clients.updated
        move(sops_project, 7020)
        seen: dict[str, list[str]] = {}
        for name, stream in streams.items():
            events = await asyncio.wait_for(_until(stream, "provider.updated"), 10)
            seen[name] = [e["type"] for e in events]
            await stream.aclose()
    assert "secret.read" in seen["boss"] and "clients.updated" in seen["boss"]
    assert "secret.read" not in seen["reader"] and "clients.updated" not in seen["reader"]


async def test_a_replay_from_the_log_shows_secret_reads_and_clients_to_admin_streams_only(
    sops_project: SopsProject,
) -> None:
    """What a stream replays from the log (`Last-Event-ID`) is filtered as what it gets live."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    clients = {
        "reader": ("tok-r", ["config:read"]),
        "boss": ("tok-a", ["config:read", "admin", "secrets:read"]),
    }
    write_clients(sops_project, clients)
    async with serve(sops_project) as service:
        auth = {"reader": {"Authorization": "Bearer tok-r"}, "boss": {"Authorization": "Bearer tok-a"}}
        assert (await get(service, API + "/active/chat/litellm?model=m", auth["boss"])).status == 200
        clients["new"] = ("tok-n", ["completions"])
        write_clients(sops_project, clients)
        await eventually(lambda: [e.type for e in service.events()].count("clients.updated") >= 1)
        await moved(service, 7021)
        logged = [e.type for e in service.events()]
        assert "secret.read" in logged and "clients.updated" in logged
        seen: dict[str, list[str]] = {}
        for name, headers in auth.items():
            stream = sse(service, {**headers, "Last-Event-ID": "0"})
            seen[name] = [e["type"] for e in await asyncio.wait_for(_until(stream, "provider.updated"), 10)]
            await stream.aclose()
    assert "secret.read" in seen["boss"] and "clients.updated" in seen["boss"]
    assert "secret.read" not in seen["reader"] and "clients.updated" not in seen["reader"]
    assert seen["reader"] == [t for t in seen["boss"] if t not in ("secret.read", "clients.updated")]


async def test_a_token_replaced_alone_is_a_masked_clients_updated_for_admin_streams_only(
    sops_project: SopsProject,
) -> None:
    """A token replaced alone (same name and scopes) was no event at all: an admin watching the
    stream, or reading the log, never saw a token change. Now an admin's stream gets the
    `clients.updated` with the hashes masked; a config:read stream does not; `state?at=` before
    and after it shows each mask, and the log's chain holds."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    clients = {"reader": ("tok-r", ["config:read"]), "boss": ("tok-a", ["config:read", "admin"])}
    write_clients(sops_project, clients)
    old, new = (hashlib.sha256(t.encode()).hexdigest() for t in ("tok-r", "tok-r2"))
    async with serve(sops_project) as service:
        auth = {"reader": {"Authorization": "Bearer tok-r"}, "boss": {"Authorization": "Bearer tok-a"}}
        boss = sse(service, auth["boss"])
        assert await anext(boss) == ("comment", None)
        before = service.events()[-1].ts
        clients["reader"] = ("tok-r2", ["config:read"])
        write_clients(sops_project, clients)
        events = await asyncio.wait_for(_frames_until(boss, "clients.updated"), 10)
        await boss.aclose()
        assert events[-1]["changes"] == {
            "reader": {
                "old": {"scopes": ["config:read"], "token_sha256": "****" + old[-4:]},
                "new": {"scopes": ["config:read"], "token_sha256": "****" + new[-4:]},
            }
        }
        reader = sse(service, {"Authorization": "Bearer tok-r2"}, "?after=0")
        seen = await asyncio.wait_for(
            _frames_until(reader, "provider.updated", move_to=(sops_project, 7030)), 10
        )
        await reader.aclose()
        assert "clients.updated" not in [e["type"] for e in seen]
        for at, digest in ((before, old), (service.events()[-1].ts, new)):
            answer = await get(service, f"{API}/state?at={quote(at.isoformat())}", auth["boss"])
            assert answer.status == 200
            state = json.loads(answer.body)
            assert state["config"]["clients"]["reader"]["token_sha256"] == "****" + digest[-4:]
        text = service.events_file.read_text()
    assert old not in text and new not in text
    assert verify(service.events_file) == text.count("\n")


async def _frames_until(
    stream: AsyncIterator[tuple[str, dict[str, Any] | None]],
    kind: str,
    move_to: tuple[SopsProject, int] | None = None,
) -> list[dict[str, Any]]:
    """The events of `stream` up to the first of type `kind`; `move_to` makes a change first."""
    if move_to is not None:
        move(*move_to)
    found = []
    async for frame_kind, data in stream:
        if frame_kind == "event" and data is not None:
            found.append(data)
            if data["type"] == kind:
                return found
    return found


async def test_a_revoked_or_demoted_client_hears_no_more(sops_project: SopsProject) -> None:
    """The token is checked when a stream opens and again whenever the clients change: a
    client removed, or that lost `config:read`, has its stream ended before the change goes
    out (reconnecting is its 401 or 403); one that lost `admin` has its stream ended too
    (`test_a_revoked_token_loses_its_stream`), and reconnects with what it may now hear."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    clients = {
        "gone": ("tok-g", ["config:read"]),
        "narrowed": ("tok-n", ["config:read"]),
        "kept": ("tok-k", ["config:read"]),
    }
    write_clients(sops_project, clients)
    async with serve(sops_project) as service:
        streams = {
            name: sse(service, {"Authorization": f"Bearer {token}"}) for name, (token, _) in clients.items()
        }
        for stream in streams.values():
            assert await anext(stream) == ("comment", None)  # connected
        del clients["gone"]
        clients["narrowed"] = ("tok-n", ["completions"])
        write_clients(sops_project, clients)  # a clients.updated, which goes to admins only
        move(sops_project, 7040)
        for name in ("gone", "narrowed"):
            heard = [data async for _, data in streams[name] if data is not None]
            assert heard == [], name  # the stream ended, and told nothing of the change
        events = await asyncio.wait_for(_until(streams["kept"], "provider.updated"), 10)
        assert [e["type"] for e in events] == ["provider.updated"]
        await streams["kept"].aclose()
        assert (await get(service, API + "/events", {"Authorization": "Bearer tok-g"})).status == 401
        assert (await get(service, API + "/events", {"Authorization": "Bearer tok-n"})).status == 403


async def _until(stream: AsyncIterator[tuple[str, dict[str, Any] | None]], kind: str) -> list[dict[str, Any]]:
    found = []
    async for frame_kind, data in stream:
        if frame_kind == "event" and data is not None:
            found.append(data)
            if data["type"] == kind and data.get("subject") == "gpu":
                return found
    return found


async def test_the_stream_sends_keep_alive_comments(
    running_service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(push, "KEEPALIVE_S", 0.2)
    stream = sse(running_service)
    frames = [await asyncio.wait_for(anext(stream), 5) for _ in range(3)]
    assert frames == [("comment", None)] * 3
    await stream.aclose()


@pytest.mark.parametrize("bound", [("STREAM_BACKLOG", 3), ("STREAM_BACKLOG_BYTES", 2000)])
async def test_a_stream_that_falls_too_far_behind_is_closed_and_holds_no_memory(
    running_service: Service, monkeypatch: pytest.MonkeyPatch, bound: tuple[str, int]
) -> None:
    name, value = bound
    monkeypatch.setattr(f"service.http.changes.{name}", value)
    changes = running_service.app[CHANGES]
    async with running_service.http.get(f"{running_service.url}{API}/events") as response:
        await eventually(lambda: len(changes._streams) == 1)
        (stream,) = changes._streams
        stream.ready.set = lambda: None  # a handler that never gets to run: the backlog only grows
        for port in range(7030, 7036):
            await moved(running_service, port)
        # Offered to the stream on the loop once the registry has swapped: after `moved` sees it.
        await eventually(lambda: stream.overflowed)
        assert len(stream.backlog) <= 3
        del stream.ready.set
        stream.ready.set()
        await asyncio.wait_for(response.content.read(), 10)  # the service ended it
    await eventually(lambda: not changes._streams)


# -- at scale ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_thousand_held_queries_and_a_hundred_streams_all_hear_one_change(
    sops_project: SopsProject,
) -> None:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project) as service:  # the default bound holds them all
        index = (await get(service, API + "/active/chat")).headers[push.INDEX_HEADER]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def held() -> int:
                async with http.get(f"{service.url}{API}/active/chat?index={index}&wait=60s") as response:
                    await response.read()
                    return int(response.headers[push.INDEX_HEADER])

            async def stream() -> int:
                async with http.get(f"{service.url}{API}/events") as response:
                    async for raw in response.content:
                        if raw.startswith(b"id: "):
                            return int(raw[4:])
                return 0

            queries = [asyncio.create_task(held()) for _ in range(1000)]
            streams = [asyncio.create_task(stream()) for _ in range(100)]
            await eventually(lambda: service.app[CHANGES].held == 1100, timeout=60)
            move(sops_project, 7040)
            indexes = await asyncio.wait_for(asyncio.gather(*queries, *streams), 30)
        assert all(i > int(index) for i in indexes)


async def test_a_client_that_leaves_during_the_replay_ends_its_stream_quietly(
    sops_project: SopsProject, caplog: pytest.LogCaptureFixture
) -> None:
    """A tab closed while the log is replayed (the console reads it from the start) is no error."""
    for n in range(300):
        write_server(sops_project, f"p{n:03d}", base_url=f"http://127.0.0.1:9/v{'x' * 200}{n}")
    async with serve(sops_project) as service:
        changes = service.app[CHANGES]
        host, port = service.url.removeprefix("http://").split(":")
        for _ in range(3):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET {API}/events?after=0 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await reader.readexactly(512)  # the replay has begun; the rest is never read
            writer.transport.abort()  # gone, as a closed tab is
        await eventually(lambda: not changes._streams, timeout=10)
        status, _ = await service.get("/readyz")
        assert status == 200
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, [r.getMessage() for r in errors]


async def test_an_event_recorded_while_a_change_is_applied_waits_its_turn(running_service: Service) -> None:
    """A health change appended while the registry applies a file (between the file's event and
    the swap) must neither wake held queries onto the old configuration nor pass the change on
    the streams: shown first, it moved the index early and the streams dropped the change."""
    from service.http.context import EVENTS
    from service.journal.events import ProviderHealthChanged

    service = running_service
    log = service.app[EVENTS]

    def meanwhile(event: Any) -> None:  # as the health writer's thread would, mid-apply
        if event.type == "provider.updated":
            log.on_append.remove(meanwhile)
            status = {"status": {"old": "healthy", "new": "unhealthy"}}
            log.append(ProviderHealthChanged(subject="gpu", changes=status))

    index = (await get(service, API + "/active/chat")).headers[push.INDEX_HEADER]
    stream = sse(service)
    assert await anext(stream) == ("comment", None)
    log.on_append.append(meanwhile)
    held = asyncio.create_task(get(service, f"{API}/active/chat?index={index}&wait=20s"))
    await eventually(lambda: service.app[CHANGES].held == 1)
    move(service.project, 7050)
    answer = await asyncio.wait_for(held, 10)
    assert answer.json()["primary"][0]["base_url"] == "http://127.0.0.1:7050/v1"
    delivered = await asyncio.wait_for(take(stream, 2), 10)
    await stream.aclose()
    assert [e["type"] for e in delivered] == ["provider.updated", "provider.health_changed"]
    assert delivered[1]["seq"] == delivered[0]["seq"] + 1
    assert answer.headers[push.INDEX_HEADER] == str(delivered[1]["seq"])


# -- consumers that take nothing, and shutdown ----------------------------------------------------


def _reader_that_reads_nothing(url: str) -> socket.socket:
    """An event stream opened by a client that never reads (and takes as little as the kernel lets)."""
    host, port = url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((host, int(port)))
    client.sendall(f"GET {API}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return client


async def _big_changes(project: SopsProject, registry: Any, count: int) -> None:
    """`count` changes whose events are ~200 KB each (a provider's list of 2,000 models changing)."""
    path = project.providers / "gpu.yaml"
    for i in range(count):
        models = ", ".join(f"m{j}-{i}-" + "y" * 100 for j in range(2000))
        port = 8000 + i
        path.write_text(
            f"kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: http://127.0.0.1:{port}/v1\n"
            f"models: [{models}]\n"
        )
        url = f"http://127.0.0.1:{port}/v1"
        await eventually(lambda url=url: registry.snapshot.providers["gpu"].endpoint == url)


async def test_a_stream_whose_client_takes_nothing_is_closed_quietly(
    running_service: Service, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It was closed by a ConnectionResetError that left the handler: logged as an unhandled
    error with its traceback, counted as a 500, and a 500 answer tried on a started stream."""
    monkeypatch.setattr(push, "WRITE_TIMEOUT_S", 0.5)
    changes = running_service.app[CHANGES]
    client = _reader_that_reads_nothing(running_service.url)
    try:
        await eventually(lambda: len(changes._streams) == 1)
        await _big_changes(running_service.project, running_service.registry, 12)
        await eventually(lambda: not changes._streams, timeout=10)
    finally:
        client.close()
    events = "/api/v1/llm-config/events"

    async def answered() -> None:  # counted by the middleware once the handler has returned
        assert await running_service.metric("switchboard_http_requests_total", route=events) >= 1

    await eventually(answered)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert await running_service.metric("switchboard_http_requests_total", route=events, status="500") == 0


async def test_a_stream_whose_client_takes_nothing_holds_little_memory(running_service: Service) -> None:
    """A large event (a provider's long models list) went to the transport whole: each stream
    whose client reads nothing held its own copy of it (1,000 streams, a 2 MB event: 2 GB)."""
    changes = running_service.app[CHANGES]
    client = _reader_that_reads_nothing(running_service.url)
    try:
        await eventually(lambda: len(changes._streams) == 1)
        await _big_changes(running_service.project, running_service.registry, 20)  # past the kernel's buffers
        await asyncio.sleep(0.3)
        (stream,) = changes._streams
        assert isinstance(stream.transport, asyncio.WriteTransport)
        held = stream.transport.get_write_buffer_size()
    finally:
        client.close()
    assert held <= 256 << 10, f"{held} bytes held for a client that reads nothing"


async def test_shutdown_does_not_wait_for_a_stream_whose_client_takes_nothing(
    sops_project: SopsProject,
) -> None:
    """With `serve`'s shutdown timeout (10 s) a stream blocked on such a client held the stop
    for 20 s; streams are ended at once (the blocked one cut), and held queries answered."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    settings = Settings(
        root=sops_project.root,
        providers=sops_project.providers,
        events=sops_project.root / "var" / "events.jsonl",
        port=0,
        debounce_ms=10,
        age_key_file=sops_project.identity.key_file,
        health_interval_s=0,
    )
    app = create_app(settings, sops=sops_project.sops)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=10)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        await eventually(lambda: app[REGISTRY].ready)
        client = _reader_that_reads_nothing(url)
        await eventually(lambda: len(app[CHANGES]._streams) == 1)
        await _big_changes(sops_project, app[REGISTRY], 12)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}{API}/active") as first:
                index = first.headers[push.INDEX_HEADER]
            held = asyncio.create_task(http.get(f"{url}{API}/active?index={index}&wait=300s"))
            await eventually(lambda: app[CHANGES].held == 2)  # the stream, and the query
            started = time.monotonic()
            await runner.cleanup()
            took = time.monotonic() - started
            answer = await asyncio.wait_for(held, 5)
            assert answer.status == 200
            answer.release()
    finally:
        await runner.cleanup()
        client.close()
    assert took < 3, f"the service took {took:.1f} s to stop"


async def test_replays_that_stall_do_not_hold_back_a_change(
    running_service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams resuming from the start of a long log (a reconnect storm, consoles that read the
    whole history) read it back in worker threads; in the default executor they queued ahead
    of the reload, and a change reached nobody until they were done."""
    gate = threading.Event()
    real = push._frames

    def slow(*args: Any) -> Any:
        gate.wait(30)  # a long log on a slow disk
        return real(*args)

    monkeypatch.setattr(push, "_frames", slow)
    service = running_service
    streams = [sse(service, query="?after=0") for _ in range(12)]
    pending = [asyncio.create_task(anext(stream)) for stream in streams]
    try:
        await eventually(lambda: len(service.app[CHANGES]._streams) == 12)
        index = (await get(service, API + "/active/chat")).headers[push.INDEX_HEADER]
        held = asyncio.create_task(get(service, f"{API}/active/chat?index={index}&wait=30s"))
        await eventually(lambda: service.app[CHANGES].held == 13)
        move(service.project, 7060)
        answer = await asyncio.wait_for(held, 5)
        assert answer.json()["primary"][0]["base_url"] == "http://127.0.0.1:7060/v1"
    finally:
        gate.set()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def test_a_providers_tag_changes_when_its_health_does(sops_project: SopsProject) -> None:
    async with FakeUpstream() as upstream:
        write_server(sops_project, "gpu", base_url=upstream.base_url)
        write_routing(sops_project, ["gpu"])
        async with serve(sops_project) as service:
            before = await get(service, API + "/providers/gpu")
            assert before.json()["health"]["status"] == "unknown"
            async with service.http.post(f"{service.url}{API}/providers/gpu/test", json={}) as tested:
                assert (await tested.json())["ok"] is True
            again = await get(service, API + "/providers/gpu", {"If-None-Match": before.headers["ETag"]})
    # 304 tells the client its copy, `unknown`, is current: the provider is `healthy`
    assert again.status == 200 and again.json()["health"]["status"] == "healthy"


async def test_one_change_of_many_events_does_not_close_the_streams(sops_project: SopsProject) -> None:
    """A pull request that adds 300 providers is one apply, 300 events offered to every stream
    before any of them can send one: past 256 every stream, however fast, was closed as too
    far behind, and every consumer came back at once to replay the log."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project, debounce_ms=300) as service:
        stream = sse(service)
        assert await anext(stream) == ("comment", None)
        for i in range(300):
            write_server(sops_project, f"p{i:03d}")
        added = await asyncio.wait_for(take(stream, 300), 20)
        await stream.aclose()
    assert [e["subject"] for e in added] == sorted(f"p{i:03d}" for i in range(300))


async def test_a_revoked_token_loses_its_stream(sops_project: SopsProject) -> None:
    """A stream lives as long as its connection: a token removed from the clients file (or one
    that lost `admin`) went on receiving every event, `secret.read` included, until it left."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    clients = {
        "reader": ("tok-r", ["config:read"]),
        "boss": ("tok-a", ["config:read", "admin"]),
        "kept": ("tok-k", ["config:read"]),
    }
    write_clients(sops_project, clients)
    async with serve(sops_project) as service:
        auth = {name: {"Authorization": f"Bearer {token}"} for name, (token, _) in clients.items()}
        streams = {name: sse(service, auth[name]) for name in clients}
        for stream in streams.values():
            assert await anext(stream) == ("comment", None)
        del clients["reader"]
        clients["boss"] = ("tok-a", ["config:read"])
        write_clients(sops_project, clients)
        for name in ("reader", "boss"):
            rest = await asyncio.wait_for(take(streams[name], 1000), 10)  # ends: the service closed it
            assert all(e["type"] != "clients.updated" for e in rest)
        move(sops_project, 7070)
        (still,) = await asyncio.wait_for(take(streams["kept"], 1), 10)
        assert still["type"] == "provider.updated"
        refused = await get(service, API + "/events", auth["reader"])
        for stream in streams.values():
            await stream.aclose()
    assert refused.status == 401


async def test_a_replaced_token_loses_its_stream(sops_project: SopsProject) -> None:
    """A client's token replaced in the clients file (a leaked one revoked: same name, same
    scopes) is a token the clients file removes (docs/reference.md §9): its stream went on, as
    the replacement was no `clients.updated` and nothing looked at the streams' tokens again."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    write_clients(sops_project, {"ops": ("tok-leaked", ["config:read"])})
    async with serve(sops_project) as service:
        stream = sse(service, {"Authorization": "Bearer tok-leaked"})
        assert await anext(stream) == ("comment", None)
        write_clients(sops_project, {"ops": ("tok-fresh", ["config:read"])})
        await asyncio.wait_for(take(stream, 1000), 10)  # ends: the service closed it
        await stream.aclose()
        refused = await get(service, API + "/events", {"Authorization": "Bearer tok-leaked"})
    assert refused.status == 401

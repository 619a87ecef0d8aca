"""The slots of held queries and event streams (docs/reference.md §9, SWITCHBOARD_MAX_WATCHERS and
SWITCHBOARD_MAX_WATCHERS_PER_CLIENT), attacked: clients that vanish mid-hold (a reset, a close,
a half-close), answers that hold nothing (wait=0, a bad wait, a 304, an index ahead, a tag of
an unknown commit), a token revoked while held, and shutdown. Each time, every slot comes back:
the count of the client, and the whole count, return to 0, and the client can hold as many again.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from aiohttp import web
from pydantic import ValidationError

from service.config.models import Clients
from service.http import push
from service.http.changes import CHANGES
from tests.conftest import Service, SopsProject, eventually, serve, write_routing, write_server
from tests.http.test_push import API, get
from tests.support.gateway import write_clients

pytestmark = pytest.mark.timeout(60)

READER = {"Authorization": "Bearer tok-r"}
BOUND = 3


def _world(project: SopsProject) -> None:
    write_server(project, "gpu")
    write_routing(project, ["gpu"])
    write_clients(project, {"reader": ("tok-r", ["config:read"]), "other": ("tok-o", ["config:read"])})


def _open(service: Service, target: str, headers: dict[str, str]) -> socket.socket:
    """A raw connection that sent one GET and reads nothing: cut later as the test chooses."""
    host, port = service.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _cut(sock: socket.socket, how: str) -> None:
    if how == "reset":  # RST: SO_LINGER with a zero timeout
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    elif how == "close":  # FIN, as a process that exits
        sock.close()
    else:  # half-close: the client says it sends no more, and then disappears
        sock.shutdown(socket.SHUT_WR)
        sock.close()


def _counts(service: Service) -> tuple[int, dict[str, int]]:
    changes = service.app[CHANGES]
    return changes.held, dict(changes.held_by)


@pytest.mark.parametrize("how", ["reset", "close", "half-close"])
async def test_a_client_that_vanishes_mid_hold_gives_every_slot_back(
    sops_project: SopsProject, how: str
) -> None:
    _world(sops_project)
    async with serve(sops_project, max_watchers=50, max_watchers_per_client=BOUND) as service:
        first = await get(service, API + "/active", READER)
        index, tag = first.headers[push.INDEX_HEADER], first.headers["ETag"]
        kinds = [
            (f"{API}/active?index={index}&wait=60s", READER),
            (f"{API}/active?wait=60s", {**READER, "If-None-Match": tag}),
            (f"{API}/events", READER),
        ]
        for _ in range(4):  # rounds: a slot lost in any would show as a refusal in the next
            socks = [_open(service, target, headers) for target, headers in kinds]
            await eventually(lambda: _counts(service) == (BOUND, {"reader": BOUND}))
            refused = await get(service, f"{API}/active?index={index}&wait=60s", READER)
            assert refused.status == 503 and refused.json()["error"]["type"] == "busy"
            for sock in socks:
                _cut(sock, how)
            await eventually(lambda: _counts(service) == (0, {}))


async def test_answers_that_hold_nothing_take_no_slot(sops_project: SopsProject) -> None:
    _world(sops_project)
    async with serve(sops_project, max_watchers=50, max_watchers_per_client=1) as service:
        first = await get(service, API + "/active", READER)
        index, tag = int(first.headers[push.INDEX_HEADER]), first.headers["ETag"]
        unknown_commit = push.tags.make("0" * 40, "f" * 40, b"x")  # a commit this repository never had
        cases = [
            (f"{API}/active?index={index}&wait=0", READER, 200),
            (f"{API}/active?index={index}&wait=0ms", READER, 200),
            (f"{API}/active?index={index}&wait=soon", READER, 400),
            (f"{API}/active?index={index}&wait=-1s", READER, 400),
            (f"{API}/active?index=x&wait=1s", READER, 400),
            (f"{API}/active?index={index + 1000}&wait=60s", READER, 200),  # ahead: at once
            (f"{API}/active?index={index - 1}&wait=60s", READER, 200) if index > 0 else None,
            (f"{API}/active", {**READER, "If-None-Match": tag}, 304),
            (f"{API}/active?wait=0", {**READER, "If-None-Match": tag}, 304),
            (f"{API}/active?wait=200ms", {**READER, "If-None-Match": tag}, 304),
            (f"{API}/active?wait=200ms", {**READER, "If-None-Match": unknown_commit}, 200),
            (f"{API}/active?index={index}&wait=60s", {"Authorization": "Bearer nobody"}, 401),
            (f"{API}/events?after=zz", READER, 400),
        ]
        for case in cases:
            if case is None:
                continue
            target, headers, status = case
            answer = await asyncio.wait_for(get(service, target, headers), 10)
            assert answer.status == status, (target, answer.status, answer.body[:200])
            assert _counts(service) == (0, {}), target
        # The one slot is still there: a query holds, and a second is refused.
        held = asyncio.create_task(get(service, f"{API}/active?index={index}&wait=300ms", READER))
        await eventually(lambda: _counts(service) == (1, {"reader": 1}))
        assert (await get(service, f"{API}/events", READER)).status == 503
        assert (await held).status == 200
        assert _counts(service) == (0, {})


async def test_a_client_at_its_bound_leaves_the_others_every_slot(sops_project: SopsProject) -> None:
    """The per-client bound is checked first: a client refused for its own bound takes nothing
    from the whole, and another client holds up to its own bound beside it."""
    _world(sops_project)
    other = {"Authorization": "Bearer tok-o"}
    async with serve(sops_project, max_watchers=2 * BOUND, max_watchers_per_client=BOUND) as service:
        index = (await get(service, API + "/active", READER)).headers[push.INDEX_HEADER]
        target = f"{API}/active?index={index}&wait=60s"
        mine = [_open(service, target, READER) for _ in range(BOUND)]
        await eventually(lambda: _counts(service) == (BOUND, {"reader": BOUND}))
        for _ in range(20):  # a greedy client hammering at its bound
            assert (await get(service, target, READER)).status == 503
        theirs = [_open(service, f"{API}/events", other) for _ in range(BOUND)]
        await eventually(lambda: _counts(service) == (2 * BOUND, {"reader": BOUND, "other": BOUND}))
        for sock in mine + theirs:
            _cut(sock, "reset")
        await eventually(lambda: _counts(service) == (0, {}))


async def test_shutdown_ends_streams_and_held_queries_and_frees_their_slots(
    sops_project: SopsProject,
) -> None:
    _world(sops_project)
    async with serve(sops_project, max_watchers_per_client=BOUND) as service:
        first = await get(service, API + "/active", READER)
        index, tag = first.headers[push.INDEX_HEADER], first.headers["ETag"]
        held = [
            asyncio.create_task(get(service, f"{API}/active?index={index}&wait=300s", READER)),
            asyncio.create_task(get(service, f"{API}/active?wait=300s", {**READER, "If-None-Match": tag})),
        ]
        stream = _open(service, f"{API}/events", READER)
        await eventually(lambda: _counts(service) == (3, {"reader": 3}))
        await service.stop()
        answers = await asyncio.wait_for(asyncio.gather(*held), 10)
        assert [a.status for a in answers] == [200, 200]  # each with the content (docs/reference.md §9)
        assert _counts(service) == (0, {})
        stream.close()


async def test_a_query_held_on_a_tag_keeps_its_slot_while_it_looks_again(sops_project: SopsProject) -> None:
    """Woken (an answer may have changed), a query held on a tag gave its slot back while its
    answer was made again, here a listing asked of the upstream: the client's next query took
    the slot, and the first, held for seconds already, was then refused 503 when it held again."""
    gate = asyncio.Event()
    gate.set()

    async def models(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    upstream = web.Application()
    upstream.router.add_get("/v1/models", models)
    runner = web.AppRunner(upstream, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        _world(sops_project)
        write_server(sops_project, "gpu", base_url=f"http://127.0.0.1:{port}/v1")
        async with serve(sops_project, max_watchers_per_client=1, health_interval_s=0) as service:
            listing = f"{API}/servers/gpu/models"
            await eventually(
                lambda: service.registry.snapshot.providers["gpu"].endpoint.endswith(f":{port}/v1")
            )
            first = await get(service, listing, READER)
            assert first.status == 200, first.body
            index = first.headers[push.INDEX_HEADER]
            held = asyncio.create_task(
                get(service, f"{listing}?wait=30s", {**READER, "If-None-Match": first.headers["ETag"]})
            )
            await eventually(lambda: _counts(service) == (1, {"reader": 1}))
            gate.clear()
            try:
                service.app[CHANGES].touch()  # the held query looks again: the upstream is slow to list
                await asyncio.sleep(0.2)
                second = asyncio.create_task(get(service, f"{API}/active?index={index}&wait=2s", READER))
                await asyncio.sleep(0.3)
                assert second.done() and second.result().status == 503  # the client holds one already
            finally:
                gate.set()
            await asyncio.sleep(0.3)
            assert not held.done() and _counts(service) == (1, {"reader": 1})
            service.app[CHANGES].close()
            assert (await asyncio.wait_for(held, 10)).status == 200  # shutdown: the content
    finally:
        gate.set()
        await runner.cleanup()


@pytest.mark.parametrize("same", ["name", "token"])
def test_one_name_is_one_token_so_a_client_cannot_hold_twice_its_bound(same: str) -> None:
    """The slots are counted by the client's name: a clients file giving one name two tokens
    (or one token two names) would split or share a bucket. It is refused."""
    first = {"name": "a", "token_sha256": "1" * 64, "scopes": ["config:read"]}
    second = {
        "name": "a" if same == "name" else "b",
        "token_sha256": "1" * 64 if same == "token" else "2" * 64,
    }
    with pytest.raises(ValidationError, match=f"same {same}"):
        Clients.model_validate({"kind": "clients", "clients": [first, {**second, "scopes": ["config:read"]}]})

"""How the Python client keeps its copy and its event stream (docs/reference.md §9, §11): by
tags on whichever replica answers, one question per `wait` when idle, `stale` soon after the
service goes silent, and a stream that starts over on another replica; and what it does with
services that misbehave."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from service.client import Event, Switchboard
from service.http.changes import CHANGES
from service.http.push import parse_wait
from tests.conftest import AgeIdentity, Service, SopsProject, eventually, serve, write_routing, write_server
from tests.support.replicas import Replica, free_port, replica_env, replicas
from tests.support.upstreams import serving

API = "/api/v1/llm-config"
KEPT = ("content-type", "etag", "x-switchboard", "cache-control", "retry-after")


def project_with_route(project: SopsProject) -> None:
    write_server(project, "a", base_url="http://127.0.0.1:9/v1")
    write_server(project, "b", base_url="http://127.0.0.1:10/v1")
    write_routing(project, ["a"], fallbacks=["b"])


def copy_project(project: SopsProject, identity: AgeIdentity, root: Path) -> SopsProject:
    shutil.copytree(project.root, root)
    return SopsProject(root, root / "providers.d", project.sops, identity)


async def applied(service: Service, port: int) -> None:
    """Move server `a` of `service` to `port`, and wait until it is applied."""
    write_server(service.project, "a", base_url=f"http://127.0.0.1:{port}/v1")
    await eventually(lambda: service.registry.snapshot.providers["a"].endpoint.endswith(f":{port}/v1"))


class Proxy:
    """A reverse proxy without affinity: each request goes to the next backend in turn, answers
    (event streams too) are passed on as they come; `cut()` closes every open connection, as a
    balancer that moves its clients does. `questions` records each request's path and headers."""

    def __init__(self, *backends: str) -> None:
        self.backends = list(backends)
        self.questions: list[tuple[str, dict[str, str]]] = []
        self._turn = 0
        self._open: set[asyncio.BaseTransport] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Proxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._http = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()
        await self._http.close()
        assert self._runner is not None
        await self._runner.cleanup()

    def cut(self) -> None:
        for transport in list(self._open):
            transport.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        self.questions.append((request.path_qs, headers))
        backend = self.backends[self._turn % len(self.backends)]
        self._turn += 1
        transport = request.transport
        assert transport is not None
        self._open.add(transport)
        try:
            timeout = aiohttp.ClientTimeout(total=None)
            async with self._http.get(backend + request.path_qs, headers=headers, timeout=timeout) as answer:
                kept = {k: v for k, v in answer.headers.items() if k.lower().startswith(KEPT)}
                response = web.StreamResponse(status=answer.status, headers=kept)
                await response.prepare(request)
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        finally:
            self._open.discard(transport)

    def held_questions(self) -> list[tuple[str, dict[str, str]]]:
        return [(path, h) for path, h in self.questions if path.startswith(f"{API}/active")]


# -- tags, one question per wait --------------------------------------------------------------------


async def test_an_idle_client_asks_once_per_wait_behind_replicas_whose_indexes_differ(
    sops_project: SopsProject, age_identity: AgeIdentity, tmp_path: Path
) -> None:
    """Behind a balancer without affinity, replicas whose event logs differ: the client sent
    one replica's index to the other, answered at once each time (a loop, then a backoff of
    seconds between a change and the client seeing it). It asks with tags, held anywhere."""
    project_with_route(sops_project)
    other = copy_project(sops_project, age_identity, tmp_path / "replica-b")
    async with serve(sops_project, replica="a") as a, serve(other, replica="b") as b:
        for port in (7101, 7102, 7103, 9):  # b's index is ahead of a's, for the same configuration
            await applied(b, port)
        index_a = (await a.http.get(a.url + API + "/active")).headers["X-Switchboard-Index"]
        index_b = (await b.http.get(b.url + API + "/active")).headers["X-Switchboard-Index"]
        assert index_a != index_b
        async with Proxy(a.url, b.url) as proxy, Switchboard(proxy.url, wait_s=1) as sb:
            await sb.get_active_llm_provider("chat")
            await asyncio.sleep(0.2)  # the first held question is asked
            before = len(proxy.held_questions())
            await asyncio.sleep(4)
            asked = len(proxy.held_questions()) - before
            assert asked <= 5, f"{asked} questions in 4 s with wait=1s"
            assert not sb.stale
            first, *held = proxy.held_questions()
            assert "If-None-Match" not in first[1]
            for path, headers in held:
                assert path == f"{API}/active?wait=1s" and "index=" not in path
                assert headers["If-None-Match"].startswith('W/"')  # what the service gave, as it is
            # A change on every replica reaches it at once, held where it was asked.
            version = sb.version
            await asyncio.gather(applied(a, 7201), applied(b, 7201))
            started = time.monotonic()
            await sb.wait_for_change(version, timeout_s=10)
            assert time.monotonic() - started < 2
            chat = await sb.get_active_llm_provider("chat")
            assert chat is not None and chat.base_url.endswith(":7201/v1")


async def test_a_hung_service_makes_the_copy_stale_within_20_s(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    """A service hung (SIGSTOP) kept the client's held query open for its 60 s and then
    10 s more: `stale` stayed false for 70 s. Its question is due back at `wait` (15 s);
    18 s without an answer is silence."""
    project_with_route(sops_project)
    env = replica_env(sops_project.identity.key_file)
    member = Replica("hung", sops_project.root, sops_project.providers, free_port(), env, tmp_path)
    async with replicas(member):
        assert member.process is not None
        pid = member.process.pid
        async with Switchboard(member.url) as sb:
            assert (sb.wait_s, sb.grace_s) == (15, 3)
            chat = await sb.get_active_llm_provider("chat")
            assert chat is not None and chat.id == "a" and not chat.stale
            await asyncio.sleep(0.5)  # a held question is in flight
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                await eventually(lambda: sb.stale, timeout=25)
                silent = time.monotonic() - stopped
                chat = await sb.get_active_llm_provider("chat")  # from the last copy
                assert chat is not None and chat.id == "a" and chat.stale
            finally:
                os.kill(pid, signal.SIGCONT)
            assert silent < 20, f"stale after {silent:.1f} s"
            await eventually(lambda: not sb.stale, timeout=25)  # it catches up by itself


# -- the event stream across replicas ---------------------------------------------------------------


async def test_the_event_stream_starts_over_on_another_replica(
    sops_project: SopsProject, age_identity: AgeIdentity, tmp_path: Path
) -> None:
    """Moved to another replica, the stream resumed with the first one's seq: that replica
    replayed its own old history after it as new (and a log shorter than the seq skipped
    events). On a change of `X-Switchboard-Replica` it starts over there, from now."""
    project_with_route(sops_project)
    other = copy_project(sops_project, age_identity, tmp_path / "replica-b")
    async with serve(sops_project, replica="a") as a, serve(other, replica="b") as b:
        for port in (7101, 7102, 7103, 7104, 7105):  # b's log is longer: history after a's last seq
            await applied(b, port)
        a_last, b_before = a.events()[-1].seq, b.events()[-1].seq
        assert a_last < b_before
        seen: list[Event] = []
        # Its own session, not started: no held question of the copy to tell from the stream.
        async with Proxy(a.url) as proxy, aiohttp.ClientSession() as http:
            sb = Switchboard(proxy.url, backoff_s=(0.05, 0.2), session=http)
            reader = asyncio.create_task(_read(sb.events(after=0), seen))
            try:
                await eventually(lambda: bool(seen) and seen[-1].seq == a_last, timeout=10)
                after_switch = len(seen)
                proxy.backends = [b.url]
                proxy.cut()  # the balancer moves the client: the stream is broken, and reopened on b
                await eventually(lambda: b.app[CHANGES].held == 1, timeout=10)
                await applied(b, 7301)
                await eventually(lambda: any(e.type == "provider.updated" for e in seen[after_switch:]))
            finally:
                reader.cancel()
    new = seen[after_switch:]
    assert all(e.seq > b_before for e in new), [(e.seq, e.type) for e in new]
    updated = [e for e in new if e.type == "provider.updated"]
    assert [e.subject for e in updated] == ["a"]
    assert updated[0].data["changes"]["base_url"]["new"].endswith(":7301/v1")


async def _read(stream: AsyncIterator[Event], seen: list[Event]) -> None:
    async for event in stream:
        seen.append(event)


# -- services that misbehave -----------------------------------------------------------------------

ROUTES = b'{"purposes": {"chat": {"primary": [{"id": "a", "base_url": "http://x/v1"}], "fallbacks": []}}}'


def hand_written(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    app = web.Application()
    app.router.add_get(API + "/active", handler)
    return app


@pytest.mark.parametrize(
    "tag",
    [
        'W/"same"',  # the same tag forever, ignoring If-None-Match and wait
        None,  # no tag at all
        "x" * 5000,  # longer than any tag: not sent back
        'W/"\u00e9t\u00e9"',  # not ASCII: not sent back
    ],
)
async def test_a_service_answering_at_once_with_nothing_new_is_asked_once_per_wait(tag: str | None) -> None:
    questions: list[dict[str, str]] = []

    async def active(request: web.Request) -> web.StreamResponse:
        questions.append(dict(request.headers))
        headers = {"ETag": tag} if tag else {}
        return web.Response(body=ROUTES, content_type="application/json", headers=headers)

    async with serving(hand_written(active)) as url, Switchboard(url, wait_s=1, backoff_s=(0.05, 1)) as sb:
        chat = await sb.get_active_llm_provider("chat")
        assert chat is not None and chat.id == "a"
        await asyncio.sleep(4)
        assert not sb.stale
    # a pause growing to `wait` (0.05, 0.1, 0.2, 0.4, 0.8, then 1 s): not a loop
    assert len(questions) <= 12, len(questions)
    sent = {q.get("If-None-Match") for q in questions[1:]}
    assert sent == ({tag} if tag == 'W/"same"' else {None})


async def test_a_service_that_hangs_mid_answer_makes_the_copy_stale() -> None:
    """Headers and half a body, then nothing: the whole answer is due within `wait + grace`."""
    answered = 0

    async def active(request: web.Request) -> web.StreamResponse:
        nonlocal answered
        answered += 1
        if answered == 1:
            return web.Response(body=ROUTES, content_type="application/json", headers={"ETag": '"1"'})
        response = web.StreamResponse(headers={"Content-Type": "application/json", "ETag": '"2"'})
        response.content_length = len(ROUTES)
        await response.prepare(request)
        await response.write(ROUTES[:10])
        await asyncio.sleep(60)
        return response

    async with serving(hand_written(active)) as url, Switchboard(url, wait_s=1, grace_s=0.5) as sb:
        await sb.get_active_llm_provider("chat")
        started = time.monotonic()
        await eventually(lambda: sb.stale, timeout=5)
        assert time.monotonic() - started < 3
        chat = await sb.get_active_llm_provider("chat")
        assert chat is not None and chat.id == "a" and chat.stale


async def test_a_304_to_a_question_without_a_tag_is_not_a_copy() -> None:
    async def active(request: web.Request) -> web.StreamResponse:
        return web.Response(status=304)

    async with serving(hand_written(active)) as url, Switchboard(url, backoff_s=(0.05, 0.1)) as sb:
        await asyncio.sleep(0.5)
        assert sb.stale and sb.version == 0


async def test_a_service_answering_at_once_with_news_every_time_is_not_a_loop() -> None:
    """Each answer differs (a field that moves on every read), and comes back at once: each is
    news, and news at once was asked again at once, forever."""
    questions = 0

    async def active(request: web.Request) -> web.StreamResponse:
        nonlocal questions
        questions += 1
        body = ROUTES.replace(b"http://x/v1", f"http://x{questions}/v1".encode())
        return web.Response(body=body, content_type="application/json", headers={"ETag": f'"{questions}"'})

    async with serving(hand_written(active)) as url, Switchboard(url, wait_s=1, backoff_s=(0.05, 1)) as sb:
        await sb.get_active_llm_provider("chat")
        await asyncio.sleep(3)
    assert questions <= 12, questions


async def test_changes_every_few_tenths_of_a_second_each_reach_the_copy_without_a_pause() -> None:
    """Each question held until a change comes, a few tenths of a second later (an operator
    saving file after file, health confirmed after a change): each is news delivered by a held
    question, not a loop. Counted as answers at once, they grew a pause to `wait`, and changes
    reached the copy up to `wait` late (bench.consumers: p50 13.6 s behind three replicas)."""
    questions = 0

    async def active(request: web.Request) -> web.StreamResponse:
        nonlocal questions
        questions += 1
        if "wait" in request.query:
            await asyncio.sleep(0.3)  # held until the next change
        body = ROUTES.replace(b"http://x/v1", f"http://x{questions}/v1".encode())
        return web.Response(body=body, content_type="application/json", headers={"ETag": f'"{questions}"'})

    async with serving(hand_written(active)) as url, Switchboard(url, wait_s=2, backoff_s=(0.05, 1)) as sb:
        await sb.get_active_llm_provider("chat")
        await asyncio.sleep(3)
        late = questions - int((await sb.get_active_llm_provider("chat")).base_url[8:-3])  # type: ignore[union-attr]
    assert questions >= 8, questions  # one per change, about 0.3 s each: no pause grew
    assert late <= 1


async def test_a_service_that_holds_again_after_quick_answers_is_not_stale_meanwhile() -> None:
    """After answers at once the pause grows to `wait`; the next question may then be held for
    `wait`: the time since the last answer passes `wait + grace` with a question in flight
    that is not late. `stale` said true then."""
    questions = 0

    async def active(request: web.Request) -> web.StreamResponse:
        nonlocal questions
        questions += 1
        if questions > 6 and "wait" in request.query:
            await asyncio.sleep(0.9)  # held, nearly `wait`
        return web.Response(body=ROUTES, content_type="application/json", headers={"ETag": '"1"'})

    async with serving(hand_written(active)) as url, Switchboard(url, wait_s=1, grace_s=0.3) as sb:
        await sb.get_active_llm_provider("chat")
        await eventually(lambda: questions > 6, timeout=10)
        seen = set()
        for _ in range(200):
            seen.add(sb.stale)
            await asyncio.sleep(0.01)
    assert seen == {False}


async def test_a_balancer_that_cuts_held_questions_is_followed_without_a_loop(
    sops_project: SopsProject, age_identity: AgeIdentity, tmp_path: Path
) -> None:
    """The balancer moves the client mid-hold (its connection closed): the question is asked
    again on the next replica, with the same tag, and a change still reaches the copy."""
    project_with_route(sops_project)
    other = copy_project(sops_project, age_identity, tmp_path / "replica-b")
    async with (
        serve(sops_project, replica="a") as a,
        serve(other, replica="b") as b,
        Proxy(a.url, b.url) as proxy,
        Switchboard(proxy.url, wait_s=5, backoff_s=(0.05, 0.2)) as sb,
    ):
        await sb.get_active_llm_provider("chat")
        for _ in range(5):
            await eventually(lambda: a.app[CHANGES].held + b.app[CHANGES].held == 1, timeout=10)
            proxy.cut()
        await eventually(lambda: a.app[CHANGES].held + b.app[CHANGES].held == 1, timeout=10)
        assert len(proxy.held_questions()) <= 10
        await eventually(lambda: not sb.stale, timeout=5)
        version = sb.version
        await asyncio.gather(applied(a, 7401), applied(b, 7401))
        await sb.wait_for_change(version, timeout_s=10)
        chat = await sb.get_active_llm_provider("chat")
        assert chat is not None and chat.base_url.endswith(":7401/v1") and not chat.stale


async def test_by_default_the_held_question_is_the_tag_with_wait_15s_due_within_18_s() -> None:
    """docs/reference.md §11: its held query is `If-None-Match` with `wait=15s` and a read timeout
    of about 18 s, never a replica's index; the tag sent back is the one given, as it was given."""
    questions: list[tuple[str, str | None]] = []
    tag = 'W/"-.-.0123abcd"'

    async def active(request: web.Request) -> web.StreamResponse:
        questions.append((request.path_qs, request.headers.get("If-None-Match")))
        if len(questions) == 1:
            return web.Response(body=ROUTES, content_type="application/json", headers={"ETag": tag})
        await asyncio.sleep(30)  # held: the client's own timeout ends it
        return web.Response(status=304, headers={"ETag": tag})

    async with serving(hand_written(active)) as url, Switchboard(url) as sb:
        assert (await sb.get_active_llm_provider("chat")) is not None
        await eventually(lambda: len(questions) == 2)
        assert questions == [(f"{API}/active", None), (f"{API}/active?wait=15s", tag)]
        assert (sb.wait_s, sb.wait_s + sb.grace_s) == (15, 18) and not sb.stale


@pytest.mark.parametrize(
    ("wait_s", "sent"), [(0.00001, "1ms"), (1.5, "1500ms"), (300, "300s"), (0.25, "250ms")]
)
async def test_the_held_question_says_its_wait_in_a_form_the_service_reads(wait_s: float, sent: str) -> None:
    """A `wait_s` of any size the service holds is sent as `Ns` or `Nms` (`{:g}` made `1e-05s`,
    which the service refuses with 400, and the client then asked again and again)."""
    questions: list[str] = []
    tag = 'W/"-.-.0123abcd"'

    async def active(request: web.Request) -> web.StreamResponse:
        questions.append(request.path_qs)
        if len(questions) == 1:
            return web.Response(body=ROUTES, content_type="application/json", headers={"ETag": tag})
        await asyncio.sleep(30)
        return web.Response(status=304, headers={"ETag": tag})

    async with serving(hand_written(active)) as url, Switchboard(url, wait_s=wait_s) as sb:
        assert (await sb.get_active_llm_provider("chat")) is not None
        await eventually(lambda: len(questions) >= 2)
        assert questions[1] == f"{API}/active?wait={sent}"
        parse_wait(sent)  # the service's own reading takes it


def test_a_wait_longer_than_the_service_holds_is_refused_when_the_client_is_made() -> None:
    with pytest.raises(ValueError, match="at most 300"):
        Switchboard("http://127.0.0.1:1", wait_s=301)


@pytest.mark.parametrize("times", [{"wait_s": math.nan}, {"grace_s": math.nan}])
def test_a_wait_that_is_no_number_is_refused_when_the_client_is_made(times: dict[str, float]) -> None:
    """NaN passed `<= 0` and `> 300` alike: made, the client failed at its first held question
    (`round(nan)`), in the task that watches, where nobody reads the error."""
    with pytest.raises(ValueError, match="positive"):
        Switchboard("http://127.0.0.1:1", **times)

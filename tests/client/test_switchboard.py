"""The Python client (docs/reference.md §11) against a real service: the old interface, kept
current by push."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web

from service.cli.main import cli
from service.client import Forbidden, ModelRequired, NotFound, Switchboard, Unavailable
from service.config.export import litellm_config
from service.config.snapshot import load_folder
from service.http.context import RELOADER
from service.journal.reader import read_events
from tests.conftest import (
    AgeIdentity,
    SopsProject,
    eventually,
    git,
    git_init,
    serve,
    write_routing,
    write_server,
)
from tests.support.gateway import CANARY, write_clients, write_provider
from tests.support.gateway import write_routing as write_routing_of
from tests.support.upstreams import FakeUpstream, closed_port_url, serving


def project_with_route(project: SopsProject, *, key: bool = False) -> None:
    write_server(project, "a", base_url="http://127.0.0.1:9/v1")
    write_server(project, "b", base_url="http://127.0.0.1:10/v1")
    write_server(project, "c", base_url="http://127.0.0.1:11/v1")
    if key:
        write_provider(project, "k", provider="openai", base_url="http://127.0.0.1:12/v1", api_key=CANARY)
    write_routing(project, ["a", "b"], fallbacks=["c"])


async def test_the_old_interface_answers_from_a_copy_kept_current(sops_project: SopsProject) -> None:
    project_with_route(sops_project)
    async with serve(sops_project) as service, Switchboard(service.url) as sb:
        chat = await sb.get_active_llm_provider("chat")
        assert chat is not None and (chat.id, chat.role, chat.stale) == ("a", "primary", False)
        backup = await sb.get_fallback_provider(chat)
        assert backup is not None and backup.id == "b"
        last = await sb.get_fallback_provider(backup)
        assert last is not None and (last.id, last.role) == ("c", "fallback")
        assert await sb.get_fallback_provider(last) is None
        with pytest.raises(NotFound):
            await sb.get_active_llm_provider("reranking")
        # A change is seen without asking again: the held query brings it.
        version = sb.version
        write_routing(sops_project, ["b"], fallbacks=["a"])
        started = time.monotonic()
        await sb.wait_for_change(version, timeout_s=10)
        assert time.monotonic() - started < 2
        chat = await sb.get_active_llm_provider("chat")
        assert chat is not None and chat.id == "b"


async def test_unhealthy_candidates_are_skipped(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="c") as c:
        write_server(sops_project, "a", base_url="http://127.0.0.1:9/v1")  # nobody listens
        write_server(sops_project, "c", base_url=c.base_url)
        write_routing(sops_project, ["a"], fallbacks=["c"])
        async with serve(sops_project) as service, Switchboard(service.url) as sb:
            for _ in range(2):  # a status change is pushed once confirmed (SWITCHBOARD_HEALTH_CONFIRM=2)
                result = await sb.test_provider("a")
                assert not result.ok and "cannot connect" in result.message
            await eventually(lambda: _first_is(sb, "c"), timeout=10)


async def test_with_no_healthy_candidate_there_is_no_fallback_and_health_says_why(
    sops_project: SopsProject,
) -> None:
    """docs/reference.md §11's example passes what `get_active_llm_provider` gave to
    `get_fallback_provider`: None when no candidate is healthy, and then there is no next one
    (it raised AttributeError). A provider's health is what §6 shows: `reason` and `circuit` too."""
    project_with_route(sops_project)  # a, b and c on ports nobody listens on
    async with serve(sops_project) as service, Switchboard(service.url) as sb:
        for provider_id in "abc":  # the first result after `unknown` is adopted at once
            assert not (await sb.test_provider(provider_id)).ok

        async def none_healthy() -> None:
            assert await sb.get_active_llm_provider("chat") is None

        await eventually(none_healthy, timeout=10)
        assert await sb.get_fallback_provider(None) is None
        for provider in (await sb.route("chat")).candidates:
            health = provider.health
            assert health.status == "unhealthy" and health.reason and "cannot connect" in health.reason
            assert health.circuit in ("closed", "open", "half_open")


async def _first_is(sb: Switchboard, provider_id: str, *, stale: bool | None = None) -> None:
    chat = await sb.get_active_llm_provider("chat")
    assert chat is not None and chat.id == provider_id
    assert stale is None or chat.stale is stale


async def test_exports_match_switchboard_export(sops_project: SopsProject) -> None:
    project_with_route(sops_project, key=True)
    snapshot = load_folder(sops_project.providers, "providers.d")
    exported = {
        d["model_info"]["switchboard_provider"]: d["litellm_params"]
        for d in litellm_config(snapshot)["model_list"]
    }
    async with serve(sops_project) as service, Switchboard(service.url) as sb:
        chat = await sb.get_active_llm_provider("chat")
        assert chat is not None
        assert chat.to_litellm_config() == exported["a"] == snapshot.providers["a"].to_litellm_config()
        assert chat.to_wilmer_config() == snapshot.providers["a"].to_wilmer_config()
        providers = {p.id: p for p in await sb.providers()}
        assert providers["k"].to_litellm_config() == snapshot.providers["k"].to_litellm_config()
        assert providers["k"].api_key == "****" + CANARY[-4:]
        assert CANARY not in json.dumps(providers["k"].raw)


def _every_kind_of_provider(project: SopsProject) -> None:
    """A server and a key priced (an entry of its own, and `*`), a key and a server that declare
    no models, an Anthropic key (translated; WilmerAI's `Claude`), an embeddings server."""
    write_provider(
        project,
        "gpu",
        base_url="http://127.0.0.1:9/v1",
        models=["fake-model"],
        pricing={
            "*": {"input": 1, "output": 2},
            "fake-model": {"input": 3, "cached_input": 1.5, "cache_write": 4},
        },
    )
    write_provider(
        project,
        "vendor",
        provider="openai",
        base_url="http://127.0.0.1:10/v1",
        api_key=CANARY,
        models=["m1", "m2"],
        model_map={"fast": "m1"},
        pricing={"*": {"input": "0.15", "output": "0.6", "cached_input": "0.075"}, "m2": {"output": 10}},
    )
    write_provider(project, "claude", provider="anthropic", api_key=CANARY, name="Claude")
    write_provider(project, "any", base_url="http://127.0.0.1:11/v1")
    write_provider(
        project, "embedder", server_type="tei", base_url="http://127.0.0.1:12", purposes=["embeddings"]
    )
    write_routing_of(
        project,
        chat={"primary": ["gpu", "vendor"], "fallbacks": ["claude", "any"]},
        embeddings="embedder",
    )


async def test_exports_match_switchboard_export_for_every_kind_of_provider(
    sops_project: SopsProject,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _every_kind_of_provider(sops_project)
    monkeypatch.chdir(sops_project.root)
    assert cli("export", "litellm") == 0
    exported = yaml.safe_load(capsys.readouterr().out)["model_list"]
    assert cli("export", "wilmer", "--out", str(tmp_path / "wilmer")) == 0
    wilmer = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "wilmer").iterdir()}
    async with serve(sops_project) as service, Switchboard(service.url) as sb:
        providers = {p.id: p for p in await sb.providers()}
        route = [*(await sb.route("chat")).candidates, *(await sb.route("embeddings")).candidates]
    assert sorted(providers) == sorted(p.id for p in route) == ["any", "claude", "embedder", "gpu", "vendor"]
    priced = 0
    for deployment in exported:
        pid = deployment["model_info"]["switchboard_provider"]
        name = deployment["model_name"].removeprefix(f"{pid}/")  # a provider's own `<id>/<model>`
        model = None if name == "*" else name
        for provider in (providers[pid], *(p for p in route if p.id == pid)):
            assert provider.to_litellm_config(model) == deployment["litellm_params"], (pid, model)
        params = deployment["litellm_params"]
        priced += any(name.endswith(("_cost_per_token", "_token_cost")) for name in params)
    assert priced == 4  # gpu's fake-model, vendor's m1, m2 (its own entry) and fast: prices compared too
    by_id = {d["model_info"]["switchboard_provider"]: d["litellm_params"] for d in exported}
    # Without a model: the first declared one (no `*` where the provider declares models), as
    # the export lists it and `litellm_params(purpose)` names it; `*` for one that declares none.
    assert providers["vendor"].to_litellm_config()["model"] == "openai/m1"
    assert providers["gpu"].to_litellm_config() == by_id["gpu"]
    assert providers["any"].to_litellm_config()["model"] == "openai/*"
    for pid, provider in providers.items():
        assert provider.to_wilmer_config() == wilmer.get(pid), pid
    assert sorted(wilmer) == ["any", "claude", "embedder", "gpu", "vendor"]
    shown = json.dumps([[p.to_litellm_config(), p.to_wilmer_config(), p.raw] for p in providers.values()])
    assert CANARY not in shown and CANARY[-12:] not in shown


async def test_litellm_params_name_the_model_mapped_and_need_secrets_read(sops_project: SopsProject) -> None:
    # A key that declares no models (it serves any), with an alias: the model must be named.
    write_provider(
        sops_project,
        "k",
        provider="openrouter",
        base_url="http://127.0.0.1:12/v1",
        api_key=CANARY,
        model_map={"fast": "openai/gpt-4o-mini"},
    )
    write_routing(sops_project, ["k"])
    write_clients(
        sops_project, {"app": ("tok-app", ["config:read", "secrets:read"]), "ro": ("tok-ro", ["config:read"])}
    )
    async with serve(sops_project) as service:
        async with Switchboard(service.url, token="tok-app") as sb:
            params = await sb.litellm_params("chat", model="fast")
            assert params["api_key"] == CANARY and params["model"] == "openrouter/openai/gpt-4o-mini"
            params = await sb.litellm_params("chat", model="meta-llama/llama-3.3-70b")
            assert params["model"] == "openrouter/meta-llama/llama-3.3-70b"
            with pytest.raises(ModelRequired, match=r"litellm_params\('chat', model=\.\.\.\)") as refused:
                await sb.litellm_params("chat")
            assert refused.value.status == 400 and isinstance(refused.value, ValueError)
            assert "*" not in str(refused.value)
        async with Switchboard(service.url, token="tok-ro") as sb:
            with pytest.raises(Forbidden):
                await sb.litellm_params("chat", model="fast")
            with pytest.raises(Forbidden):
                await sb.test_provider("k")
    reads = [e for e in read_events(service.events_file) if e.type == "secret.read"]
    assert [(e.subject, e.client) for e in reads] == [("k", "app"), ("k", "app")]  # refusals give no key


async def test_litellm_params_of_a_provider_that_declares_models(sops_project: SopsProject) -> None:
    write_provider(
        sops_project,
        "k",
        provider="openai",
        base_url="http://127.0.0.1:12/v1",
        api_key=CANARY,
        models=["m1", "m2"],
    )
    write_routing(sops_project, ["k"])
    async with serve(sops_project) as service, Switchboard(service.url) as sb:
        assert (await sb.litellm_params("chat"))["model"] == "openai/m1"  # the first it declares
        assert (await sb.litellm_params("chat", model="m2"))["model"] == "openai/m2"
        with pytest.raises(NotFound, match="serves model 'm3'"):
            await sb.litellm_params("chat", model="m3")
        with pytest.raises(ValueError, match="model"):
            await sb.litellm_params("chat", model="")


async def test_the_client_outlives_a_restart_answering_stale_meanwhile(sops_project: SopsProject) -> None:
    project_with_route(sops_project)
    async with serve(sops_project) as first:
        port = int(first.url.rsplit(":", 1)[1])
        sb = Switchboard(first.url, backoff_s=(0.05, 0.2))
        await sb.start()
        assert (await sb.get_active_llm_provider("chat")).id == "a"  # type: ignore[union-attr]
    # The service is gone: answers come from the last copy, marked stale.
    await eventually(lambda: sb.stale, timeout=10)
    chat = await sb.get_active_llm_provider("chat")
    assert chat is not None and chat.id == "a" and chat.stale
    write_routing(sops_project, ["c"])  # changed while it was down
    async with serve(sops_project, port=port) as second:
        assert second.url.endswith(f":{port}")
        await eventually(lambda: _first_is(sb, "c", stale=False), timeout=15)
    await sb.close()


async def test_while_the_service_is_down_the_copy_answers_and_the_rest_is_unavailable(
    sops_project: SopsProject,
) -> None:
    """The service gone after a copy was taken: the route's answers come from the copy (stale,
    fallbacks included), and what needs the service now (`litellm_params`, `test_provider`,
    `providers`) raises `Unavailable` at once, neither hanging nor returning made-up data."""
    project_with_route(sops_project)
    async with serve(sops_project) as service:
        sb = Switchboard(service.url, backoff_s=(0.05, 0.2), request_timeout_s=5)
        await sb.start()
        chat = await sb.get_active_llm_provider("chat")
        assert chat is not None and not chat.stale
    try:
        await eventually(lambda: sb.stale, timeout=10)
        chat = await sb.get_active_llm_provider("chat")
        backup = await sb.get_fallback_provider(chat)  # type: ignore[arg-type]
        assert chat is not None and backup is not None and (chat.id, backup.id) == ("a", "b")
        assert chat.stale and backup.stale
        for call in (
            lambda: sb.litellm_params("chat", model="m"),
            lambda: sb.test_provider("a"),
            lambda: sb.providers(),
        ):
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await call()
            assert time.monotonic() - started < 3
    finally:
        await sb.close()


def commit_all(project: SopsProject, message: str) -> str:
    git(project.root, "add", "-A")
    git(project.root, "commit", "-qm", message)
    return git(project.root, "rev-parse", "HEAD")


async def test_a_copys_commit_is_the_one_its_answer_was_served_at(sops_project: SopsProject) -> None:
    """docs/reference.md §11: a commit that touches nothing in `providers.d/` is no news to the
    copy (its tag is the same, the question stays held), so `commit` stays the one the copy was
    taken at, whose files are what it shows; the next change brings the commit then served."""
    git_init(sops_project.root)
    (sops_project.root / ".gitignore").write_text("var/\n")
    project_with_route(sops_project)
    setup = commit_all(sops_project, "setup")
    async with serve(sops_project) as service, Switchboard(service.url) as sb:
        route = await sb.route("chat")
        assert route.commit == setup and {p.commit for p in route.candidates} == {setup}
        version = sb.version
        (sops_project.root / "README.md").write_text("not configuration\n")
        readme = commit_all(sops_project, "a readme")
        await service.app[RELOADER].reload()
        assert service.registry.state.last_applied_commit == readme
        with pytest.raises(TimeoutError):
            await sb.wait_for_change(version, timeout_s=1)
        route = await sb.route("chat")
        assert route.commit == setup and {p.commit for p in route.candidates} == {setup}
        assert not route.primary[0].stale
        write_server(sops_project, "c", base_url="http://127.0.0.1:13/v1")
        moved = commit_all(sops_project, "move c")
        await service.app[RELOADER].reload()
        await sb.wait_for_change(version, timeout_s=10)
        route = await sb.route("chat")
        assert route.commit == moved and {p.commit for p in route.candidates} == {moved}


async def test_no_copy_yet_is_unavailable(tmp_path: Path) -> None:
    async with Switchboard("http://127.0.0.1:9", backoff_s=(0.05, 0.1)) as sb:
        with pytest.raises(Unavailable):
            await sb.get_active_llm_provider("chat", timeout_s=0.3)


async def test_events_resume_after_a_disconnect(sops_project: SopsProject) -> None:
    project_with_route(sops_project)
    async with serve(sops_project) as first:
        port = int(first.url.rsplit(":", 1)[1])
        async with Switchboard(first.url, backoff_s=(0.05, 0.2)) as sb:
            stream = sb.events(after=0)
            seen = [await asyncio.wait_for(anext(stream), 10)]
            await first.stop()
            write_server(sops_project, "b", base_url="http://127.0.0.1:7777/v1")
            async with serve(sops_project, port=port):
                while not any(e.type == "provider.updated" and e.subject == "b" for e in seen):
                    seen.append(await asyncio.wait_for(anext(stream), 15))
            await stream.aclose()
    seqs = [e.seq for e in seen]
    assert seqs == sorted(set(seqs)), "no event twice, in order"
    logged = [e.seq for e in first.events()]
    assert seqs == logged[: len(seqs)], "no gap"


async def test_events_bigger_than_aiohttps_line_limit_arrive(sops_project: SopsProject) -> None:
    """An event's `data:` line is the whole event: a provider listing 20,000 models (a file
    under the 1 MiB limit) makes one of ~700 KB, over aiohttp's `readline` limit (128 or 512
    KiB, by version), whose LineTooLong ended `events()` for good."""
    project_with_route(sops_project)
    models = [f"org/model-{i:05d}-with-a-long-name" for i in range(20000)]
    write_provider(sops_project, "big", base_url="http://127.0.0.1:13/v1", models=models)
    async with serve(sops_project) as service, Switchboard(service.url) as sb:
        stream = sb.events(after=0)
        seen = [await asyncio.wait_for(anext(stream), 10)]
        while not (seen[-1].type == "provider.added" and seen[-1].subject == "big"):
            seen.append(await asyncio.wait_for(anext(stream), 10))
        await stream.aclose()
    assert seen[-1].data["changes"]["models"]["new"] == models


# -- services that misbehave ------------------------------------------------------------------------


class Balancer:
    """A load balancer in front of replicas: each request goes to the next one in turn (no
    session affinity), or gets `garbage` (a 200 JSON answer of another shape) while any is left."""

    def __init__(self, *backends: str) -> None:
        self.backends = backends
        self.garbage: list[Any] = []
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Balancer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.close()
        assert self._runner is not None
        await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.garbage:
            return web.json_response(self.garbage.pop(0), headers={"X-Switchboard-Index": "1"})
        backend = self.backends[self.requests % len(self.backends)]
        async with self._http.get(backend + request.path_qs, headers=request.headers) as answer:
            body = await answer.read()
            kept = {
                k: v
                for k, v in answer.headers.items()
                if k.lower().startswith(("x-switchboard", "content-type"))
            }
            return web.Response(body=body, status=answer.status, headers=kept)


async def test_a_service_that_answers_garbage_leaves_the_client_stale_not_stopped(
    sops_project: SopsProject,
) -> None:
    """An answer of another shape raised AttributeError or KeyError in the background task,
    which ended: the copy was never refreshed again, and never said stale."""
    project_with_route(sops_project)
    async with serve(sops_project) as service, Balancer(service.url) as balancer:
        balancer.garbage = [[], {"purposes": {"chat": "x"}}, {"purposes": {"chat": {"primary": [{}]}}}]
        async with Switchboard(balancer.url, backoff_s=(0.01, 0.05)) as sb:
            await eventually(lambda: _first_is(sb, "a"), timeout=10)
            assert not sb.stale
            write_routing(sops_project, ["b"])
            await eventually(lambda: _first_is(sb, "b"), timeout=10)


async def test_replicas_that_alternate_do_not_make_a_loop_of_immediate_answers(
    sops_project: SopsProject, age_identity: AgeIdentity, tmp_path: Path
) -> None:
    """Behind a balancer without affinity each answer came from the other replica, whose index
    meant nothing to this one: answered at once, every time, as fast as the client could ask."""
    project_with_route(sops_project)
    other_root = tmp_path / "replica-b"
    shutil.copytree(sops_project.root, other_root)
    other = SopsProject(other_root, other_root / "providers.d", sops_project.sops, age_identity)
    async with serve(sops_project, replica="a") as a, serve(other, replica="b") as b:
        for port in (7101, 7102, 7103):  # b's index is ahead of a's
            write_server(other, "c", base_url=f"http://127.0.0.1:{port}/v1")
            await eventually(
                lambda port=port: b.registry.snapshot.providers["c"].endpoint.endswith(f"{port}/v1")
            )
        async with Balancer(a.url, b.url) as balancer, Switchboard(balancer.url, backoff_s=(0.05, 1)) as sb:
            await sb.get_active_llm_provider("chat")
            before = balancer.requests
            await asyncio.sleep(2)
            asked = balancer.requests - before
    assert asked < 20, f"{asked} requests in 2 s"


async def test_an_event_stream_that_ends_at_once_is_reopened_with_backoff() -> None:
    """A service (or a proxy) that answers the stream and closes it at once was asked again
    every ~50 ms forever: an answer counted as success, and reset the backoff."""
    opened = 0

    async def empty(request: web.Request) -> web.StreamResponse:
        nonlocal opened
        opened += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": connected\n\n")
        return response

    app = web.Application()
    app.router.add_get("/api/v1/llm-config/events", empty)
    async with serving(app) as url, Switchboard(url, backoff_s=(0.05, 1)) as sb:
        stream = sb.events()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(anext(stream), 2)
        await stream.aclose()
    # Reset at every answer, it was ~40 in 2 s; with the backoff (full jitter, so a run of
    # short draws is possible: 12 was seen once) about 7.
    assert opened < 20, f"{opened} streams opened in 2 s"


async def test_an_event_stream_waits_out_a_service_that_is_down_and_ends_at_aclose() -> None:
    """`events()` with nothing listening raises nothing: `async for` waits, reopening with
    backoff, and reads the first event once the service is up (the `Last-Event-ID` it was given
    sent); `aclose()` then ends it, and a stream closed before its first read ends too."""
    asked: list[str | None] = []

    async def one_event(request: web.Request) -> web.StreamResponse:
        asked.append(request.headers.get("Last-Event-ID"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'id: 8\nevent: service.started\ndata: {"seq": 8}\n\n')
        await asyncio.sleep(30)  # held open, as the service's is
        return response

    down = urlsplit(closed_port_url())
    async with Switchboard(f"http://{down.netloc}", backoff_s=(0.01, 0.05)) as sb:
        stream = sb.events(after=7)
        reading = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)  # refused, again and again
        assert not reading.done()
        app = web.Application()
        app.router.add_get("/api/v1/llm-config/events", one_event)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, down.hostname, down.port).start()
        try:
            event = await asyncio.wait_for(reading, 5)
            assert (event.seq, event.type) == (8, "service.started") and asked == ["7"]
            await stream.aclose()
            with pytest.raises(StopAsyncIteration):
                await anext(stream)
            unread = sb.events()
            await unread.aclose()
            with pytest.raises(StopAsyncIteration):
                await anext(unread)
        finally:
            await runner.cleanup()


async def test_an_events_data_is_the_whole_logged_event(sops_project: SopsProject) -> None:
    """`events()` without `after` gives events from then on; each `.data` is the event's whole
    JSON object (docs/reference.md §11), `.seq`, `.type` and `.subject` read from it."""
    project_with_route(sops_project)
    async with serve(sops_project) as service, Switchboard(service.url) as sb:
        stream = sb.events()
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)  # the stream is open, from now on
        assert not first.done()
        write_server(sops_project, "b", base_url="http://127.0.0.1:7778/v1")
        event = await asyncio.wait_for(first, 10)
        await stream.aclose()
    logged = {e.seq: e for e in read_events(service.events_file)}
    assert (event.type, event.subject) == ("provider.updated", "b")
    assert event.data == logged[event.seq].model_dump(mode="json")
    assert (event.data["seq"], event.data["type"], event.data["subject"]) == (
        event.seq,
        event.type,
        event.subject,
    )

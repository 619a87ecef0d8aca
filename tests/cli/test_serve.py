"""`switchboard serve`'s own preparations (the service it starts is tested under tests/http)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import resource
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web

from service.cli.serve import OPEN_FILES, event_loop, serving_app
from service.http import collector
from service.http.collector import YOUNG_ALLOCATIONS, settled_collector
from service.http.context import REGISTRY
from service.settings import Settings
from tests.conftest import (
    AgeIdentity,
    SopsProject,
    eventually,
    git,
    git_init,
    write_atomically,
    write_key,
    write_routing,
    write_server,
)
from tests.support.replicas import Replica, free_port, replica_env, replicas


def test_serve_raises_a_low_open_file_limit_towards_the_hard_one() -> None:
    """The upstream pools are limited per upstream, not in total: a soft limit of 1,024 open
    files would refuse connections long before the pools are full."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = (
        "import resource\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from service.cli.serve import raise_open_files_limit\n"
        "raise_open_files_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    expected = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    assert int(done.stdout) == max(256, expected)


def test_serve_runs_on_uvloop() -> None:
    """uvloop spends fewer instructions per relayed request than asyncio's own loop
    (BENCHMARKS.md, issue 22); it is a dependency, so `serve` runs on it."""
    loop = event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


def _served(project: SopsProject) -> Settings:
    """A project with one server routed for chat, and the settings `serve` would run it with."""
    write_server(project, "gpu")
    write_routing(project, ["gpu"])
    return Settings(
        root=project.root,
        providers=project.providers,
        events=project.root / "var" / "events.jsonl",
        port=0,
        age_key_file=project.identity.key_file,
        health_interval_s=0,
    )


async def test_serve_freezes_what_the_start_left_once_the_first_configuration_is_loaded(
    sops_project: SopsProject, caplog: pytest.LogCaptureFixture
) -> None:
    """A full collection walks every object the collector tracks: ~90k after a start, which
    stopped the service for 50-160 ms on the benchmark machine (BENCHMARKS.md, issue 22).
    `serve` freezes them once the first configuration is loaded, and says so in its log."""
    settings = _served(sops_project)
    before = gc.get_threshold()
    caplog.set_level(logging.INFO, logger="service.http.app")
    app = serving_app(settings)
    assert settled_collector in app.cleanup_ctx
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    try:
        await runner.setup()

        def frozen() -> None:
            assert app[REGISTRY].state.ready
            assert gc.get_freeze_count() > 10_000

        await eventually(frozen, timeout=20)
        assert any(r.getMessage().startswith("collector settled: ") for r in caplog.records)
        # the youngest generation is collected less often: the requests in flight, walked fewer times
        assert gc.get_threshold()[0] == YOUNG_ALLOCATIONS
        assert gc.get_threshold()[1:] == before[1:]
    finally:
        await runner.cleanup()
        gc.unfreeze()  # this process starts many services: give them back to the collector
    assert gc.get_threshold() == before  # and the collector as it was


async def test_a_cycle_made_after_the_collector_is_settled_is_freed_on_the_timer(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the youngest generation collected only every 50,000 allocations, a cycle holding a
    large body could wait for thousands of requests. The timer collects the younger
    generations anyway (`YOUNG_PERIOD_S`): such a cycle is freed with little allocated."""
    monkeypatch.setattr(collector, "YOUNG_PERIOD_S", 0.05)
    settings = _served(sops_project)
    app = serving_app(settings)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)

    class Holder:
        pass

    try:
        await runner.setup()
        await eventually(lambda: app[REGISTRY].state.ready and gc.get_freeze_count() > 10_000, timeout=20)
        held = Holder()
        held.body = b"x" * 10_000_000  # type: ignore[attr-defined]
        held.itself = held  # type: ignore[attr-defined]
        gone = weakref.ref(held)
        del held
        assert gone() is not None  # a cycle: its reference count does not free it
        await eventually(lambda: gone() is None, timeout=5)
    finally:
        await runner.cleanup()
        gc.unfreeze()


async def test_reloads_after_the_collector_is_settled_leave_no_frozen_cycle_behind(
    sops_project: SopsProject,
) -> None:
    """What the freeze holds is left out of every collection: should a reload make garbage of
    a cycle of the start (the first snapshot, its providers, a sops file's state), it would be
    kept for good. Reloads of a plaintext file, a sops-encrypted one and a refused one leave
    none of the service's objects unreachable among the frozen."""
    settings = _served(sops_project)
    app = serving_app(settings)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    try:
        await runner.setup()
        registry = app[REGISTRY]
        await eventually(lambda: registry.state.ready and gc.get_freeze_count() > 10_000, timeout=20)
        for i in range(12):
            generation = registry.state.snapshot.generation
            write_server(sops_project, "gpu", base_url=f"http://127.0.0.1:{1000 + i}/v1")
            if i % 4 == 0:
                write_key(sops_project, "gpu-key", f"sk-{i}")
            if i % 4 == 2:
                write_atomically(sops_project.providers / "bad.yaml", f"kind: nonsense{i}\n: [")
            await eventually(lambda g=generation: registry.state.snapshot.generation > g, timeout=10)
        gc.collect()
        gc.unfreeze()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            leaked = [type(o).__module__ for o in gc.garbage if type(o).__module__.startswith("service.")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert leaked == []
    finally:
        await runner.cleanup()
        gc.unfreeze()


# -- SIGTERM with consumers waiting (docs/reference.md §9) ------------------------------------------


async def test_sigterm_answers_held_queries_at_once_and_ends_the_streams(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    """`switchboard serve` stopped by SIGTERM answers each held query at once with 200 and the
    current content (a query held on the current tag as well as one held on the index), and
    ends each event stream, rather than leave consumers hanging until their `wait` runs out."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    api = "/api/v1/llm-config"
    member = Replica(
        "stopping",
        sops_project.root,
        sops_project.providers,
        free_port(),
        replica_env(sops_project.identity.key_file),
        tmp_path,
    )
    async with replicas(member):
        assert member.http is not None
        http = member.http
        async with http.get(member.url + api + "/active/chat") as first:
            tag, index = first.headers["ETag"], first.headers["X-Switchboard-Index"]
        long = aiohttp.ClientTimeout(total=60)

        async def held(path: str, headers: dict[str, str]) -> tuple[int, bytes]:
            async with http.get(member.url + path, headers=headers, timeout=long) as response:
                return response.status, await response.read()

        async def streamed() -> bytes:
            async with http.get(member.url + api + "/events", timeout=long) as response:
                assert response.status == 200
                return await response.read()  # to its end

        queries = [
            asyncio.create_task(held(f"{api}/active/chat?index={index}&wait=300s", {})),
            asyncio.create_task(held(f"{api}/active/chat?wait=300s", {"If-None-Match": tag})),
        ]
        stream = asyncio.create_task(streamed())
        await asyncio.sleep(1)
        assert not any(t.done() for t in [*queries, stream])
        started = time.monotonic()
        await member.stop(signal.SIGTERM)
        answers = await asyncio.wait_for(asyncio.gather(*queries), 15)
        await asyncio.wait_for(stream, 15)
        assert time.monotonic() - started < 12
        for status, body in answers:
            assert status == 200 and json.loads(body)["primary"][0]["id"] == "gpu"
        assert member.process is not None and member.process.returncode == 0, member.log()
        assert "Traceback" not in member.log()


async def test_serve_started_from_another_folder_writes_keys_for_the_providers_repository(
    sops_project: SopsProject, other_age_identity: AgeIdentity, tmp_path: Path
) -> None:
    """`serve --providers DIR` started elsewhere (another checkout, with a `.sops.yaml` of its
    own, as the tests' working directory is): a key written over HTTP is encrypted by the rules
    of the `.sops.yaml` beside DIR, as `validate` reads them, and named `providers.d/…`."""
    root = sops_project.root
    git_init(root)
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    git_init(elsewhere)
    (elsewhere / ".sops.yaml").write_text(
        "creation_rules:\n  - path_regex: providers.d/.*\\.ya?ml$\n"
        f"    encrypted_regex: ^(api_key)$\n    age: {other_age_identity.recipient}\n"
    )
    env = replica_env(sops_project.identity.key_file)
    member = Replica("elsewhere", elsewhere, sops_project.providers, free_port(), env, tmp_path)
    async with replicas(member):
        body = json.dumps({"id": "vendor", "provider": "openai", "api_key": "sk-elsewhere-0123456789"})
        status, answer = await member.post(
            "/api/v1/llm-config/api-keys", body.encode(), **{"Content-Type": "application/json"}
        )
        assert status == 201, answer
        assert answer["file"] == "providers.d/vendor.yaml" and answer["api_key"] == "****6789"
    written = (sops_project.providers / "vendor.yaml").read_text()
    assert sops_project.identity.recipient in written and other_age_identity.recipient not in written
    assert git(root, "status", "--porcelain") == ""

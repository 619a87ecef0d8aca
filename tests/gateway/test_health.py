"""Provider health: circuit breakers, active checks, transitions as events, `switchboard test ID`."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import pytest

from service.cli.test import run as command
from service.gateway.health import CheckResult, Health
from service.http.context import HEALTH
from service.settings import Settings
from tests.conftest import SopsProject
from tests.support.gateway import CANARY, running, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, closed_port_url, upstreams


def test_consecutive_failures_open_the_circuit_and_one_trial_follows_the_cooldown() -> None:
    changes: list[tuple[str, str, str]] = []
    health = Health(failures=2, cooldown_s=0.05)
    health.on_change = lambda pid, old, new, reason: changes.append((pid, old, new))
    health.failed("p", "HTTP 500")
    assert not health.is_open("p") and health.get("p").status == "unknown"
    health.failed("p", "HTTP 500")
    assert health.is_open("p") and not health.admit("p")
    assert health.get("p").status == "unhealthy"
    time.sleep(0.06)
    assert not health.is_open("p")
    assert health.admit("p")  # the one trial
    assert health.is_open("p") and not health.admit("p")
    health.failed("p", "HTTP 500")  # the trial failed: open again
    assert health.is_open("p")
    time.sleep(0.06)
    assert health.admit("p")
    health.succeeded("p", 0.01)
    assert not health.is_open("p") and health.admit("p") and health.admit("p")
    assert health.get("p").status == "healthy" and health.get("p").latency_ms == 10.0
    assert changes == [("p", "unknown", "unhealthy"), ("p", "unhealthy", "healthy")]


def test_a_success_resets_the_count_of_failures() -> None:
    health = Health(failures=2, cooldown_s=10)
    for _ in range(5):
        health.failed("p", "HTTP 500")
        health.succeeded("p", 0.001)
    assert not health.is_open("p")


def test_an_abandoned_trial_frees_the_slot() -> None:
    health = Health(failures=1, cooldown_s=0.01)
    health.failed("p", "timed out")
    time.sleep(0.02)
    assert health.admit("p") and not health.admit("p")
    health.abandon("p")
    assert health.admit("p")


def test_checks_open_circuits_only_for_failures_requests_would_fall_back_on() -> None:
    health = Health(failures=3, cooldown_s=10)
    health.checked("p", CheckResult(False, 1.0, "HTTP 401", opens=False))
    assert health.get("p").status == "unhealthy" and not health.is_open("p")
    health.checked("p", CheckResult(False, 1.0, "cannot connect", opens=True))
    assert health.is_open("p")
    health.checked("p", CheckResult(True, 2.5, "ok"))
    assert not health.is_open("p")
    state = health.get("p")
    assert (state.status, state.latency_ms) == ("healthy", 2.5)
    assert state.as_json()["checked_at"].endswith("Z")  # type: ignore[union-attr]


async def test_a_failing_provider_is_skipped_while_its_circuit_is_open(sops_project: SopsProject) -> None:
    async with upstreams({"name": "flaky"}, {"name": "backup"}) as (flaky, backup):
        flaky.fail(500)
        write_provider(sops_project, "flaky", base_url=flaky.base_url)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "flaky", "fallbacks": ["backup"]})
        async with running(sops_project, circuit_failures=2, circuit_cooldown_s=0.3) as board:
            first = [(await board.chat()).headers["x-switchboard-attempts"] for _ in range(4)]
            assert board.app[HEALTH].get("flaky").status == "unhealthy"
            flaky.answer_normally()
            await asyncio.sleep(0.35)
            trial = await board.chat()
            after = await board.chat()
            await board.recorded()
            changes = board.events("provider.health_changed")
    assert first == ["2", "2", "1", "1"]  # two failures open it; then it is skipped
    assert len(flaky.requests) == 4  # two failures, the trial, and one more once closed
    assert trial.headers["x-switchboard-provider"] == after.headers["x-switchboard-provider"] == "flaky"
    assert [e["changes"]["status"]["new"] for e in changes] == ["unhealthy", "healthy"]
    assert changes[0]["subject"] == "flaky" and changes[0]["reason"] == "HTTP 500"


async def test_when_every_circuit_is_open_there_is_no_candidate(sops_project: SopsProject) -> None:
    write_provider(sops_project, "dead", base_url=closed_port_url())
    write_routing(sops_project, chat="dead")
    async with running(sops_project, circuit_failures=1, circuit_cooldown_s=30) as board:
        failed = await board.chat()
        skipped = await board.chat()
    assert (failed.status, skipped.status) == (502, 503)


async def test_active_checks_find_a_provider_down_and_back(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a", api_key=CANARY) as a:
        write_provider(sops_project, "a", provider="openai", base_url=a.base_url, api_key=CANARY)
        write_routing(sops_project, chat="a")
        async with running(sops_project, health_interval_s=0.05) as board:
            health = board.app[HEALTH]
            await _until(lambda: health.get("a").status == "healthy")
            await a.refuse_connections()
            await _until(lambda: health.get("a").status == "unhealthy")
            assert health.is_open("a")
            await a.accept_connections()
            await _until(lambda: health.get("a").status == "healthy")
            await board.recorded()
            changes = board.events("provider.health_changed")
            metrics = await board.metrics()
    assert [e["changes"]["status"] for e in changes] == [
        {"old": "healthy", "new": "unhealthy"},
        {"old": "unhealthy", "new": "healthy"},
    ]
    assert a.requests[0].headers["authorization"] == f"Bearer {CANARY}"
    assert 'switchboard_provider_healthy{provider="a"} 1.0' in metrics


async def test_anthropic_is_checked_in_its_own_protocol(sops_project: SopsProject) -> None:
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY, models=("c1",)) as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        async with running(sops_project) as board:
            result = await (await board.post("/api/v1/llm-config/providers/claude/test", {})).json()
    assert result["ok"] is True, result
    assert up.requests[-1].headers["x-api-key"] == CANARY


async def _until(condition: object, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


def _settings(project: SopsProject) -> Settings:
    return Settings(root=project.root, providers=Path("providers.d"), age_key_file=project.identity.key_file)


async def test_the_test_command_checks_one_provider(
    sops_project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    async with FakeUpstream(name="a", api_key=CANARY, models=("m1", "m2", "m3")) as a:
        write_provider(sops_project, "a", provider="openai", base_url=a.base_url, api_key=CANARY)
        write_provider(sops_project, "dead", base_url=closed_port_url())
        settings = _settings(sops_project)
        ok = await asyncio.to_thread(command, argparse.Namespace(provider_id="a"), settings)
        down = await asyncio.to_thread(command, argparse.Namespace(provider_id="dead"), settings)
    out = capsys.readouterr().out
    assert (ok, down) == (0, 1)
    assert "a: ok in" in out and "3 models listed" in out
    assert "dead: failed in" in out and "cannot connect" in out
    assert CANARY not in out


def test_the_test_command_names_an_unknown_provider(sops_project: SopsProject) -> None:
    from service.errors import NotFound

    with pytest.raises(NotFound, match=r"no provider file nope\.yaml"):
        command(argparse.Namespace(provider_id="nope"), _settings(sops_project))

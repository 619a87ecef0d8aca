"""Provider health: circuit breakers, active checks, refused keys, confirmed transitions as events."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from service.gateway.health import CheckResult, Health
from service.http.context import HEALTH
from tests.conftest import SopsProject, eventually
from tests.support.gateway import CANARY, running, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, closed_port_url, upstreams


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _recording(health: Health) -> list[tuple[str, str, str, str | None]]:
    changes: list[tuple[str, str, str, str | None]] = []
    health.on_change = lambda pid, old, new, reason: changes.append((pid, old, new, reason))
    return changes


def test_consecutive_failures_open_the_circuit_and_one_trial_follows_the_cooldown() -> None:
    clock = Clock()
    health = Health(failures=2, cooldown_s=30, confirm=1, clock=clock)
    changes = _recording(health)
    health.failed("p", "HTTP 500")
    assert not health.is_open("p") and health.get("p").status == "unknown"
    health.failed("p", "HTTP 500")
    assert health.is_open("p") and not health.admit("p")
    # The circuit is this replica's own: shown, routed around, but not health (reference §7).
    assert (health.get("p").status, health.get("p").circuit) == ("unknown", "open")
    clock.advance(29.9)
    assert health.is_open("p")
    clock.advance(0.2)
    assert not health.is_open("p") and health.get("p").circuit == "half_open"
    assert health.admit("p")  # the one trial
    assert health.is_open("p") and not health.admit("p")
    health.failed("p", "HTTP 500")  # the trial failed: open again
    assert health.is_open("p") and health.get("p").circuit == "open"
    clock.advance(30.1)
    assert health.admit("p")
    health.succeeded("p", 0.01)
    assert not health.is_open("p") and health.admit("p") and health.admit("p")
    assert (health.get("p").status, health.get("p").circuit) == ("unknown", "closed")
    assert changes == []


def test_a_success_resets_the_count_of_failures() -> None:
    health = Health(failures=2, cooldown_s=10, clock=Clock())
    for _ in range(5):
        health.failed("p", "HTTP 500")
        health.succeeded("p", 0.001)
    assert not health.is_open("p")


def test_an_abandoned_trial_frees_the_slot() -> None:
    clock = Clock()
    health = Health(failures=1, cooldown_s=10, clock=clock)
    health.failed("p", "timed out")
    clock.advance(10.1)
    assert health.admit("p") and not health.admit("p")
    health.abandon("p")
    assert health.admit("p")


def test_checks_open_circuits_only_for_failures_requests_would_fall_back_on() -> None:
    health = Health(failures=3, cooldown_s=10, clock=Clock())
    health.checked("p", CheckResult(False, 1.0, "HTTP 404", opens=False))
    assert health.get("p").status == "unhealthy" and not health.is_open("p")
    health.checked("p", CheckResult(False, 1.0, "cannot connect", opens=True))
    assert health.is_open("p")
    health.checked("p", CheckResult(True, 2.5, "ok"))
    assert not health.is_open("p")
    state = health.get("p")
    assert (state.status, state.latency_ms) == ("unhealthy", 2.5)  # one result: not confirmed yet
    assert state.as_json()["checked_at"].endswith("Z")  # type: ignore[union-attr]


def test_a_refused_key_opens_the_circuit_at_once_and_only_a_request_clears_it() -> None:
    clock = Clock()
    health = Health(failures=3, cooldown_s=30, confirm=2, clock=clock)
    changes = _recording(health)
    health.checked("p", CheckResult(True, 1.0, "ok: 3 models listed"))
    health.checked("p", CheckResult(True, 1.0, "ok: 3 models listed"))
    health.refuse("p", "HTTP 401: the upstream refused the provider's key")
    assert health.is_open("p") and health.get("p").status == "unhealthy"
    assert changes == [  # at once: no confirmation for a refused key
        ("p", "unknown", "healthy", None),
        ("p", "healthy", "unhealthy", "HTTP 401: the upstream refused the provider's key"),
    ]
    for _ in range(3):  # a public models list still answers: that clears nothing
        health.checked("p", CheckResult(True, 1.0, "ok: 3 models listed"))
    assert health.is_open("p") and health.get("p").status == "unhealthy"
    clock.advance(30.1)
    health.checked("p", CheckResult(True, 1.0, "ok: 3 models listed"))
    assert health.get("p").status == "unhealthy"
    assert health.admit("p")  # the trial, after the cooldown
    health.refuse("p", "HTTP 403: the upstream refused the provider's key")  # still refused
    assert health.is_open("p")
    clock.advance(30.1)
    assert health.admit("p")
    health.succeeded("p", 0.02)  # the key works again
    assert not health.is_open("p") and health.get("p").status == "healthy"
    health.succeeded("p", 0.02)
    assert changes[2:] == [("p", "unhealthy", "healthy", None)]


def test_a_check_refused_by_the_upstream_opens_the_circuit() -> None:
    health = Health(failures=3, cooldown_s=30, clock=Clock())
    changes = _recording(health)
    health.checked("p", CheckResult(False, 1.0, "HTTP 401", refused=True))
    assert health.is_open("p") and health.get("p").status == "unhealthy"
    assert changes == [("p", "unknown", "unhealthy", "HTTP 401")]


def test_a_change_is_reported_once_it_held_for_the_confirmation_count() -> None:
    health = Health(failures=1, cooldown_s=30, confirm=2, clock=Clock())
    changes = _recording(health)
    ok, down = CheckResult(True, 1.0, "ok"), CheckResult(False, 1.0, "HTTP 500", opens=True)
    health.checked("p", ok)
    health.checked("p", ok)
    assert changes == [("p", "unknown", "healthy", None)]
    for _ in range(10):  # flapping: never two results alike in a row
        health.checked("p", down)
        assert health.get("p").status == "healthy"  # what is shown is the confirmed status
        health.checked("p", ok)
        assert health.get("p").status == "healthy"
    assert len(changes) == 1
    health.checked("p", down)
    health.checked("p", down)
    assert changes[1:] == [("p", "healthy", "unhealthy", "HTTP 500")]
    assert health.get("p").confirmed == ("unhealthy", "HTTP 500")
    health.failed("p", "HTTP 500")  # the circuit was open already; no new status
    assert len(changes) == 2


async def test_a_failing_provider_is_skipped_while_its_circuit_is_open(sops_project: SopsProject) -> None:
    async with upstreams({"name": "flaky"}, {"name": "backup"}) as (flaky, backup):
        flaky.fail(500)
        write_provider(sops_project, "flaky", base_url=flaky.base_url)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "flaky", "fallbacks": ["backup"]})
        async with running(
            sops_project, circuit_failures=2, circuit_cooldown_s=30, health_confirm=1
        ) as board:
            clock = board.app[HEALTH].clock = Clock()
            first = [(await board.chat()).headers["x-switchboard-attempts"] for _ in range(4)]
            shown = board.app[HEALTH].get("flaky")
            assert (shown.status, shown.circuit) == ("unknown", "open")
            flaky.answer_normally()
            clock.advance(30.1)
            trial = await board.chat()
            after = await board.chat()
            await board.recorded()
            changes = board.events("provider.health_changed")
    assert first == ["2", "2", "1", "1"]  # two failures open it; then it is skipped
    assert len(flaky.requests) == 4  # two failures, the trial, and one more once closed
    assert trial.headers["x-switchboard-provider"] == after.headers["x-switchboard-provider"] == "flaky"
    assert changes == []  # a replica's circuit is not health: nothing to tell the log or the others


async def test_a_revoked_key_falls_back_and_opens_the_circuit_at_once(sops_project: SopsProject) -> None:
    async with upstreams({"name": "revoked", "api_key": CANARY}, {"name": "backup"}) as (revoked, backup):
        revoked.fail(401, times=1)
        write_provider(sops_project, "revoked", provider="openai", base_url=revoked.base_url, api_key=CANARY)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "revoked", "fallbacks": ["backup"]})
        async with running(sops_project, circuit_failures=3, circuit_cooldown_s=30) as board:
            health = board.app[HEALTH]
            clock = health.clock = Clock()
            served = await board.chat()
            skipped = await board.chat()
            assert health.is_open("revoked") and health.get("revoked").status == "unhealthy"
            await board.recorded()
            marked = board.events("provider.health_changed")
            # The models list answers (it may be public): the mark stays.
            check = await board.post("/api/v1/llm-config/providers/revoked/test", {})
            assert (await check.json())["ok"] is True
            assert health.is_open("revoked") and health.get("revoked").status == "unhealthy"
            clock.advance(30.1)
            trial = await board.chat()  # the key works again: the trial clears it
            assert health.get("revoked").status == "healthy" and not health.is_open("revoked")
            await board.recorded()
            changes = board.events("provider.health_changed")
    assert (
        served.status,
        served.headers["x-switchboard-provider"],
        served.headers["x-switchboard-attempts"],
    ) == (
        200,
        "backup",
        "2",
    )
    assert skipped.headers["x-switchboard-attempts"] == "1"  # the circuit opened on the first 401
    assert trial.headers["x-switchboard-provider"] == "revoked"
    assert [(e["subject"], e["changes"]["status"], e["reason"]) for e in marked] == [
        (
            "revoked",
            {"old": "unknown", "new": "unhealthy"},
            "HTTP 401: the upstream refused the provider's key",
        )
    ]
    # The trial that went through clears the mark at once, as surely as the refusal set it.
    assert [e["changes"]["status"] for e in changes[1:]] == [{"old": "unhealthy", "new": "healthy"}]


async def test_a_flapping_provider_does_not_flood_the_log(sops_project: SopsProject) -> None:
    checks = 0

    async def models(request: web.Request) -> web.Response:
        nonlocal checks
        checks += 1
        if checks % 2:
            return web.json_response({"data": [{"id": "m"}]})
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    upstream = web.Application()
    upstream.router.add_get("/v1/models", models)
    runner = web.AppRunner(upstream)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        write_provider(sops_project, "flapping", base_url=url)
        async with running(sops_project, health_interval_s=0.02) as board:
            await _until(lambda: checks >= 20)
            await board.recorded()
            changes = board.events("provider.health_changed")
    finally:
        await runner.cleanup()
    assert changes == []


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
            healthy = 'switchboard_provider_healthy{provider="a"} 1.0'
            async with asyncio.timeout(20):
                while healthy not in await board.metrics():  # confirmed by two checks
                    await asyncio.sleep(0.02)
            await a.refuse_connections()
            await _until(lambda: health.get("a").status == "unhealthy")
            assert health.is_open("a")
            await _until(lambda: board.events("provider.health_changed"))  # confirmed by a second check
            await a.accept_connections()
            await _until(lambda: len(board.events("provider.health_changed")) == 2)
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


async def _until(condition: object, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_a_rotated_key_resets_health_and_circuit(sops_project: SopsProject) -> None:
    """docs/reference.md §7: a provider.updated (a rotated key, a new URL) starts the provider afresh."""
    async with upstreams({"name": "vendor", "api_key": "sk-new-key-0123456789"}, {"name": "backup"}) as (
        vendor,
        backup,
    ):
        write_provider(sops_project, "vendor", provider="openai", base_url=vendor.base_url, api_key=CANARY)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "vendor", "fallbacks": ["backup"]})
        async with running(sops_project, circuit_cooldown_s=300) as board:
            health = board.app[HEALTH]
            refused = await board.chat()  # the old key: 401, the circuit opens for 300 s
            assert refused.headers["x-switchboard-provider"] == "backup" and health.is_open("vendor")
            generation = (await (await board.get("/readyz")).json())["generation"]
            write_provider(
                sops_project,
                "vendor",
                provider="openai",
                base_url=vendor.base_url,
                api_key="sk-new-key-0123456789",
            )
            await board.wait_for_generation(generation + 1)
            await eventually(lambda: not health.is_open("vendor"))
            assert health.get("vendor").status == "unknown"
            rotated = await board.chat()
    assert rotated.status == 200 and rotated.headers["x-switchboard-provider"] == "vendor"


def test_the_circuit_and_measurements_are_not_what_tags_cover() -> None:
    clock = Clock()
    health = Health(failures=1, cooldown_s=30, confirm=2, clock=clock)
    health.checked("p", CheckResult(True, 1.0, "ok: 1 model listed"))
    before = health.get("p")
    health.failed("p", "HTTP 502")
    health.checked("p", CheckResult(True, 7.5, "ok: 2 models listed"))
    health.failed("p", "timed out")
    after = health.get("p")
    assert after.confirmed == before.confirmed == ("healthy", None)
    assert (after.latency_ms, after.circuit) == (7.5, "open")


def test_an_unhealthy_reason_stays_the_confirmed_one_while_the_status_holds() -> None:
    health = Health(confirm=2, clock=Clock())
    shown: list[str] = []
    health.on_shown.append(shown.append)
    health.checked("p", CheckResult(False, 1.0, "HTTP 503"))  # after unknown: adopted at once
    for reason in ("timed out", "HTTP 500", "cannot connect"):
        health.checked("p", CheckResult(False, 1.0, reason))
    assert health.get("p").confirmed == ("unhealthy", "HTTP 503") and shown == ["p"]


def test_another_replicas_newer_confirmed_status_is_adopted_and_not_told_again() -> None:
    health = Health(confirm=2, clock=Clock())
    changes = _recording(health)
    confirmed: list[str] = []
    health.on_confirmed.append(lambda pid, state, at: confirmed.append(state.status))
    health.checked("p", CheckResult(True, 1.0, "ok"))
    assert confirmed == ["healthy"]
    assert health.adopt("p", "unhealthy", "HTTP 503", time.time() + 1)
    assert health.get("p").confirmed == ("unhealthy", "HTTP 503")
    assert not health.adopt("p", "healthy", None, time.time() - 60)  # older than what is shown
    assert health.get("p").status == "unhealthy"
    health.checked("p", CheckResult(True, 1.0, "ok"))  # one result against it: not confirmed
    assert health.get("p").status == "unhealthy"
    health.checked("p", CheckResult(True, 1.0, "ok"))
    assert health.get("p").status == "healthy"
    assert confirmed == ["healthy", "healthy"]  # the adopted change is not published again
    assert [c[2] for c in changes] == ["healthy", "unhealthy", "healthy"]


def test_a_reset_forgets_the_adopted_time_too() -> None:
    health = Health(confirm=2, clock=Clock())
    assert health.adopt("p", "unhealthy", "HTTP 503", time.time())
    health.reset("p")
    assert health.get("p").status == "unknown"
    assert health.adopt("p", "healthy", None, time.time() - 5)


async def test_a_check_whose_key_is_refused_is_a_check_still(sops_project: SopsProject) -> None:
    """The provider stays unhealthy with the reason, and `checked_at` and `latency_ms` say when the
    last check ran and how long it took, as for any check (docs/reference.md §6.3)."""
    async with FakeUpstream(name="k", api_key="sk-needed-0123456789") as up:
        write_provider(sops_project, "k", base_url=up.base_url)  # no key: every check is a 401
        async with running(sops_project, health_interval_s=0.05) as board:

            async def health() -> dict[str, object]:
                body = await (await board.get("/api/v1/llm-config/providers/k")).json()
                return dict(body["health"])

            async with asyncio.timeout(20):
                while (first := await health())["checked_at"] is None:
                    await asyncio.sleep(0.02)
            assert first["status"] == "unhealthy" and "401" in str(first["reason"])
            assert isinstance(first["latency_ms"], float)
            async with asyncio.timeout(20):  # and it goes on telling the last one
                while (later := await health())["checked_at"] == first["checked_at"]:
                    await asyncio.sleep(0.02)
            assert later["status"] == "unhealthy" and later["reason"] == first["reason"]
            assert sum(r.path.endswith("/models") for r in up.requests) >= 2

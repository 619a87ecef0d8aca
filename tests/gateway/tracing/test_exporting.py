"""Exporting over OTLP (docs/reference.md §14): `switchboard serve` flushes on SIGTERM, gRPC as well as HTTP,
the standard `OTEL_*` variables honoured, and a collector that is down or slow costs a request
nothing."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import SopsProject
from tests.support.gateway import running, write_provider, write_routing
from tests.support.otlp import OTLPReceiver
from tests.support.replicas import Replica, free_port, replica_env, routing_yaml
from tests.support.upstreams import FakeUpstream, closed_port_url


def _serve_env(otlp: OTLPReceiver, **otel: str) -> dict[str, str]:
    env = {k: v for k, v in replica_env(None).items() if not k.startswith("OTEL_")}
    return env | otlp.env() | otel


async def test_serve_exports_what_is_still_batched_when_it_is_stopped(tmp_path: Path) -> None:
    async with OTLPReceiver() as otlp, FakeUpstream(name="a") as up:
        providers = tmp_path / "providers.d"
        providers.mkdir()
        (providers / "a.yaml").write_text(
            f"kind: ai_server\nid: a\nserver_type: vllm\nbase_url: {up.base_url}\npurposes: [chat]\n"
        )
        (providers / "routing.yaml").write_text(routing_yaml("a"))
        # Nothing is exported on its own before the test ends: only stopping can send it.
        env = _serve_env(otlp, OTEL_BSP_SCHEDULE_DELAY="600000", OTEL_METRIC_EXPORT_INTERVAL="600000")
        replica = Replica("traced", tmp_path, providers, free_port(), env, tmp_path)
        async with aiohttp.ClientSession() as http:
            replica.http = http
            await replica.start()
            try:
                await replica.wait_ready()
                body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
                for stream in (False, True):
                    async with http.post(
                        replica.url + "/v1/chat/completions", json={**body, "stream": stream}
                    ) as response:
                        assert response.status == 200
                        await response.read()
                assert otlp.spans == [] and otlp.points == []
            finally:
                await replica.stop(signal.SIGTERM)
        assert replica.process is not None and replica.process.returncode == 0, replica.log()
        spans = await otlp.spans_matching(lambda s: s.kind == "SERVER", 2, timeout=1)
        assert {s.attributes.get("gen_ai.request.stream", False) for s in spans} == {False, True}
        assert len([s for s in otlp.spans if s.kind == "CLIENT"]) == 2
        assert spans[0].resource["service.instance.id"] == "traced"
        usage = await otlp.point(lambda p: p.metric == "gen_ai.client.token.usage", timeout=1)
        assert usage.count == 2  # both requests, input tokens or output tokens alike
        duration = await otlp.point(lambda p: p.metric == "gen_ai.client.operation.duration", timeout=1)
        assert duration.count == 2


async def test_grpc_and_the_standard_variables(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with OTLPReceiver(grpc=True) as otlp, FakeUpstream(name="a") as up:
        env = otlp.env(
            "grpc",
            OTEL_EXPORTER_OTLP_HEADERS="x-collector-key=abc123",
            OTEL_SERVICE_NAME="gateway-eu",
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        )
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            assert (await board.chat("hi")).status == 200
            request = await otlp.span(lambda s: s.kind == "SERVER")
            await otlp.point(lambda p: p.metric == "gen_ai.client.token.usage")
        assert request.resource["service.name"] == "gateway-eu"
        assert request.resource["deployment.environment"] == "test"
        assert otlp.headers and all(h.get("x-collector-key") == "abc123" for h in otlp.headers)
        assert up.requests[-1].headers["traceparent"].startswith(f"00-{request.trace_id}-")


@pytest.mark.parametrize("collector", ["down", "slow", "failing"])
async def test_a_collector_that_is_down_or_slow_never_slows_or_fails_a_request(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch, collector: str
) -> None:
    async with OTLPReceiver(delay_s=30 if collector == "slow" else 0) as otlp, FakeUpstream(name="a") as up:
        if collector == "failing":
            otlp.status = 503
        endpoint = closed_port_url() if collector == "down" else otlp.url
        env = otlp.env(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_EXPORTER_OTLP_TIMEOUT="30",
            OTEL_BSP_SCHEDULE_DELAY="1",
            OTEL_BSP_MAX_QUEUE_SIZE="16",
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
            OTEL_METRIC_EXPORT_INTERVAL="10",
        )
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr("service.gateway.tracing.exporting.FLUSH_TIMEOUT_S", 1.0)
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            started = time.monotonic()
            for index in range(60):  # more spans than the queue holds: the rest are dropped
                response = await board.chat("hi", stream=index % 2 == 0)
                assert response.status == 200
            assert time.monotonic() - started < 10
            stopping = time.monotonic()
        # Stopping waits for the exporters a bounded while, never for the collector's 30 s.
        assert time.monotonic() - stopping < 5


async def test_stopping_gives_up_on_a_collector_that_does_not_answer(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with OTLPReceiver(delay_s=60) as otlp, FakeUpstream(name="a") as up:
        env = otlp.env(OTEL_EXPORTER_OTLP_TIMEOUT="60", OTEL_BSP_SCHEDULE_DELAY="600000")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr("service.gateway.tracing.exporting.FLUSH_TIMEOUT_S", 1.0)
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            assert (await board.chat("hi")).status == 200
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 5

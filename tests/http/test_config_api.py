"""The configuration API over HTTP: answer shapes, 404s and 400s, tokens and scopes, caching."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from service.cli.main import cli
from service.http.context import EVENTS
from tests.conftest import (
    Service,
    SopsProject,
    eventually,
    serve,
    write_atomically,
    write_key,
    write_server,
)

API = "/api/v1/llm-config"
KEY = "sk-or-v1-0123456789abcdef5d80"


@pytest.fixture
async def routed(sops_project: SopsProject) -> AsyncIterator[Service]:
    """A service with an encrypted key and two servers, routed for chat and embeddings."""
    write_key(sops_project, "openrouter-main", KEY)
    write_server(sops_project, "gpu")
    write_server(sops_project, "tei", "http://127.0.0.1:8080", purposes="embeddings")
    write_atomically(
        sops_project.providers / "routing.yaml",
        "kind: routing\npurposes:\n"
        "  chat:\n    primary: [openrouter-main, gpu]\n    weights: {openrouter-main: 3}\n"
        "  embeddings:\n    primary: tei\n",
    )
    async with serve(sops_project) as service:
        yield service


async def test_active_purpose_answers_primaries_fallbacks_and_weights_as_masked_providers(
    routed: Service,
) -> None:
    status, body = await routed.get(f"{API}/active/chat")
    assert status == 200
    assert set(body) == {"purpose", "primary", "fallbacks", "weights", "commit", "generation"}
    assert (body["purpose"], body["fallbacks"], body["commit"]) == ("chat", [], None)
    assert body["generation"] == routed.registry.snapshot.generation
    assert body["weights"] == {"openrouter-main": 3, "gpu": 1}
    key, gpu = body["primary"]
    assert key == {
        "id": "openrouter-main",
        "kind": "api_key",
        "name": None,
        "provider": "openrouter",
        "base_url": "https://openrouter.ai/api/v1",  # resolved: the vendor's default
        "models": [],
        "model_map": {},
        "purposes": ["chat"],
        "enabled": True,
        "api_key": "****5d80",
        "connect_timeout_s": 5,
        "timeout_s": 600,
        "first_byte_timeout_s": 15,
        "idle_timeout_s": 60,
        "file": "providers.d/openrouter-main.yaml",
        "commit": None,
        "health": {
            "status": "unknown",
            "reason": None,
            "checked_at": None,
            "latency_ms": None,
            "circuit": "closed",
        },
    }
    assert (gpu["server_type"], gpu["api_key"], "provider" in gpu) == ("vllm", None, False)


async def test_active_lists_exactly_the_purposes_that_have_a_route(routed: Service) -> None:
    status, body = await routed.get(f"{API}/active")
    assert status == 200
    assert sorted(body["purposes"]) == ["chat", "embeddings"]
    assert body["purposes"]["embeddings"] == (await routed.get(f"{API}/active/embeddings"))[1]
    assert body["generation"] == routed.registry.snapshot.generation

    status, body = await routed.get(f"{API}/active/reranking")
    assert status == 404
    assert body == {
        "error": {
            "type": "not_found",
            "message": "no provider is routed for `reranking` (providers.d/routing.yaml)",
        }
    }
    status, body = await routed.get(f"{API}/active/poetry")
    assert (status, body["error"]["type"]) == (404, "not_found")
    assert "unknown purpose `poetry`" in body["error"]["message"]


async def test_providers_are_listed_all_together_and_by_kind(routed: Service) -> None:
    ids = {}
    for segment in ("providers", "api-keys", "servers"):
        status, body = await routed.get(f"{API}/{segment}")
        assert status == 200
        assert body["generation"] == routed.registry.snapshot.generation
        ids[segment] = [p["id"] for p in body["providers"]]
    assert ids == {
        "providers": ["gpu", "openrouter-main", "tei"],
        "api-keys": ["openrouter-main"],
        "servers": ["gpu", "tei"],
    }
    status, body = await routed.get(f"{API}/providers/tei")
    assert (status, body["base_url"], body["purposes"]) == (200, "http://127.0.0.1:8080", ["embeddings"])
    assert (await routed.get(f"{API}/api-keys/openrouter-main"))[1]["api_key"] == "****5d80"


async def test_an_unknown_id_or_an_id_of_the_other_kind_is_404(routed: Service) -> None:
    for path, message in (
        (f"{API}/providers/ghost", "no provider `ghost`"),
        (f"{API}/servers/openrouter-main", "`openrouter-main` is an api_key, not an ai_server"),
        (f"{API}/api-keys/gpu", "`gpu` is an ai_server, not an api_key"),
    ):
        status, body = await routed.get(path)
        assert (status, body) == (404, {"error": {"type": "not_found", "message": message}}), path


async def test_an_answer_follows_the_snapshot_it_was_rendered_from(routed: Service) -> None:
    _, first = await routed.get(f"{API}/active/chat")
    _, again = await routed.get(f"{API}/active/chat")
    assert again == first
    write_server(routed.project, "gpu", "http://127.0.0.1:8001/v1")

    async def moved() -> None:
        _, body = await routed.get(f"{API}/active/chat")
        assert body["primary"][1]["base_url"] == "http://127.0.0.1:8001/v1"
        assert body["generation"] == first["generation"] + 1

    await eventually(moved)


async def test_audit_filters_by_subject_type_time_and_limit(routed: Service) -> None:
    status, body = await routed.get(f"{API}/audit")
    assert status == 200
    events = routed.app[EVENTS].events()
    assert [e["seq"] for e in body["events"]] == [e.seq for e in events]
    assert body["count"] == len(events)
    assert body["events"][0]["type"] == "service.started"

    _, body = await routed.get(f"{API}/audit?subject=gpu")
    assert [(e["type"], e["subject"]) for e in body["events"]] == [("provider.added", "gpu")]
    _, body = await routed.get(f"{API}/audit?type=provider")
    assert {e["type"] for e in body["events"]} == {"provider.added"}
    assert len(body["events"]) == 3
    _, body = await routed.get(f"{API}/audit?type=routing.updated&limit=1")
    assert [e["subject"] for e in body["events"]] == ["routing"]
    _, body = await routed.get(f"{API}/audit?limit=2")
    assert [e["seq"] for e in body["events"]] == [e.seq for e in events[-2:]]

    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    _, body = await routed.get(f"{API}/audit?since={later}")
    assert body == {"events": [], "count": 0}
    _, body = await routed.get(f"{API}/audit?until={later}&since=1h")
    assert body["count"] == len(events)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("since=yesterday-ish", "`since`: not a time: 'yesterday-ish'"),
        ("until=2026-13-45", "`until`: not a time"),
        ("limit=ten", "`limit` is not a whole number: 'ten'"),
        ("limit=0", "`limit` must be between 1 and 10000"),
        ("limit=10001", "`limit` must be between 1 and 10000"),
        ("since=99999999999d", "`since`: out of range"),
        ("until=0001-01-01T00:00:00%2B14:00", "`until`: out of range"),
    ],
)
async def test_audit_refuses_a_bad_time_or_limit(running_service: Service, query: str, message: str) -> None:
    status, body = await running_service.get(f"{API}/audit?{query}")
    assert (status, body["error"]["type"]) == (400, "bad_request")
    assert body["error"]["message"].startswith(message)


async def test_state_at_a_year_before_1000_keeps_four_digits(running_service: Service) -> None:
    """Found by schemathesis: strftime wrote year 256 as `256`, off the answer's documented pattern."""
    status, body = await running_service.get(f"{API}/state?at=0256-06-16T13:01:50.8Z")
    assert (status, body["at"]) == (200, "0256-06-16T13:01:50.800000Z")


async def test_state_refuses_a_bad_time_and_is_empty_before_the_first_event(running_service: Service) -> None:
    status, body = await running_service.get(f"{API}/state?at=soon")
    assert (status, body["error"]["type"]) == (400, "bad_request")
    status, body = await running_service.get(f"{API}/state?at=9999999d")  # was a 500
    assert (status, body["error"]["type"]) == (400, "bad_request")
    status, body = await running_service.get(f"{API}/state?at=2000-01-01")
    assert (status, body) == (
        200,
        {
            "at": "2000-01-01T00:00:00.000000Z",
            "seq": 0,
            "config": {"providers": {}, "routing": {}, "clients": {}},
        },
    )


async def test_tokens_and_scopes_guard_every_configuration_endpoint(
    running_service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    service, folder = running_service, str(running_service.project.providers)
    assert (await service.get(f"{API}/providers"))[0] == 200  # no clients file: loopback, no auth
    assert cli("token", "create", "reader", "--scope", "config:read", "--providers", folder) == 0
    reader = capsys.readouterr().out.strip()
    assert cli("token", "create", "auditor", "--scope", "admin", "--providers", folder) == 0
    auditor = capsys.readouterr().out.strip()

    async def guarded() -> None:
        assert (await service.get(f"{API}/providers"))[0] == 401

    await eventually(guarded)
    status, body = await service.get(f"{API}/providers")
    assert body == {
        "error": {"type": "unauthorized", "message": "missing bearer token (Authorization: Bearer TOKEN)"}
    }
    status, body = await service.get(f"{API}/providers", "sb_wrong")
    assert (status, body["error"]) == (401, {"type": "unauthorized", "message": "unknown token"})

    reads = ["/active", "/active/chat", "/providers", "/providers/gpu", "/api-keys", "/servers/gpu"]
    for path in reads:
        assert (await service.get(API + path, reader))[0] == 200, path
        status, body = await service.get(API + path, auditor)
        assert (status, body["error"]["type"]) == (403, "forbidden"), path
    for path in ("/audit", "/state"):
        assert (await service.get(API + path, auditor))[0] == 200, path
        status, body = await service.get(API + path, reader)
        assert status == 403, path
        assert body["error"]["message"] == "client 'reader' lacks the scope 'admin'"
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await service.text(path))[0] == 200, path


async def test_metrics_count_requests_by_route_template(routed: Service) -> None:
    for _ in range(3):
        await routed.get(f"{API}/active/chat")
    await routed.get(f"{API}/providers/ghost")
    _, text = await routed.text("/metrics")
    route = f"{API}/active/{{purpose}}"
    assert f'switchboard_http_requests_total{{method="GET",route="{route}",status="200"}} 3.0' in text
    assert 'route="/api/v1/llm-config/providers/{id}",status="404"} 1.0' in text


async def test_metrics_label_an_unknown_method_other(routed: Service) -> None:
    """Methods the API does not use (aiohttp takes WebDAV's too) are counted as `OTHER`."""
    for method in ("PROPFIND", "MKCOL", "LOCK"):
        async with routed.http.request(method, routed.url + f"{API}/active/chat") as response:
            assert response.status in (400, 405)
    _, text = await routed.text("/metrics")
    assert 'method="OTHER",route="unmatched"' in text and "PROPFIND" not in text

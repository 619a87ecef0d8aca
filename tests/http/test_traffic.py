"""`GET /api/v1/llm-config/traffic`: each provider's traffic since the start, from the gateway's counters."""

from __future__ import annotations

import re

from service.metrics import Metrics
from tests.conftest import SopsProject
from tests.support.gateway import running, write_clients, write_provider, write_routing
from tests.support.upstreams import upstreams

TRAFFIC = "/api/v1/llm-config/traffic"
READ, COMPLETIONS = "sb_traffic_read_5c1f0e9d", "sb_traffic_completions_7a2b"


def test_the_counters_add_up_by_provider() -> None:
    metrics = Metrics()
    metrics.upstream_requests.labels("a", "ok").inc(3)
    metrics.upstream_requests.labels("a", "client_error").inc()
    metrics.upstream_requests.labels("a", "failed").inc(2)
    metrics.upstream_requests.labels("a", "broken").inc()
    metrics.upstream_seconds.labels("a").observe(0.1)
    metrics.upstream_seconds.labels("a").observe(0.3)
    metrics.tokens.labels("a", "m1", "client", "prompt").inc(5)
    metrics.tokens.labels("a", "m2", "other", "prompt").inc(2)
    metrics.tokens.labels("a", "m1", "client", "completion").inc(7)
    metrics.upstream_requests.labels("b", "failed").inc()
    traffic = metrics.traffic()
    a, b = traffic["a"], traffic["b"]
    assert (a.requests, a.errors, a.prompt_tokens, a.completion_tokens) == (7, 3, 7, 7)
    assert a.latency_ms == 200.0  # the mean of the answered attempts
    assert (b.requests, b.errors, b.latency_ms) == (1, 1, None)


async def test_traffic_counts_requests_errors_latency_and_tokens(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}, {"name": "idle"}) as (a, b, _):
        write_provider(sops_project, "a", base_url=a.base_url)
        write_provider(sops_project, "b", base_url=b.base_url)
        write_provider(sops_project, "idle", base_url=b.base_url)
        write_routing(sops_project, chat={"primary": ["a"], "fallbacks": ["b"]})
        write_clients(sops_project, {"reader": (READ, ["config:read", "completions"])})
        async with running(sops_project) as board:
            a.fail(503, times=1)
            for _ in range(3):
                response = await board.chat("one two three", token=READ)
                assert response.status == 200
            response = await board.get(TRAFFIC, token=READ)
            assert response.status == 200
            answer = await response.json()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", answer["since"])
    providers = answer["providers"]
    assert sorted(providers) == ["a", "b", "idle"]  # every provider, also one without traffic
    assert providers["a"]["requests"] == 3 and providers["a"]["errors"] == 1
    assert providers["b"]["requests"] == 1 and providers["b"]["errors"] == 0
    assert providers["idle"] == {
        "requests": 0,
        "errors": 0,
        "latency_ms": None,
        "tokens": {"prompt": 0, "completion": 0},
    }
    assert providers["a"]["latency_ms"] > 0
    # The stand-in counts words: "one two three" is 3 prompt tokens, "a says: one two three" 5.
    assert providers["a"]["tokens"] == {"prompt": 6, "completion": 10}
    assert providers["b"]["tokens"] == {"prompt": 3, "completion": 5}


async def test_traffic_needs_config_read_and_carries_an_etag(sops_project: SopsProject) -> None:
    write_provider(sops_project, "a", base_url="http://127.0.0.1:9/v1")
    write_clients(sops_project, {"reader": (READ, ["config:read"]), "app": (COMPLETIONS, ["completions"])})
    async with running(sops_project) as board:
        assert (await board.get(TRAFFIC)).status == 401
        assert (await board.get(TRAFFIC, token=COMPLETIONS)).status == 403
        response = await board.get(TRAFFIC, token=READ)
        tag = response.headers["ETag"]
        headers = {"Authorization": f"Bearer {READ}", "If-None-Match": tag}
        async with board.http.get(board.url + TRAFFIC, headers=headers) as again:
            assert again.status == 304

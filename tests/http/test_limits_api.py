"""Limits and budgets through the HTTP API (docs/reference.md §13): written over HTTP like any field of a
provider file, and read back by `usage:read` without anything of a request's content."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import yaml

from tests.conftest import Service, SopsProject, serve
from tests.http.test_write_api import call, repo

__all__ = ["repo"]


@pytest.fixture
async def service(repo: SopsProject) -> AsyncIterator[Service]:
    async with serve(repo) as running:
        yield running


async def test_a_write_sets_a_providers_budget_and_prices_and_the_limits_show_it(
    service: Service,
    repo: SopsProject,
) -> None:
    body = {
        "server_type": "vllm",
        "base_url": "http://10.0.0.5:8000/v1",
        "budget": {"usd": "12.5", "period": "week"},
        "pricing": {"*": {"input": 0.1, "output": "0.4"}},
    }
    status, answer, _ = await call(service, "PUT", "/servers/gpu", body)
    assert status == 200, answer
    assert answer["budget"] == {"usd": "12.5", "period": "week"}
    assert answer["pricing"]["*"]["input"] == "0.1"
    written = yaml.safe_load((repo.providers / "gpu.yaml").read_text())
    assert written["budget"] == {"usd": "12.5", "period": "week"}
    status, limits, _ = await call(service, "GET", "/limits")
    assert status == 200
    gpu = next(p for p in limits["providers"] if p["id"] == "gpu")
    assert gpu["limits"] == {"budget": {"usd": "12.5", "period": "week"}}
    assert gpu["used"]["budget_spent_usd"] == "0" and gpu["used"]["period_end"].endswith("T00:00:00Z")
    status, answer, _ = await call(
        service,
        "PATCH",
        "/servers/gpu",
        {"budget": {"usd": -1, "period": "week"}},
        content_type="application/merge-patch+json",
    )
    assert status == 422, answer


async def test_whoami_without_a_clients_file_has_no_limits(service: Service) -> None:
    status, answer, _ = await call(service, "GET", "/whoami")
    assert status == 200 and answer["limits"] is None and answer["used"] is None

"""docs/reference.md §13's limits held from outside: a real Switchboard with a clients file, a
stand-in vendor, and only what a client sees (answers, their headers) and the records read back."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from tests.conftest import SopsProject, eventually
from tests.gateway.test_metering import chat, priced_provider, write_clients
from tests.gateway.test_metering_contract import (
    BUDGET_LEFT,
    REQUESTS_LEFT,
    TOKENS_LEFT,
    _read,
    _records,
    _retry_pair,
)
from tests.support.gateway import running, write_routing
from tests.support.upstreams import FakeUpstream

CHEAP = {"*": {"input": 1000, "output": 2000}}
"""A thousandth of a USD a token in, two out: "hi" with max_tokens 5 holds about 0.08 USD."""
LIMITS = "/api/v1/llm-config/limits"


async def test_a_client_over_max_parallel_gets_429_with_when_to_retry_and_nothing_goes_upstream(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a", latency_s=0.5) as up:
        priced_provider(sops_project, "a", up, pricing=CHEAP)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"max_parallel": 1, "rpm": 10, "tpm": 1000})
        async with running(sops_project) as board:
            slow = asyncio.ensure_future(chat(board, max_tokens=5))
            await eventually(lambda: len(up.requests) == 1)
            refused = await chat(board, max_tokens=5)
            body = await refused.json()
            assert (await slow).status == 200
            after = await chat(board, max_tokens=5)  # the slot was given back
            records = await _records(board, 3)
    assert refused.status == 429 and body["error"]["type"] == "rate_limited"
    assert body["error"]["limit"] == "max_parallel" and isinstance(body["error"]["message"], str)
    assert _retry_pair(refused) > 0
    assert (refused.headers[REQUESTS_LEFT], refused.headers[TOKENS_LEFT]) == ("9", "1000")  # it used none
    assert after.status == 200 and len(up.requests) == 2
    limited = next(r for r in records if r["id"] == refused.headers["x-request-id"])
    assert (limited["status"], limited["provider"], limited["attempts"], limited["cost_usd"]) == (
        429,
        None,
        0,
        "0",
    )


async def test_a_budget_refusal_says_to_retry_when_its_period_ends(sops_project: SopsProject) -> None:
    """A week's budget ends next Monday at 00:00 UTC: the 429's `period_end`, and its
    `Retry-After` the seconds until then (its `retry-after-ms` the same in milliseconds)."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, pricing=CHEAP)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "0.01", "period": "week"}})
        async with running(sops_project) as board:
            refused = await chat(board, max_tokens=5)
            asked = datetime.now(UTC)
            body = await refused.json()
    assert refused.status == 429 and body["error"]["type"] == "budget_exceeded" and not up.requests
    end = datetime.fromisoformat(body["error"]["period_end"].replace("Z", "+00:00"))
    assert end.weekday() == 0 and (end.hour, end.minute, end.second) == (0, 0, 0) and end > asked
    assert abs(_retry_pair(refused) / 1000 - (end - asked).total_seconds()) < 2
    assert refused.headers[BUDGET_LEFT] == "0.01" and refused.headers[REQUESTS_LEFT] == "unlimited"


async def test_limits_shows_what_was_spent_as_soon_as_it_shows_a_changed_budget(
    sops_project: SopsProject,
) -> None:
    """The contract: a change of limits applies with the file, and what was already spent in the
    period stays spent. A day's budget made a month's: `/limits` never shows the month's budget
    with nothing spent, however soon it is asked."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, pricing=CHEAP)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "1", "period": "day"}})
        async with running(sops_project) as board:
            assert (await chat(board, max_tokens=5)).status == 200  # 1 token in, 3 out: 0.007 USD
            await _records(board, 1)
            write_clients(sops_project, {"budget": {"usd": "1", "period": "month"}})
            seen = []
            for _ in range(500):
                client = next(c for c in (await _read(board, LIMITS))["clients"] if c["name"] == "client")
                if client["limits"]["budget"]["period"] == "month":
                    seen.append(client["used"]["budget_spent_usd"])
                    if len(seen) == 5:
                        break
    assert seen == ["0.007"] * 5

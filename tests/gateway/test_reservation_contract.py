"""docs/reference.md §13.2's reservation and budgets held from outside: a real Switchboard, stand-in
vendors, and what a client sees. A stream's remaining-* headers are what remained when it
started (§13.3): its budget's header is the budget less the request's reservation, exactly."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from decimal import Decimal
from typing import Any

from tests.conftest import SopsProject, eventually
from tests.gateway.test_metering import READER, TOKEN, chat, metered, priced_provider, write_clients
from tests.support.gateway import Switchboard, running, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, upstreams

BUDGET_LEFT = "x-switchboard-budget-remaining-usd"


def _body(model: str, **more: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, **more}


async def _reserved(board: Switchboard, budget: int, body: dict[str, Any]) -> Decimal:
    """The reservation of a stream of `body`: what its budget had left when it started, from
    what was spent before it (once nothing else is held), less the body's bytes (its prompt's
    bound, a byte a token at 1 USD)."""

    async def settled() -> Decimal:
        limits = await (await board.get("/api/v1/llm-config/limits", token=READER)).json()
        used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
        assert used["in_flight"] == 0 and used["budget_reserved_usd"] == "0"
        return Decimal(used["budget_spent_usd"])

    spent = await eventually(settled)
    answer = await board.post("/v1/chat/completions", body, token=TOKEN)
    assert answer.status == 200, await answer.text()
    return budget - spent - Decimal(answer.headers[BUDGET_LEFT]) - len(json.dumps(body))


async def test_without_max_tokens_the_completion_is_bounded_by_the_models_output_limit_then_the_default(
    sops_project: SopsProject,
) -> None:
    """The prompt bound is the body's bytes (1 USD a token here), the completion's (2 USD a token)
    `max_tokens`, else the model's output limit in litellm's map (gpt-4o: 16,384), else
    `SWITCHBOARD_DEFAULT_MAX_TOKENS`; a `max_tokens` past the model's limit is held to it."""
    async with FakeUpstream(name="a", models=("gpt-4o", "fake-model")) as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "1000000", "period": "total"}})
        async with running(sops_project, default_max_tokens=10) as board:
            found = [
                await _reserved(board, 1_000_000, body)
                for body in (
                    _body("fake-model"),
                    _body("gpt-4o"),
                    _body("gpt-4o", max_tokens=50_000),
                    _body("fake-model", max_completion_tokens=3),
                )
            ]
    assert found == [10 * 2, 16_384 * 2, 16_384 * 2, 3 * 2]  # completion tokens at 2 USD


async def test_the_default_max_tokens_is_4096(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "100000", "period": "day"}})
        async with running(sops_project) as board:
            reserved = await _reserved(board, 100_000, _body("fake-model"))
    assert reserved == 4096 * 2


async def test_with_the_ledger_off_budgets_hold_and_what_was_spent_survives_a_restart(
    sops_project: SopsProject,
) -> None:
    """`SWITCHBOARD_USAGE_DB=off`: no record and no spool, but the spent of each budget is kept in
    the local snapshot, and read back at the next start."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    bound = len(json.dumps(body)) + 3 * 2
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, budget={"usd": "1000", "period": "month"})
        write_routing(sops_project, chat="a")
        # covers one request's bound, and not a second's once the first's 7 USD are spent
        write_clients(sops_project, {"budget": {"usd": str(bound + 3), "period": "month"}})
        async with running(sops_project, usage_db="off") as board:
            ready = await (await board.get("/readyz")).json()
            served = await board.post("/v1/chat/completions", body, token=TOKEN)  # 7 USD: 1 in, 3 out
        assert not (sops_project.root / "var" / "usage-spool").exists()
        assert not (sops_project.root / "var" / "usage.db").exists()
        async with running(sops_project, usage_db="off") as board:
            limits = await (await board.get("/api/v1/llm-config/limits", token=READER)).json()
            refused = await board.post("/v1/chat/completions", body, token=TOKEN)
            error = (await refused.json())["error"]
    assert ready["ledger"] == "off" and served.status == 200
    assert served.headers[BUDGET_LEFT] == str(bound + 3 - 7)
    client = next(c for c in limits["clients"] if c["name"] == "client")
    assert client["used"]["budget_spent_usd"] == "7"
    assert limits["providers"][0]["used"]["budget_spent_usd"] == "7"
    assert refused.status == 429 and error["type"] == "budget_exceeded"


async def test_under_concurrency_no_providers_budget_is_overspent_and_the_rest_falls_back(
    sops_project: SopsProject,
) -> None:
    """A hundred requests at once, whole and streamed, to `a` (30 USD a day) falling back to `b`
    (30 USD a day), for a client of 45 USD: each request costs 3 USD, so `a` serves ten, `b` the
    five the client has left, and neither budget is passed."""
    async with upstreams({"name": "a", "latency_s": 0.05}, {"name": "b", "latency_s": 0.05}) as (a, b):
        for pid, up in (("a", a), ("b", b)):
            write_provider(
                sops_project, pid, provider="openai", base_url=up.base_url, api_key="sk-up",
                pricing={"*": {"input": "0", "output": "1000000"}}, budget={"usd": "30", "period": "day"},
            )  # fmt: skip
        write_routing(sops_project, chat={"primary": ["a"], "fallbacks": ["b"]})
        write_clients(sops_project, {"budget": {"usd": "45", "period": "day"}})
        async with metered(sops_project) as (board, records):
            answers = await asyncio.gather(
                *(chat(board, max_tokens=3, stream=n % 3 == 0) for n in range(100))
            )
            limits = await (await board.get("/api/v1/llm-config/limits", token=READER)).json()
    served = Counter(r.headers["x-switchboard-provider"] for r in answers if r.status == 200)
    assert served == {"a": 10, "b": 5}
    assert {r.status for r in answers} == {200, 429}
    spent = {p["id"]: p["used"]["budget_spent_usd"] for p in limits["providers"]}
    assert spent == {"a": "30", "b": "15"}
    by_provider = Counter[str]()
    for record in records.kept:
        if record.provider is not None:
            by_provider[record.provider] += int(record.cost_usd)
    assert by_provider == {"a": 30, "b": 15}

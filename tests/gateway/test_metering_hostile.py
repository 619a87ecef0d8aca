"""Hostile upstreams and clients against metering (docs/reference.md §13): whatever an upstream
reports as usage, or a client sends as a body, no answer is a 500 and no cost is wrong."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from aiohttp import web

from service.usage.tokens import MAX_TOKENS
from service.usage.values import MAX_COST
from tests.conftest import SopsProject
from tests.gateway.test_metering import COST, PRICING, TOKEN, chat, metered, metered_by, write_clients
from tests.support.gateway import write_provider, write_routing
from tests.support.upstreams import FakeUpstream


def _answering(usage: Any) -> web.Application:
    """An upstream whose every chat answer reports `usage`."""

    async def completions(request: web.Request) -> web.Response:
        answer = {"id": "c1", "object": "chat.completion", "choices": [], "usage": usage}
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def test_a_usage_count_past_any_float_is_held_to_the_bound_not_a_500(sops_project: SopsProject) -> None:
    """An upstream reporting 10**400 prompt tokens: JSON reads it as an int, the token metric
    could not add it (a float overflows); the answer is served, priced at `MAX_TOKENS`."""
    usage = {"prompt_tokens": 10**400, "completion_tokens": 2**1100, "total_tokens": 1}
    async with metered_by(sops_project, _answering(usage)) as (board, records):
        response = await chat(board)
        assert response.status == 200, await response.text()
    record = records.kept[0]
    assert (record.prompt_tokens, record.completion_tokens) == (MAX_TOKENS, MAX_TOKENS)
    assert Decimal(response.headers[COST]) == 3 * MAX_TOKENS
    assert record.cost_usd == MAX_COST  # the line holds what no request could cost to its bound


_HI = b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]'
HOSTILE_BODIES = [
    _HI + b', "max_tokens": 1' + b"0" * 400 + b"}",
    _HI + b', "max_tokens": -5, "n": -1}',
    _HI + b', "max_tokens": NaN}',
    _HI + b', "max_tokens": 1e400}',
    _HI + b', "max_tokens": "5", "n": "2"}',
    _HI + b', "max_tokens": true, "n": true}',
    _HI + b', "n": 100000000000000000000}',
    _HI + b', "max_tokens": -9223372036854775809}',
    _HI + b', "max_tokens": 5, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800 \\udfff"}], "max_tokens": 5}',
    b'{"model": "fake-model\\u0000\\ud800", "messages": []}',
]


async def test_hostile_bodies_are_never_a_500_nor_a_negative_cost(sops_project: SopsProject) -> None:
    """Bounds of the completion that are huge, negative, NaN, strings or booleans, `n` past 64
    bits, lone surrogates, deep nesting, a model with a NUL: answered, metered, never below 0."""
    async with FakeUpstream(name="a") as up:
        write_provider(
            sops_project, "a", provider="openai", base_url=up.base_url, api_key="sk-up", pricing=PRICING
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 1000, "budget": {"usd": "1000000000000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            statuses = []
            for raw in HOSTILE_BODIES:
                async with board.http.post(
                    board.url + "/v1/chat/completions",
                    data=raw,
                    headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    statuses.append((response.status, (await response.text())[:150]))
                    if COST in response.headers:
                        assert Decimal(response.headers[COST]) >= 0
    assert all(s < 500 for s, _ in statuses), statuses
    assert all(r.cost_usd >= 0 for r in records.kept)

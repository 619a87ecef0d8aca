"""docs/reference.md §13's pricing held from outside: a real Switchboard, its real ledger (SQLite)
and stand-in vendors; each token class priced once, embeddings on input, a rerank per query at
the vendor's price, as the answers' `x-switchboard-cost-usd` and the records read back say."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from tests.conftest import SopsProject
from tests.gateway.test_metering import COST, TOKEN, _sha, write_clients
from tests.gateway.test_metering_contract import BUDGET_LEFT, _records
from tests.support.gateway import running, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, serving

USAGE = "/api/v1/llm-config/usage"
RERANK_PER_QUERY = "0.002"
"""Cohere's `rerank-v3.5` in the price map bundled with litellm: USD a search unit (a query of up
to 100 documents), and 0 a token."""


def _cohere() -> web.Application:
    """Cohere's v2 rerank: what it billed in `meta.billed_units`, a search unit for each query of
    up to 100 documents, and no token `usage`."""

    async def rerank(request: web.Request) -> web.Response:
        documents = (await request.json())["documents"]
        results = [{"index": i, "relevance_score": 1 / (i + 1)} for i in range(min(len(documents), 3))]
        units = math.ceil(len(documents) / 100)
        meta = {"api_version": {"version": "2"}, "billed_units": {"search_units": units}}
        return web.json_response({"id": "rr-1", "results": results, "meta": meta})

    app = web.Application()
    app.router.add_post("/v2/rerank", rerank)
    return app


def _rerank(documents: int) -> dict[str, Any]:
    return {"model": "rerank-v3.5", "query": "cats", "documents": [f"doc {i}" for i in range(documents)]}


async def test_a_rerank_costs_the_vendors_price_for_each_query_it_billed_and_is_not_estimated(
    sops_project: SopsProject,
) -> None:
    """3 documents are one search unit, 250 three: 0.002 and 0.006 USD, as the vendor bills them;
    each answer said what it billed, so neither is an estimate. The reservation of 250 covers three
    queries: a budget that covers two refuses it, nothing sent."""
    async with serving(_cohere()) as url, FakeUpstream(name="chat") as chat_server:
        write_provider(
            sops_project, "co", provider="cohere", base_url=url, api_key="sk-up", purposes=["reranking"]
        )
        write_provider(sops_project, "c", base_url=chat_server.base_url)
        write_routing(sops_project, chat="c", reranking="co")
        write_clients(
            sops_project,
            {"budget": {"usd": "1", "period": "day"}},
            small={"token_sha256": _sha("sk-small-0123456789abcdef"), "scopes": ["completions"],
                   "limits": {"budget": {"usd": "0.005", "period": "day"}}},
        )  # fmt: skip
        async with running(sops_project) as board:
            one = await board.post("/v1/rerank", _rerank(3), token=TOKEN)
            three = await board.post("/v1/rerank", _rerank(250), token=TOKEN)
            refused = await board.post("/v1/rerank", _rerank(250), token="sk-small-0123456789abcdef")
            records = await _records(board, 3)
    assert (one.status, three.status, refused.status) == (200, 200, 429), await refused.text()
    assert (one.headers[COST], three.headers[COST]) == ("0.002", "0.006")
    assert three.headers[BUDGET_LEFT] == "0.992"
    served = {r["id"]: r for r in records if r["status"] == 200}
    for answer, cost in ((one, "0.002"), (three, "0.006")):
        record = served[answer.headers["x-request-id"]]
        assert (record["purpose"], record["provider"], record["cost_usd"]) == ("reranking", "co", cost)
        assert record["priced"] is True and record["estimated"] is False
    assert (await refused.json())["error"]["type"] == "budget_exceeded"

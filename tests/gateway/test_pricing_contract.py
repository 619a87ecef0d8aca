"""docs/reference.md §13's pricing held from outside: a real Switchboard, its real ledger (SQLite)
and stand-in vendors; each token class priced once, embeddings on input, a rerank per query at
the vendor's price, as the answers' `x-switchboard-cost-usd` and the records read back say."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from aiohttp import web

from tests.conftest import SopsProject
from tests.gateway.test_metering import COST, TOKEN, _sha, chat, write_clients
from tests.gateway.test_metering_contract import BUDGET_LEFT, _answering, _read, _records
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


async def test_cached_and_reasoning_tokens_are_each_priced_once_in_their_own_class(
    sops_project: SopsProject,
) -> None:
    """1,000 prompt tokens of which 400 cached, 500 completion of which 300 reasoning: 600 at input
    (1 USD a million), 400 at cached_input (0.5), 500 at output (2), the reasoning ones among them:
    0.0018 USD, in the answer's header, its record, and `/usage`, which counts each class."""
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 400},
        "completion_tokens_details": {"reasoning_tokens": 300},
    }
    pricing = {"*": {"input": 1, "output": 2, "cached_input": 0.5}}
    async with serving(_answering(usage)) as url:
        write_provider(
            sops_project, "a", provider="openai", base_url=f"{url}/v1", api_key="sk-up", pricing=pricing
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, None)
        async with running(sops_project) as board:
            whole = await chat(board, max_tokens=600)
            streamed = await chat(board, max_tokens=600, stream=True)
            records = await _records(board, 2)
            grouped = await _read(board, f"{USAGE}?group_by=model")
    assert whole.headers[COST] == "0.0018" and COST not in streamed.headers  # a stream's is in its record
    for record in records:
        tokens = [record[k] for k in ("prompt_tokens", "cached_tokens", "cache_write_tokens")]
        assert [*tokens, record["completion_tokens"], record["reasoning_tokens"]] == [1000, 400, 0, 500, 300]
        assert (record["cost_usd"], record["priced"], record["estimated"]) == ("0.0018", True, False)
    assert [r["stream"] for r in records] == [True, False]
    row = grouped["rows"][0]
    assert (row["model"], row["prompt_tokens"], row["cached_tokens"]) == ("fake-model", 2000, 800)
    assert (row["completion_tokens"], row["reasoning_tokens"], row["cost_usd"]) == (1000, 600, "0.0036")


async def test_embeddings_are_priced_on_input_alone(sops_project: SopsProject) -> None:
    """The stand-in counts 2 tokens in "hello world": 2 at 1,000 USD a million, no completion."""
    async with FakeUpstream(name="a") as up:
        write_provider(
            sops_project, "a", provider="openai", base_url=up.base_url, api_key="sk-up",
            purposes=["embeddings"], pricing={"*": {"input": 1000, "output": 5000}},
        )  # fmt: skip
        write_provider(sops_project, "c", base_url=up.base_url)
        write_routing(sops_project, chat="c", embeddings="a")
        write_clients(sops_project, {"budget": {"usd": "1", "period": "day"}})
        async with running(sops_project) as board:
            answer = await board.post(
                "/v1/embeddings", {"model": "fake-model", "input": "hello world"}, token=TOKEN
            )
            (record,) = await _records(board, 1)
    assert answer.status == 200 and answer.headers[COST] == "0.002"
    assert answer.headers[BUDGET_LEFT] == "0.998"
    assert (record["purpose"], record["prompt_tokens"], record["completion_tokens"]) == ("embeddings", 2, 0)
    assert (record["cost_usd"], record["priced"], record["estimated"]) == ("0.002", True, False)


async def test_a_rerank_billed_in_queries_that_its_prices_cannot_price_is_charged_its_reservation(
    sops_project: SopsProject,
) -> None:
    """A model the price map does not know, priced by its file per input token only: its answer
    says one search unit and no token, which no price here can cost, so it is charged what was
    held for it (each byte of the body a token), an estimate, never 0."""
    async with serving(_cohere()) as url, FakeUpstream(name="chat") as chat_server:
        write_provider(
            sops_project, "co", provider="cohere", base_url=url, api_key="sk-up", purposes=["reranking"],
            pricing={"*": {"input": 1000}},
        )  # fmt: skip
        write_provider(sops_project, "c", base_url=chat_server.base_url)
        write_routing(sops_project, chat="c", reranking="co")
        write_clients(sops_project, None)
        async with running(sops_project) as board:
            body = {**_rerank(3), "model": "house-reranker"}
            answer = await board.post("/v1/rerank", body, token=TOKEN)
            (record,) = await _records(board, 1)
    size = len(json.dumps(body).encode())  # as aiohttp sends it
    assert answer.status == 200 and answer.headers[COST] == str(Decimal(size) / 1000)
    assert (record["cost_usd"], record["priced"], record["estimated"]) == (answer.headers[COST], True, True)

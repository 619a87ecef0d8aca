"""Each request metered end to end (docs/reference.md §13): a real Switchboard with a clients file that sets
limits and budgets, in front of local stand-in vendors; records caught by a sink."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from service.gateway.account import _completion, _micros
from service.gateway.metering import RequestIds
from service.http.context import RELAY
from service.usage.record import Record
from service.usage.values import micros
from tests.conftest import SopsProject, eventually, serve
from tests.support.gateway import CANARY, Switchboard, running, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, serving, unanswered_url, upstreams

TOKEN = "sk-client-0123456789abcdef"
READER = "sk-reader-0123456789abcdef"
PRICING = {"*": {"input": 1_000_000, "output": 2_000_000}}
"""1 USD a token in, 2 out: the fake upstream's few tokens cost whole dollars."""
REQUEST_ID = "x-request-id"
COST = "x-switchboard-cost-usd"


class Records:
    """A sink that keeps every record."""

    def __init__(self) -> None:
        self.kept: list[Record] = []

    def submit(self, record: Record) -> None:
        self.kept.append(record)

    def by_id(self, record_id: str) -> Record:
        found = [r for r in self.kept if r.id == record_id]
        assert len(found) == 1, (record_id, [r.id for r in self.kept])
        return found[0]


def write_clients(project: SopsProject, limits: dict[str, Any] | None, **more: dict[str, Any]) -> None:
    """`clients.yaml` with `client` (token TOKEN, these limits) and `reader` (usage:read)."""
    entries = [
        {
            "name": "client",
            "token_sha256": _sha(TOKEN),
            "scopes": ["completions"],
            **({"limits": limits} if limits else {}),
        },
        {
            "name": "reader",
            "token_sha256": _sha(READER),
            "scopes": ["usage:read", "completions", "config:read"],
        },
    ]
    for name, entry in more.items():
        entries.append({"name": name, **entry})
    path = project.providers / "clients.yaml"
    path.write_text(yaml.safe_dump({"kind": "clients", "clients": entries}, sort_keys=False))


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@contextlib.asynccontextmanager
async def metered(project: SopsProject, **settings: Any) -> AsyncIterator[tuple[Switchboard, Records]]:
    records = Records()
    async with running(project, **settings) as board:
        meter = board.app[RELAY].meter
        assert meter is not None
        meter.sink = records
        yield board, records


@contextlib.asynccontextmanager
async def metered_by(
    project: SopsProject, app: web.Application
) -> AsyncIterator[tuple[Switchboard, Records]]:
    """The project metered, its one priced provider `a` served by `app`, its clients unlimited."""
    async with serving(app) as url:
        base = f"{url}/v1"
        write_provider(project, "a", provider="openai", base_url=base, api_key="sk-up", pricing=PRICING)
        write_routing(project, chat="a")
        write_clients(project, None)
        async with metered(project) as both:
            yield both


async def chat(
    board: Switchboard, content: str = "hi", token: str = TOKEN, **body: Any
) -> aiohttp.ClientResponse:
    return await board.chat(content, token=token, **body)


def priced_provider(project: SopsProject, pid: str, up: FakeUpstream, **fields: Any) -> None:
    write_provider(
        project,
        pid,
        provider="openai",
        base_url=up.base_url,
        api_key="sk-up",
        **{"pricing": PRICING, **fields},
    )


# -- a served request --------------------------------------------------------------------------------


async def test_an_answer_carries_its_id_cost_and_what_remains_and_is_one_record(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 5, "tpm": 1000, "budget": {"usd": "1000", "period": "month"}})
        async with metered(sops_project) as (board, records):
            response = await chat(board, "hello there", max_tokens=5)
            assert response.status == 200, await response.text()
    # prompt "hello there": 2 tokens, completion "a says: hello there": 4 tokens: 2 x 1 + 4 x 2 USD
    assert response.headers[COST] == "10"
    assert response.headers[REQUEST_ID] == "req-a-1"  # the upstream's id, passed back
    assert response.headers["x-switchboard-remaining-requests"] == "4"
    assert response.headers["x-switchboard-remaining-tokens"] == "994"
    assert response.headers["x-switchboard-budget-remaining-usd"] == "990"
    record = records.by_id("req-a-1")
    assert (record.client, record.provider, record.model, record.status) == ("client", "a", "fake-model", 200)
    assert (record.prompt_tokens, record.completion_tokens, record.cost_usd) == (2, 4, Decimal(10))
    assert record.priced and not record.estimated and not record.stream and record.attempts == 1
    assert record.to_json()["cost_usd"] == "10" and record.ttfb_ms is not None


async def test_a_cost_of_millionths_is_written_in_plain_digits_and_charged_rounded_up(
    sops_project: SopsProject,
) -> None:
    """Priced in whole atto-dollars (issue 22): 2 tokens in at 0.15 USD per million and 4 out at
    0.60 cost 0.0000027 USD, written so (never `2.7E-6`) in the header and the record, and the
    budget is charged that in nano-dollars."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, pricing={"*": {"input": 0.15, "output": "0.60"}})
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "1000", "period": "month"}})
        async with metered(sops_project) as (board, records):
            response = await chat(board, "hello there", max_tokens=5)
            assert response.status == 200, await response.text()
            metrics = await board.metrics()
    assert response.headers[COST] == "0.0000027"
    assert response.headers["x-switchboard-budget-remaining-usd"] == "999.9999973"
    record = records.by_id("req-a-1")
    assert record.cost_usd == Decimal("0.0000027") and record.to_json()["cost_usd"] == "0.0000027"
    assert 'switchboard_cost_usd_total{client="client",model="fake-model",provider="a"} 2.7e-06' in metrics


async def test_the_cost_of_an_answer_is_labelled_by_the_model_its_tokens_are(
    sops_project: SopsProject,
) -> None:
    """A provider that declares no models: the model label is the one the answer names (bounded
    per provider), the same for the answer's cost as for its tokens."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, model_map={"alias": "real-name"})
        write_routing(sops_project, chat="a")
        write_clients(sops_project, None)
        async with metered(sops_project) as (board, _):
            for model in ("alias", "alias", "other-model"):
                assert (await chat(board, max_tokens=3, model=model)).status == 200
            metrics = await board.metrics()
    series = [
        line
        for line in metrics.splitlines()
        if line.startswith(("switchboard_cost_usd_total", "switchboard_tokens_total"))
    ]
    assert sorted(series) == [
        'switchboard_cost_usd_total{client="client",model="other-model",provider="a"} 7.0',
        'switchboard_cost_usd_total{client="client",model="real-name",provider="a"} 14.0',
        'switchboard_tokens_total{client="client",kind="completion",model="other-model",provider="a"} 3.0',
        'switchboard_tokens_total{client="client",kind="completion",model="real-name",provider="a"} 6.0',
        'switchboard_tokens_total{client="client",kind="prompt",model="other-model",provider="a"} 1.0',
        'switchboard_tokens_total{client="client",kind="prompt",model="real-name",provider="a"} 2.0',
    ]


async def test_a_limited_clients_answer_refused_before_its_limits_carries_what_remains(
    sops_project: SopsProject,
) -> None:
    """docs/reference.md §13: "every answer to a client with limits carries" the remaining-*
    headers. An answer given before the limits are asked (a model no provider serves, a body
    that is not JSON, a media type that is not JSON) counts nothing, and says what remains:
    none of them carried the headers."""
    async with FakeUpstream(name="a") as a:
        priced_provider(sops_project, "a", a, models=["fake-model"])
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 5, "budget": {"usd": "300", "period": "day"}})
        async with metered(sops_project) as (board, _):
            url = f"{board.base_url}/chat/completions"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            answers = [await chat(board, model="no-such-model", max_tokens=5)]
            for data, media in ((b"{not json", "application/json"), (b"{}", "text/plain")):
                async with board.http.post(url, data=data, headers={**auth, "Content-Type": media}) as r:
                    await r.read()
                    answers.append(r)
            served = await chat(board, max_tokens=5)
    assert [r.status for r in answers] == [404, 400, 415]
    for refused in answers:
        assert refused.headers["x-switchboard-remaining-requests"] == "5", refused.status
        assert refused.headers["x-switchboard-remaining-tokens"] == "unlimited"
        assert refused.headers["x-switchboard-budget-remaining-usd"] == "300"
    assert served.status == 200 and served.headers["x-switchboard-remaining-requests"] == "4"


async def test_a_refusal_of_the_token_or_its_scope_says_nothing_of_any_clients_limits(
    sops_project: SopsProject,
) -> None:
    """The remaining-* headers are the calling client's, once it is known to be let in: a wrong
    token (401) or one without `completions` (403, a client with limits of its own) learns
    nothing of its limits or another's, and a client without limits (415) carries none."""
    weak = "sk-weak-0123456789abcdef"
    async with FakeUpstream(name="a") as a:
        priced_provider(sops_project, "a", a, models=["fake-model"])
        write_routing(sops_project, chat="a")
        write_clients(
            sops_project,
            {"rpm": 5, "budget": {"usd": "300", "period": "day"}},
            weak={"token_sha256": _sha(weak), "scopes": ["config:read"], "limits": {"rpm": 7}},
        )
        async with metered(sops_project) as (board, _):
            url = f"{board.base_url}/chat/completions"
            answers = []
            for token, media in (
                (weak, "application/json"),
                ("sk-wrong", "application/json"),
                (READER, "text/plain"),
            ):
                headers = {"Authorization": f"Bearer {token}", "Content-Type": media}
                async with board.http.post(url, data=b"{}", headers=headers) as r:
                    await r.read()
                    answers.append(r)
    assert [r.status for r in answers] == [403, 401, 415]
    for refused in answers:
        assert not [
            h for h in refused.headers if h.lower().startswith("x-switchboard-") and "remaining" in h.lower()
        ]


async def test_every_answer_to_a_limited_client_carries_both_remaining_counts_even_without_rpm_or_tpm(
    sops_project: SopsProject,
) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        priced_provider(sops_project, "a", a)
        write_provider(sops_project, "b", provider="openai", base_url=b.base_url, api_key="sk-up")  # unpriced
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"max_parallel": 4, "budget": {"usd": "300", "period": "day"}})
        async with metered(sops_project) as (board, _):
            served = await chat(board, max_tokens=5)
            refused = await chat(board)  # 4096 completion tokens at 2 USD: over the budget
            write_routing(sops_project, chat="b")  # with a budget, an unpriced vendor is skipped
            nowhere = None

            async def skipped() -> bool:
                nonlocal nowhere
                nowhere = await chat(board, max_tokens=5)
                return nowhere.status == 503

            await eventually(skipped, timeout=10)
            assert nowhere is not None
    for response, status in ((served, 200), (refused, 429), (nowhere, 503)):
        assert response.status == status, await response.text()
        assert response.headers["x-switchboard-remaining-requests"] == "unlimited"
        assert response.headers["x-switchboard-remaining-tokens"] == "unlimited"
        left = Decimal(response.headers["x-switchboard-budget-remaining-usd"])
        assert (
            left == 293 if response is not nowhere else (300 - left) % 7 == 0
        )  # "hi": 1 token in, 3 out: 7 USD


async def test_every_gateway_answer_carries_a_unique_request_id(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a"}) as (up,):
        write_provider(sops_project, "a", base_url=up.base_url)  # a server, unpriced: free
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 1})
        async with metered(sops_project) as (board, records):
            ours = []
            response = await board.post("/v1/chat/completions", {"model": 3}, token=TOKEN)  # 400
            ours.append(response.headers[REQUEST_ID])
            response = await board.post("/v1/chat/completions", {}, token="wrong")
            ours.append(response.headers.get(REQUEST_ID, "none"))
            served = await chat(board, stream=True)
            assert served.status == 200
            limited = await chat(board)
            assert limited.status == 429
            ours.append(limited.headers[REQUEST_ID])
    assert len(set(ours)) == len(ours) and "none" not in ours
    assert served.headers[REQUEST_ID] == "req-a-1"
    assert [r.status for r in records.kept] == [200, 429]  # the 400 and 401 are no records
    assert records.kept[1].id == ours[-1] and records.kept[1].limited and records.kept[1].provider is None


async def test_answers_before_the_limits_are_checked_are_no_records_and_count_toward_no_limit(
    sops_project: SopsProject,
) -> None:
    """400, 401, 403, 404, 413 and 415 come before the limits: with an rpm of 1, the client is
    served after all of them, and only that answer is recorded."""
    noscope = "sk-noscope-0123456789abcdef"
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, models=["fake-model"])
        write_routing(sops_project, chat="a")
        write_clients(
            sops_project,
            {"rpm": 1},
            noscope={"token_sha256": _sha(noscope), "scopes": ["config:read"], "limits": {"rpm": 1}},
        )
        async with metered(sops_project, max_body_bytes=4096) as (board, records):
            url = f"{board.base_url}/chat/completions"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            statuses = [
                (await board.post("/v1/chat/completions", {"model": 3}, token=TOKEN)).status,
                (await board.post("/v1/chat/completions", {}, token="sk-wrong")).status,
                (await board.post("/v1/chat/completions", {"model": "fake-model"}, token=noscope)).status,
                (await chat(board, model="no-such-model")).status,
                (await chat(board, "x" * 8192)).status,
            ]
            async with board.http.post(url, data="hi", headers={**auth, "Content-Type": "text/plain"}) as r:
                statuses.append(r.status)
            served = await chat(board)
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    assert statuses == [400, 401, 403, 404, 413, 415]
    assert served.status == 200 and served.headers["x-switchboard-remaining-requests"] == "0"
    assert [(r.client, r.status) for r in records.kept] == [("client", 200)]
    used = {c["name"]: c["used"]["requests_60s"] for c in limits["clients"]}
    assert used == {"client": 1, "reader": 0, "noscope": 0}
    assert len(up.requests) == 1


async def test_a_model_listing_says_what_remains_and_that_it_cost_nothing(sops_project: SopsProject) -> None:
    """`GET /v1/models` to a client with limits is an answer like any other (docs/reference.md
    §13): it says what remains, and that it cost nothing; it is no completion, so it counts
    toward no limit and is no record."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 2, "budget": {"usd": "1000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            listed = [await board.get("/v1/models", token=TOKEN) for _ in range(3)]
            served = await chat(board, max_tokens=5)
            await board.recorded()
    assert [r.status for r in listed] == [200] * 3
    for answer in listed:
        assert answer.headers["x-switchboard-remaining-requests"] == "2"
        assert answer.headers["x-switchboard-remaining-tokens"] == "unlimited"
        assert answer.headers["x-switchboard-budget-remaining-usd"] == "1000"
        assert answer.headers["x-switchboard-cost-usd"] == "0"
    assert served.status == 200 and served.headers["x-switchboard-remaining-requests"] == "1"
    assert [r.status for r in records.kept] == [200]


async def test_concurrent_answers_each_say_what_remained_once_they_were_counted(
    sops_project: SopsProject,
) -> None:
    """The contract: "an `rpm` of 5 gives 4, 3, 2, 1, 0", each answer saying what remains after
    it was counted. Five requests in flight at once are counted one after the other at
    admission: their answers say 4, 3, 2, 1 and 0 between them, not all 0 as the window
    stands when each ends."""
    async with FakeUpstream(name="a", latency_s=0.3) as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 5, "max_parallel": 5})
        async with metered(sops_project) as (board, _):
            answers = await asyncio.gather(*(chat(board) for _ in range(5)))
    assert [r.status for r in answers] == [200] * 5
    assert sorted(r.headers["x-switchboard-remaining-requests"] for r in answers) == ["0", "1", "2", "3", "4"]


# -- refusals ------------------------------------------------------------------------------------


async def test_a_client_over_rpm_gets_429_with_when_to_retry_and_nothing_goes_upstream(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 2, "max_parallel": 4})
        async with metered(sops_project) as (board, records):
            remaining = []
            for _ in range(2):
                response = await chat(board)
                remaining.append(response.headers["x-switchboard-remaining-requests"])
            refused = await chat(board)
            body = await refused.json()
            metrics = await board.metrics()
    assert remaining == ["1", "0"]
    assert (
        refused.status == 429 and body["error"]["type"] == "rate_limited" and body["error"]["limit"] == "rpm"
    )
    assert body["error"]["message"]
    retry_ms = int(refused.headers["retry-after-ms"])
    assert 0 < retry_ms <= 60_000 and refused.headers["Retry-After"] == str(-(-retry_ms // 1000))
    assert refused.headers["x-switchboard-remaining-requests"] == "0"
    assert COST in refused.headers and REQUEST_ID in refused.headers
    assert len(up.requests) == 2
    assert 'switchboard_limited_total{client="client",limit="rpm"} 1.0' in metrics
    record = records.kept[-1]
    assert (record.status, record.limited, record.cost_usd, record.provider) == (429, True, 0, None)


async def test_a_budget_that_cannot_cover_the_request_is_429_once_an_event_and_a_metric(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        # "hi": the body is ~70 bytes, so ~70 USD of prompt bound plus 4096 x 2 of completion:
        # max_tokens bounds it instead.
        write_clients(sops_project, {"budget": {"usd": "300", "period": "day"}})
        async with metered(sops_project) as (board, _):
            first = await chat(board, max_tokens=5)
            assert first.status == 200, await first.text()
            refused = await chat(board)  # no max_tokens: 4096 completion tokens at 2 USD: too much
            body = await refused.json()
            again = await chat(board)
            await board.recorded()
            events = board.events("budget.exhausted")
            metrics = await board.metrics()
    assert refused.status == 429 and body["error"]["type"] == "budget_exceeded"
    end = body["error"]["period_end"]
    assert end.endswith("T00:00:00Z")
    assert 0 < int(refused.headers["Retry-After"]) <= 86_400
    retry_ms = refused.headers["retry-after-ms"]
    assert retry_ms.isdigit() and refused.headers["Retry-After"] == str(-(-int(retry_ms) // 1000))
    # a 429 carries what remains too: 7 USD spent of 300, nothing held
    assert refused.headers["x-switchboard-budget-remaining-usd"] == "293"
    assert refused.headers["x-switchboard-remaining-requests"] == "unlimited"
    assert again.status == 429
    assert [(e["subject"], e["kind"], e["period_end"]) for e in events] == [("client", "client", end)]
    assert 'switchboard_budget_spent_usd{kind="client",subject="client"}' in metrics
    assert [line for line in metrics.splitlines() if line.startswith("switchboard_cost_usd_total")] == [
        'switchboard_cost_usd_total{client="client",model="fake-model",provider="a"} 7.0'
    ]  # "hi": 1 token in, "a says: hi" 3 out


async def test_budget_exhausted_is_written_once_per_period_in_the_log_across_restarts(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "300", "period": "day"}})
        for _ in range(2):  # the same replica, stopped and started again in the same day
            async with metered(sops_project) as (board, _):
                refused = await chat(board)  # 4096 completion tokens at 2 USD: too much
                assert refused.status == 429
                await board.recorded()
                events = board.events("budget.exhausted")
    assert [(e["subject"], e["kind"]) for e in events] == [("client", "client")]


async def test_a_total_budget_refuses_without_retry_after(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "1", "period": "total"}})
        async with metered(sops_project) as (board, _):
            refused = await chat(board, max_tokens=5)
            body = await refused.json()
    assert refused.status == 429 and body["error"]["period_end"] is None
    assert "Retry-After" not in refused.headers and "retry-after-ms" not in refused.headers


async def test_a_hundred_concurrent_requests_against_a_budget_that_covers_ten(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a", latency_s=0.05) as up:
        write_provider(
            sops_project, "a", provider="openai", base_url=up.base_url, api_key="sk-up",
            pricing={"*": {"input": "0", "output": "1000000"}},
        )  # fmt: skip
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "30", "period": "month"}})
        async with metered(sops_project) as (board, records):
            # "a says: hi", 3 tokens at 1 USD; max_tokens 3 reserves 3 USD: ten fit in 30 USD.
            answers = await asyncio.gather(*(chat(board, max_tokens=3) for _ in range(100)))
            statuses = [a.status for a in answers]
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    assert statuses.count(200) == 10 and statuses.count(429) == 90
    spent = sum((r.cost_usd for r in records.kept), Decimal(0))
    assert spent == 30
    used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
    assert Decimal(used["budget_spent_usd"]) == spent and used["budget_reserved_usd"] == "0"


# -- providers and their budgets ---------------------------------------------------------------------


async def test_a_provider_out_of_budget_is_skipped_and_the_request_falls_back(
    sops_project: SopsProject,
) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        priced_provider(sops_project, "a", a, budget={"usd": "100", "period": "day"})
        priced_provider(sops_project, "b", b)
        write_routing(sops_project, chat={"primary": ["a"], "fallbacks": ["b"]})
        write_clients(sops_project, None)
        async with metered(sops_project) as (board, records):
            first = await chat(board, max_tokens=5)  # a bound of ~80 + 10 USD
            second = await chat(board, max_tokens=5)  # 10 spent of 100: the bound no longer fits
            _, provider = await _get(board, "/api/v1/llm-config/providers/a")
            await board.recorded()
            events = board.events("budget.exhausted")
            priced_provider(sops_project, "a", a, budget={"usd": "2000", "period": "day"})  # raised
            await eventually(lambda: _health(board, "a"), timeout=10)
            third = await chat(board, max_tokens=5)
    assert (first.headers["x-switchboard-provider"], second.headers["x-switchboard-provider"]) == ("a", "b")
    assert provider["health"]["status"] == "unhealthy" and provider["health"]["reason"] == "budget"
    assert [(e["subject"], e["kind"]) for e in events] == [("a", "provider")]
    assert third.headers["x-switchboard-provider"] == "a"
    assert [r.provider for r in records.kept] == ["a", "b", "a"]


async def test_a_request_no_provider_could_take_for_its_budget_counts_toward_no_limit(
    sops_project: SopsProject,
) -> None:
    """The contract: "A request refused by one limit consumes nothing of the others"; a provider
    out of budget is "skipped like an open circuit", and docs/reference.md §13.3 says of a 503
    `no_candidate`: "what was known, nothing counted". Every candidate's budget refusing, the
    client's rpm is not used up: it is never told 429 for requests that went nowhere."""
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        for pid, up in (("a", a), ("b", b)):  # ~70 USD of prompt bound alone: neither can take one
            priced_provider(sops_project, pid, up, budget={"usd": "50", "period": "day"})
        write_routing(sops_project, chat={"primary": ["a"], "fallbacks": ["b"]})
        write_clients(sops_project, {"rpm": 2, "max_parallel": 1, "budget": {"usd": "1000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            answers = [await chat(board, max_tokens=5) for _ in range(4)]
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    assert [r.status for r in answers] == [503] * 4, [r.status for r in answers]
    assert [r.headers["x-switchboard-remaining-requests"] for r in answers] == ["2"] * 4
    assert [r.headers["x-switchboard-budget-remaining-usd"] for r in answers] == ["1000"] * 4
    used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
    assert (used["requests_60s"], used["in_flight"], used["budget_reserved_usd"]) == (0, 0, "0")
    assert [(r.status, r.provider, r.cost_usd) for r in records.kept] == [(503, None, 0)] * 4
    assert not a.requests and not b.requests


async def _health(board: Switchboard, pid: str) -> bool:
    _, provider = await _get(board, f"/api/v1/llm-config/providers/{pid}")
    return bool(provider["health"]["status"] != "unhealthy")


async def test_a_vendor_without_a_price_never_takes_a_budgeted_request(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        write_provider(sops_project, "a", provider="openai", base_url=a.base_url, api_key="sk-up")
        write_provider(sops_project, "b", base_url=b.base_url)  # a server: free, may serve
        write_routing(sops_project, chat={"primary": ["a"], "fallbacks": ["b"]})
        write_clients(sops_project, {"budget": {"usd": "5", "period": "day"}})
        async with metered(sops_project) as (board, records):
            served = await chat(board)
            alone = await chat(board, token=READER)  # no budget: the vendor may take it
            write_routing(sops_project, chat="a")
            await eventually(lambda: _routed_alone(board), timeout=10)
            refused = await chat(board)
            body = await refused.json()
    assert served.headers["x-switchboard-provider"] == "b" and alone.headers["x-switchboard-provider"] == "a"
    assert refused.status == 503 and body["error"]["skipped"] == [{"provider": "a", "reason": "unpriced"}]
    assert len(a.requests) == 1
    assert records.kept[0].cost_usd == 0 and records.kept[0].priced is False


async def _routed_alone(board: Switchboard) -> bool:
    _, route = await _get(board, "/api/v1/llm-config/active/chat")
    return [p["id"] for p in route["primary"]] == ["a"] and not route["fallbacks"]


# -- streams and failures ----------------------------------------------------------------------------


async def test_a_stream_cut_midway_is_charged_its_reservation(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            up.drop_after(2)
            response = await chat(board, "a b c", stream=True, max_tokens=10)
            text = await response.text()
            await eventually(lambda: len(records.kept) == 1)
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    assert response.status == 200 and "upstream_failed" in text
    assert REQUEST_ID in response.headers and COST not in response.headers
    assert response.headers["x-switchboard-budget-remaining-usd"]
    record = records.kept[0]
    bound = Decimal(
        len(
            json.dumps(
                {
                    "model": "fake-model",
                    "messages": [{"role": "user", "content": "a b c"}],
                    "stream": True,
                    "max_tokens": 10,
                }
            )
        )
    )
    assert record.estimated and record.stream and record.status == 200
    assert record.cost_usd == bound + 20  # every byte of the body a token at 1 USD, 10 out at 2
    used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
    assert Decimal(used["budget_spent_usd"]) == record.cost_usd


async def test_a_client_that_leaves_midstream_is_charged_its_reservation(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a", chunk_interval_s=0.2) as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}, "max_parallel": 1})
        async with metered(sops_project) as (board, records):
            payload = {
                "model": "fake-model",
                "messages": [{"role": "user", "content": "one two three"}],
                "stream": True,
            }
            async with board.http.post(
                f"{board.base_url}/chat/completions",
                json=payload,
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as response:
                sent_id = response.headers[REQUEST_ID]
                await response.content.readany()  # the first chunk, then away
            await eventually(lambda: len(records.kept) == 1, timeout=10)
            after = await chat(board, max_tokens=1)  # its slot was freed
    record = records.kept[0]
    assert record.estimated and record.cost_usd > 0 and record.provider == "a"
    assert record.status == 200 and record.id == sent_id  # what the client was sent, before it left
    assert after.status == 200


async def test_a_client_that_leaves_during_the_streams_last_write_is_charged_its_usage(
    sops_project: SopsProject,
) -> None:
    """The upstream's whole stream, its usage included, was read when the client left during its
    last write (the client reads no more; the gateway's socket is full): the vendor billed that
    usage, so the record and the budget count it, not the request's reservation."""
    last = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_event({"choices": [{"index": 0, "delta": {"content": "one"}}]}))
        await last.wait()
        rest = _event({"choices": [{"index": 0, "delta": {"content": "x" * 30_000}}]})
        rest += _event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
        await response.write_eof(rest + b"data: [DONE]\n\n")  # its end in the same write
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    async with serving(app) as url:
        write_provider(
            sops_project, "a", provider="openai", base_url=f"{url}/v1", api_key="sk-up", pricing=PRICING
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}})
        async with serve(sops_project) as service:
            records = Records()
            meter = service.app[RELAY].meter
            assert meter is not None
            meter.sink = records
            loop = asyncio.get_running_loop()
            with socket.socket() as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.setblocking(False)
                await loop.sock_connect(client, ("127.0.0.1", int(service.url.rsplit(":", 1)[1])))
                body = json.dumps(
                    {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
                )
                await loop.sock_sendall(
                    client,
                    (
                        "POST /v1/chat/completions HTTP/1.1\r\nHost: switchboard\r\n"
                        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n{body}"
                    ).encode(),
                )
                received = b""
                while b"one" not in received:  # the first event: then the client reads no more
                    received += await loop.sock_recv(client, 65536)
                server = service.runner.server
                assert server is not None
                (handler,) = [
                    h
                    for h in server.connections
                    if h.transport is not None
                    and h.transport.get_extra_info("peername") == client.getsockname()
                ]
                transport = handler.transport
                assert isinstance(transport, asyncio.WriteTransport)
                transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                transport.set_write_buffer_limits(high=1)  # what the kernel does not take waits
                last.set()
                await eventually(lambda: transport.get_write_buffer_size() > 0, timeout=5)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await eventually(lambda: len(records.kept) == 1, timeout=10)
            _, limits = await service.get("/api/v1/llm-config/limits", READER)
    record = records.kept[0]
    assert (record.status, record.estimated, record.prompt_tokens, record.completion_tokens) == (
        200,
        False,
        5,
        2,
    )
    assert record.cost_usd == 9  # 5 in at 1 USD, 2 out at 2
    used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
    assert (used["budget_spent_usd"], used["budget_reserved_usd"], used["in_flight"]) == ("9", "0", 0)


async def test_a_client_that_leaves_during_a_fallback_is_charged_its_reservation_not_an_earlier_usage(
    sops_project: SopsProject,
) -> None:
    """A Messages request, translated to chat: `a` answers 2xx with a usage but nothing a message
    can be made of (its attempt fails), `b` is slow and the client leaves meanwhile. What `b` is
    charged is its reservation, not `a`'s usage at `b`'s prices."""

    async def untranslatable(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", untranslatable)
    async with serving(app) as url, FakeUpstream(name="b", latency_s=1.0) as b:
        write_provider(
            sops_project, "a", provider="openai", base_url=f"{url}/v1", api_key="sk-up", pricing=PRICING
        )
        priced_provider(sops_project, "b", b)
        write_routing(sops_project, chat={"primary": ["a"], "fallbacks": ["b"]})
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            message = {
                "model": "fake-model",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            }
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await board.post("/v1/messages", message, token=TOKEN)
            await eventually(lambda: len(records.kept) == 1, timeout=10)
            await eventually(lambda: len(b.requests) == 1, timeout=5)
    record = records.kept[0]
    assert (record.status, record.provider, record.attempts, record.estimated) == (499, "b", 2, True)
    assert record.prompt_tokens == record.completion_tokens == 0
    assert record.cost_usd > 10  # the body's bytes at 1 USD and 5 tokens out at 2: not 3 USD


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps({"id": "c", "model": "fake-model", **chunk}).encode() + b"\n\n"


async def test_a_request_every_upstream_failed_costs_nothing(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            up.fail(500)
            failed = await chat(board)
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    assert failed.status == 502 and failed.headers[COST] == "0" and REQUEST_ID in failed.headers
    assert failed.headers["x-switchboard-budget-remaining-usd"] == "10000"
    assert [(r.status, r.cost_usd, r.attempts) for r in records.kept] == [(502, 0, 1)]
    record = records.kept[0]  # it names the provider it last tried, which failed it
    assert (record.provider, record.upstream_model, record.ttfb_ms) == ("a", "fake-model", None)
    used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
    assert (used["budget_spent_usd"], used["budget_reserved_usd"], used["in_flight"]) == ("0", "0", 0)


async def test_a_fallback_records_the_upstreams_tried_as_its_attempts_header_says(
    sops_project: SopsProject,
) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        priced_provider(sops_project, "a", a)
        priced_provider(sops_project, "b", b)
        write_routing(sops_project, chat={"primary": ["a"], "fallbacks": ["b"]})
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            a.fail(500)
            response = await chat(board, max_tokens=3)
    assert response.status == 200 and response.headers["x-switchboard-attempts"] == "2"
    (record,) = records.kept
    assert (record.attempts, record.provider, record.cost_usd) == (2, "b", 7)


# -- reading ---------------------------------------------------------------------------------------


async def test_limits_lists_every_client_and_provider_with_its_use(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, budget={"usd": "500", "period": "week"})
        write_routing(sops_project, chat="a")
        write_clients(
            sops_project,
            {"rpm": 10, "tpm": 500, "max_parallel": 2, "budget": {"usd": "500.5", "period": "month"}},
        )
        async with metered(sops_project) as (board, _):
            await chat(board, max_tokens=3)
            status, limits = await _get(board, "/api/v1/llm-config/limits")
            forbidden, _ = await _get(board, "/api/v1/llm-config/limits", token=TOKEN)
            _, whoami = await _get(board, "/api/v1/llm-config/whoami", token=TOKEN)
            _, ready = await _get(board, "/readyz")
    assert status == 200 and forbidden == 403
    client = next(c for c in limits["clients"] if c["name"] == "client")
    assert client["limits"] == {
        "rpm": 10,
        "tpm": 500,
        "max_parallel": 2,
        "budget": {"usd": "500.5", "period": "month"},
    }
    assert client["used"]["requests_60s"] == 1 and client["used"]["tokens_60s"] == 4
    assert client["used"]["in_flight"] == 0 and client["used"]["budget_spent_usd"] == "7"
    assert client["used"]["period_end"].endswith("-01T00:00:00Z")
    reader = next(c for c in limits["clients"] if c["name"] == "reader")
    assert reader["limits"] is None and reader["used"]["budget_spent_usd"] is None
    provider = next(p for p in limits["providers"] if p["id"] == "a")
    assert provider["limits"] == {"budget": {"usd": "500", "period": "week"}}
    assert provider["used"]["budget_spent_usd"] == "7" and provider["used"]["requests_60s"] == 1
    assert whoami["client"] == "client" and whoami["limits"] == client["limits"]
    assert whoami["used"]["budget_spent_usd"] == "7"
    assert ready["limits"] == "local" and ready["degraded"] is False
    assert (limits["mode"], limits["replicas"]) == ("local", 1)  # /readyz's limits; the replicas seen


async def test_without_a_clients_file_a_request_is_recorded_as_anonymous(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        async with metered(sops_project) as (board, records):
            response = await board.chat("hi", token=None)
            _, whoami = await _get(board, "/api/v1/llm-config/whoami", token="")
    assert response.status == 200 and whoami["client"] is None
    assert [(r.client, r.provider, r.status) for r in records.kept] == [("anonymous", "a", 200)]
    assert "x-switchboard-remaining-requests" not in response.headers  # no client, no limits


async def _get(board: Switchboard, path: str, token: str = READER) -> tuple[int, Any]:
    response = await board.get(path, token=token)
    return response.status, await response.json() if response.status == 200 else None


async def test_a_budget_is_not_reset_by_a_restart(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "1000", "period": "month"}})
        async with metered(sops_project) as (board, _):
            assert (await chat(board, max_tokens=3)).status == 200
        assert (sops_project.root / "var" / "usage-spent.json").exists()  # written at the stop
        async with metered(sops_project) as (board, _):
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    client = next(c for c in limits["clients"] if c["name"] == "client")
    assert client["used"]["budget_spent_usd"] == "7"


async def test_a_budget_given_a_longer_period_keeps_what_was_spent_in_it(sops_project: SopsProject) -> None:
    """The contract: "A change of limits in the clients file applies with the file [...]; what was
    already spent in the period stays spent". A day's budget made a month's keeps the day's
    spend, though a request was counted in the new period before its spent was read back."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "1000", "period": "day"}})
        async with running(sops_project) as board:
            for _ in range(2):
                assert (await chat(board, max_tokens=3)).status == 200  # 7 USD each

            async def stored() -> bool:
                _, page = await _get(board, "/api/v1/llm-config/usage/requests?since=1h")
                return bool(page and len(page["requests"]) == 2)

            await eventually(stored, timeout=5)
            write_clients(sops_project, {"budget": {"usd": "1000", "period": "month"}})

            async def used(period: str, spent: str | None = None) -> bool:
                _, limits = await _get(board, "/api/v1/llm-config/limits")
                client = next(c for c in limits["clients"] if c["name"] == "client")
                return bool(
                    client["limits"]["budget"]["period"] == period
                    and (spent is None or client["used"]["budget_spent_usd"] == spent)
                )

            await eventually(lambda: used("month"), timeout=10)
            assert (await chat(board, max_tokens=3)).status == 200
            await eventually(lambda: used("month", "21"), timeout=5)


async def test_a_client_that_leaves_before_a_whole_answer_is_charged_and_recorded(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a", latency_s=1.0) as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    await chat(board, max_tokens=5)
            await eventually(lambda: len(records.kept) == 1, timeout=10)
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    record = records.kept[0]
    assert (record.status, record.provider, record.estimated) == (499, "a", True) and record.cost_usd > 0
    used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
    assert Decimal(used["budget_spent_usd"]) == record.cost_usd and used["budget_reserved_usd"] == "0"


async def _leave_after(board: Switchboard, seconds: float, **body: Any) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await chat(board, max_tokens=5, **body)


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])  # directly, and chat through litellm
async def test_a_client_that_leaves_while_the_upstream_is_still_connecting_is_not_charged(
    sops_project: SopsProject, vendor: str
) -> None:
    """The request never reached the upstream: nothing could be billed for it (docs/reference.md
    §13.2: only once the upstream has the request is a client that leaves charged)."""
    with unanswered_url() as url:
        write_provider(
            sops_project,
            "a",
            provider=vendor,
            base_url=url,
            api_key="sk-up",
            pricing=PRICING,
            connect_timeout_s=30,
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}, "max_parallel": 1})
        async with metered(sops_project) as (board, records):
            await _leave_after(board, 0.5)
            await eventually(lambda: len(records.kept) == 1, timeout=10)
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    record = records.kept[0]
    assert (record.status, record.cost_usd, record.estimated) == (499, 0, False)
    assert record.provider == "a" and record.attempts == 1  # the provider it was being sent to
    used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
    assert (used["budget_spent_usd"], used["budget_reserved_usd"], used["in_flight"]) == ("0", "0", 0)


async def test_a_client_that_leaves_while_litellms_upstream_works_is_charged(
    sops_project: SopsProject,
) -> None:
    """Chat to Anthropic goes through litellm: its request, once written, is the upstream's too."""
    async with FakeUpstream(protocol="anthropic", name="claude", api_key="sk-up", latency_s=1.0) as up:
        write_provider(
            sops_project, "a", provider="anthropic", base_url=up.url, api_key="sk-up", pricing=PRICING
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            await chat(board, max_tokens=1)  # litellm loaded: the next one is timed by the upstream
            await _leave_after(board, 0.5)
            await eventually(lambda: len(records.kept) == 2, timeout=10)
    record = records.kept[1]
    assert (record.status, record.provider, record.estimated) == (499, "a", True) and record.cost_usd > 0


async def test_a_client_that_leaves_after_the_upstream_answered_2xx_is_charged(
    sops_project: SopsProject,
) -> None:
    """The upstream accepted the request (its 200 and headers came) but the body is slow: the
    client that leaves now is charged its reservation, `estimated: true`."""
    accepted = asyncio.Event()

    async def slow_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        accepted.set()
        await asyncio.sleep(30)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", slow_body)
    async with serving(app) as url:
        write_provider(
            sops_project, "a", provider="openai", base_url=f"{url}/v1", api_key="sk-up", pricing=PRICING
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            leaving = asyncio.ensure_future(_leave_after(board, 30))
            await asyncio.wait_for(accepted.wait(), 10)
            await asyncio.sleep(0.2)
            leaving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leaving
            await eventually(lambda: len(records.kept) == 1, timeout=10)
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    record = records.kept[0]
    assert (record.status, record.provider, record.estimated) == (499, "a", True) and record.cost_usd > 0
    provider = next(p for p in limits["providers"] if p["id"] == "a")
    assert provider["used"]["in_flight"] == 0  # the provider's count ended with the request
    assert provider["used"]["requests_60s"] == 1


async def test_an_upstream_request_id_that_cannot_name_a_record_is_replaced(
    sops_project: SopsProject,
) -> None:
    async def odd(request: web.Request) -> web.Response:
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        return web.json_response({"choices": [], "usage": usage}, headers={"x-request-id": "a b" + "x" * 300})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", odd)
    async with metered_by(sops_project, app) as (board, records):
        response = await chat(board)
    assert response.status == 200
    ours = response.headers[REQUEST_ID]
    assert len(ours) == 32 and records.kept[0].id == ours


async def test_an_upstream_request_id_holding_the_key_names_neither_answer_nor_record(
    sops_project: SopsProject,
) -> None:
    """An upstream that reflects the request's key as its `x-request-id` (and in a rate limit, and
    its body): the answer and its ledger record keep the gateway's own id (docs/reference.md §2.4)."""

    async def reflect(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        headers = {"x-request-id": key, "x-ratelimit-remaining-tokens": f"7; key={key}"}
        return web.json_response({"choices": [], "usage": usage, "echo": key}, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reflect)
    async with serving(app) as url:
        write_provider(
            sops_project, "a", provider="openai", base_url=f"{url}/v1", api_key=CANARY, pricing=PRICING
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, None)
        async with metered(sops_project) as (board, records):
            response = await chat(board)
            body = (await response.text()).encode()
    assert response.status == 200 and CANARY.encode() not in body and b'"echo": "****"' in body
    assert not any(CANARY in value for value in response.headers.values())
    ours = response.headers[REQUEST_ID]
    assert len(ours) == 32 and [r.id for r in records.kept] == [ours]


PROMPT_WORD = "prompt-canary-word-5c2e9a71"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_upstream_request_id_quoting_the_prompt_names_neither_answer_nor_record(
    sops_project: SopsProject, stream: bool
) -> None:
    """An upstream that reflects the request's body as its `x-request-id` (a word of the prompt):
    the record, which holds no prompt (docs/reference.md §13), and its answer keep the gateway's
    own id."""

    async def reflect(request: web.Request) -> web.StreamResponse:
        sent = await request.json()
        word = sent["messages"][-1]["content"].split()[-1]
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        if not stream:
            return web.json_response({"choices": [], "usage": usage}, headers={"x-request-id": word})
        response = web.StreamResponse(headers={"x-request-id": word, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(
            f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()
        )
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reflect)
    async with metered_by(sops_project, app) as (board, records):
        response = await chat(board, f"say {PROMPT_WORD}", stream=stream)
        await eventually(lambda: len(records.kept) == 1)
    assert response.status == 200
    ours = response.headers[REQUEST_ID]
    assert len(ours) == 32 and [r.id for r in records.kept] == [ours]


@pytest.mark.parametrize(
    ("word", "spelled"),
    [
        ("don't-" + PROMPT_WORD, "don\\u0027t-" + PROMPT_WORD),  # .NET's encoder: an apostrophe escaped
        ("a<b&c-" + PROMPT_WORD, "a\\u003Cb\\u0026c-" + PROMPT_WORD),  # Go's and .NET's: HTML's characters
        ('say"' + PROMPT_WORD, 'say\\"' + PROMPT_WORD),  # every encoder: a quote
        ("a/b-" + PROMPT_WORD, "a\\/b-" + PROMPT_WORD),  # PHP's: a slash
    ],
    ids=["apostrophe", "html", "quote", "slash"],
)
async def test_an_upstream_request_id_quoting_the_prompt_as_the_client_escaped_it_names_no_record(
    sops_project: SopsProject, word: str, spelled: str
) -> None:
    """A client whose JSON encoder escapes some characters of its prompt (`\\u0027`, `\\"`) sends
    bytes that do not hold the words as they are; an upstream reads them as JSON does and
    reflects one as its `x-request-id`: the record and the answer keep the gateway's own id all
    the same."""

    async def reflect(request: web.Request) -> web.StreamResponse:
        said = (await request.json())["messages"][-1]["content"].split()[-1]
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        return web.json_response({"choices": [], "usage": usage}, headers={"x-request-id": said})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reflect)
    async with metered_by(sops_project, app) as (board, records):
        body = '{"model": "fake-model", "messages": [{"role": "user", "content": "say ' + spelled + '"}]}'
        assert json.loads(body)["messages"][0]["content"] == f"say {word}"
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        async with board.http.post(
            f"{board.url}/v1/chat/completions", data=body, headers=headers
        ) as response:
            await response.read()
        await eventually(lambda: len(records.kept) == 1)
    assert response.status == 200
    ours = response.headers[REQUEST_ID]
    assert len(ours) == 32 and [r.id for r in records.kept] == [ours]


async def test_every_protocol_is_metered_in_the_one_relay(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)  # openai: speaks chat and responses, not messages
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 2, "budget": {"usd": "1000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            message = {
                "model": "fake-model",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            }
            translated = await board.post("/v1/messages", message, token=TOKEN)
            assert translated.status == 200, await translated.text()
            native = await board.post(
                "/v1/responses", {"model": "fake-model", "input": "hi", "max_output_tokens": 5}, token=TOKEN
            )
            assert native.status == 200, await native.text()
            refused = await board.post("/v1/messages", message, token=TOKEN)
            body = await refused.json()
    assert refused.status == 429 and body["type"] == "error"  # in Anthropic's shape
    assert "Retry-After" in refused.headers and refused.headers["x-switchboard-remaining-requests"] == "0"
    assert [(r.status, r.provider) for r in records.kept] == [(200, "a"), (200, "a"), (429, None)]
    assert records.kept[0].cost_usd == 7 and translated.headers[COST] == "7"  # "hi": 1 in, 3 out
    assert records.kept[1].cost_usd > 0 and not records.kept[1].estimated


CACHE_PRICING = {
    "*": {"input": 1_000_000, "output": 2_000_000, "cached_input": 100_000, "cache_write": 10_000_000}
}
"""1 USD an input token, 2 an output one, 0.1 a cache read, 10 a cache write."""


async def test_cache_reads_and_writes_are_each_priced_once_in_either_protocol(
    sops_project: SopsProject,
) -> None:
    """Anthropic's input_tokens exclude cache reads and writes; OpenAI's prompt_tokens (with
    litellm's cache_creation_input_tokens) include them: the same tokens cost the same, a cache
    write at `cache_write` only, and the record's prompt_tokens counts every input token."""

    async def messages(request: web.Request) -> web.Response:
        usage = {
            "input_tokens": 3,
            "cache_read_input_tokens": 5,
            "cache_creation_input_tokens": 7,
            "output_tokens": 2,
        }
        answer = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [],
            "stop_reason": "end_turn",
            "usage": usage,
        }
        return web.json_response(answer)

    async def completions(request: web.Request) -> web.Response:
        usage = {
            "prompt_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 5},
            "cache_creation_input_tokens": 7,
            "completion_tokens": 2,
            "total_tokens": 17,
        }
        return web.json_response({"id": "c1", "object": "chat.completion", "choices": [], "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/chat/completions", completions)
    async with serving(app) as url:
        write_provider(
            sops_project, "anth", provider="anthropic", base_url=url, api_key="sk-up", pricing=CACHE_PRICING
        )
        write_provider(
            sops_project,
            "oai",
            provider="openai",
            base_url=f"{url}/v1",
            api_key="sk-up",
            pricing=CACHE_PRICING,
        )
        write_routing(sops_project, chat="anth")
        write_clients(sops_project, None)
        async with metered(sops_project) as (board, records):
            message = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
            first = await board.post("/v1/messages", message, token=TOKEN)
            assert first.status == 200, await first.text()
            translated = await chat(board, model="claude-x")  # chat to Anthropic: through litellm
            assert translated.status == 200, await translated.text()
            write_routing(sops_project, chat=["oai"])
            await eventually(lambda: _routed_alone_to(board, "oai"))
            second = await chat(board, model="claude-x")
            assert second.status == 200, await second.text()
    assert first.headers[COST] == translated.headers[COST] == second.headers[COST] == "77.5"
    # 3 x 1 + 5 x 0.1 + 7 x 10 + 2 x 2
    assert [r.provider for r in records.kept] == ["anth", "anth", "oai"]
    for record in records.kept:
        assert (record.prompt_tokens, record.cached_tokens, record.cache_write_tokens) == (15, 5, 7)
        assert record.cost_usd == Decimal("77.5") and record.priced


async def _routed_alone_to(board: Switchboard, pid: str) -> bool:
    _, route = await _get(board, "/api/v1/llm-config/active/chat")
    return [p["id"] for p in route["primary"]] == [pid]


async def test_an_answered_request_is_in_usage_and_usage_requests_within_two_seconds(
    sops_project: SopsProject,
) -> None:
    """The real ledger (SQLite), fed by the gateway: the record under the answer's x-request-id."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 10})
        async with running(sops_project) as board:
            response = await chat(board, max_tokens=3)
            answered = asyncio.get_running_loop().time()
            rid = response.headers[REQUEST_ID]

            async def seen() -> bool:
                _, page = await _get(board, "/api/v1/llm-config/usage/requests?since=1h")
                _, usage = await _get(board, "/api/v1/llm-config/usage?since=1h&group_by=client,model")
                return bool(page and page["requests"] and usage and usage["rows"])

            await eventually(seen, timeout=2)
            assert asyncio.get_running_loop().time() - answered < 2
            _, page = await _get(board, "/api/v1/llm-config/usage/requests?since=1h")
            _, usage = await _get(board, "/api/v1/llm-config/usage?since=1h&group_by=client,model")
    (record,) = page["requests"]
    assert record["id"] == rid and record["cost_usd"] == response.headers[COST] == "7"
    assert record["ts"].endswith("Z") and record["status"] == 200 and page["next_cursor"] is None
    assert usage["rows"] == [
        {
            "client": "client",
            "model": "fake-model",
            "requests": 1,
            "errors": 0,
            "limited": 0,
            "prompt_tokens": 1,
            "cached_tokens": 0,
            "completion_tokens": 3,
            "reasoning_tokens": 0,
            "cost_usd": "7",
        }
    ]


def test_request_ids_are_random_hex_read_a_batch_at_a_time() -> None:
    """128 random bits each, 32 hex digits, none twice, across the batches they are read in
    (one system call per batch, not per request)."""
    ids = RequestIds(batch=4)
    made = [ids() for _ in range(1000)]
    assert len(set(made)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in made)


def test_a_records_time_is_the_microsecond_datetime_makes_of_the_clock() -> None:
    """A record's `ts` is taken from the limiter's clock with no datetime made (issue 22): the
    microsecond `datetime.fromtimestamp` rounds it to, half to even, exactly."""
    rng = random.Random(22)
    times = [1_764_950_000 + rng.random() * 10**6 for _ in range(20_000)]
    times += [1_764_950_000 + (i + 0.5) / 1e6 for i in range(2000)]  # the halfway cases
    times += [0.0, 1e-7, 0.4999999e-6, 0.5e-6, 1.5e-6, 1_764_950_000.9999995, 4_102_444_800.0000005]
    for t in times:
        assert _micros(t) == micros(datetime.fromtimestamp(t, UTC)), t


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"max_tokens": 5},
        {"max_tokens": 5, "max_completion_tokens": 9, "max_output_tokens": 7},
        {"max_tokens": True, "max_completion_tokens": 0, "max_output_tokens": -3},
        {"max_tokens": 5.0, "max_completion_tokens": "9", "max_output_tokens": None},
        {"max_tokens": 10**15, "max_completion_tokens": 3},
        {"max_tokens": False, "max_output_tokens": 1},
    ],
)
def test_the_completion_asked_for_is_the_largest_whole_positive_count_given(data: dict[str, Any]) -> None:
    """`_completion` as a plain loop (issue 22) reads what the former list comprehension read."""
    asked = [
        value
        for name in ("max_completion_tokens", "max_tokens", "max_output_tokens")
        if isinstance(value := data.get(name), int) and not isinstance(value, bool) and value > 0
    ]
    assert _completion(data, "chat") == (min(max(asked), 10**12) if asked else None)


async def test_a_native_messages_stream_cut_midway_is_charged_its_reservation(
    sops_project: SopsProject,
) -> None:
    """docs/reference.md §13.2: "a stream that broke after a byte was relayed ... is charged its whole
    reservation and recorded `estimated: true`". Anthropic's stream says a usage so far in its
    first event (`message_start`: the prompt, 1 token out); a stream cut after it is not charged
    that as if the answer had ended there."""
    async with FakeUpstream(protocol="anthropic", name="claude", api_key="sk-up") as up:
        write_provider(
            sops_project, "a", provider="anthropic", base_url=up.url, api_key="sk-up", pricing=PRICING
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "10000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            up.drop_after(2)
            message = {
                "model": "fake-model",
                "max_tokens": 10,
                "stream": True,
                "messages": [{"role": "user", "content": "one two three four"}],
            }
            async with board.http.post(
                f"{board.base_url}/messages", json=message, headers={"Authorization": f"Bearer {TOKEN}"}
            ) as response:
                text = await response.text()
            await eventually(lambda: len(records.kept) == 1)
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    assert response.status == 200 and "message_start" in text and "error" in text
    record = records.kept[0]
    assert (record.status, record.estimated, record.completion_tokens) == (200, True, 0), record
    assert record.cost_usd > len(json.dumps(message)) + 20 - 1  # every byte a token at 1 USD, 10 out at 2
    used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
    assert Decimal(used["budget_spent_usd"]) == record.cost_usd


async def test_a_request_litellm_cannot_translate_is_recorded_400_costing_nothing(
    sops_project: SopsProject,
) -> None:
    """docs/reference.md §13: answers given before the limits are checked are not recorded; a
    request that no candidate's litellm could translate is answered 400 after them (it took
    its client's rpm and was tried), so it is recorded, as its 502 was: status 400, cost 0,
    its reservation given back."""
    async with FakeUpstream(protocol="anthropic", name="claude", api_key="sk-up") as up:
        write_provider(
            sops_project, "a", provider="anthropic", base_url=up.url, api_key="sk-up", pricing=PRICING
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 100, "budget": {"usd": "10000", "period": "day"}})
        async with metered(sops_project) as (board, records):
            refused = await board.chat("hi", token=TOKEN, max_tokens=10, tools=[{"type": "function"}])
            await eventually(lambda: len(records.kept) == 1)
            _, limits = await _get(board, "/api/v1/llm-config/limits")
    assert refused.status == 400, await refused.text()
    (record,) = records.kept
    assert (record.status, record.cost_usd, record.provider, record.attempts) == (400, 0, "a", 1), record
    used = next(c for c in limits["clients"] if c["name"] == "client")["used"]
    assert Decimal(used["budget_spent_usd"]) == 0 and len(up.requests) == 0, used

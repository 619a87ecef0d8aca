"""docs/reference.md §13's promises held from outside: a real Switchboard with its real ledger
(SQLite), stand-in vendors, and only what a client sees — answers, headers, `/metrics`, and the
records read back over `GET …/usage` and `GET …/usage/requests`."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import SopsProject, eventually
from tests.gateway.test_metering import (
    CACHE_PRICING,
    COST,
    PRICING,
    READER,
    REQUEST_ID,
    TOKEN,
    chat,
    priced_provider,
    write_clients,
)
from tests.support.gateway import Switchboard, running, write_provider, write_routing
from tests.support.postgres import PostgresServer
from tests.support.upstreams import FakeUpstream, serving

USAGE = "/api/v1/llm-config/usage"
REQUESTS = f"{USAGE}/requests"
REQUESTS_LEFT = "x-switchboard-remaining-requests"
TOKENS_LEFT = "x-switchboard-remaining-tokens"
BUDGET_LEFT = "x-switchboard-budget-remaining-usd"


async def _read(board: Switchboard, path: str) -> Any:
    response = await board.get(path, token=READER)
    assert response.status == 200, await response.text()
    return await response.json()


async def _records(board: Switchboard, count: int) -> list[dict[str, Any]]:
    """The ledger's records, newest first, once it holds `count` (within 2 s of their answers)."""

    async def stored() -> list[dict[str, Any]]:
        found = (await _read(board, f"{REQUESTS}?limit=1000"))["requests"]
        assert len(found) == count, found
        return list(found)

    return list(await eventually(stored, timeout=2))


def _retry_pair(response: aiohttp.ClientResponse) -> int:
    """`retry-after-ms` is a whole number, sent exactly when `Retry-After` is: its seconds rounded up."""
    ms = response.headers["retry-after-ms"]
    assert ms.isdigit() and response.headers["Retry-After"] == str(-(-int(ms) // 1000))
    return int(ms)


def _answering(usage: Any, request_id: str | None = None) -> web.Application:
    """An OpenAI-style upstream whose every chat answer reports `usage` (None: no usage at all)
    and carries `request_id` as its `x-request-id` (None: none)."""

    async def completions(request: web.Request) -> web.StreamResponse:
        headers = {"x-request-id": request_id} if request_id else {}
        if (await request.json()).get("stream"):  # one chunk of text, one of usage
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
            await stream.prepare(request)
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "fake-model"}
            text = {"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}
            for part in (
                {"choices": [text]},
                *([{"choices": [], "usage": usage}] if usage is not None else []),
            ):
                await stream.write(f"data: {json.dumps(chunk | part)}\n\n".encode())
            await stream.write(b"data: [DONE]\n\n")
            return stream
        answer: dict[str, Any] = {
            "id": "c1",
            "object": "chat.completion",
            "model": "fake-model",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
            ],
        }
        if usage is not None:
            answer["usage"] = usage
        return web.json_response(answer, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def test_an_rpm_of_five_gives_four_three_two_one_zero_then_a_429_that_says_zero(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 5})
        async with running(sops_project) as board:
            answers = [await chat(board, max_tokens=5) for _ in range(8)]
            body = await answers[-1].json()
            records = await _records(board, 8)
            limits = await _read(board, "/api/v1/llm-config/limits")
    assert [a.status for a in answers] == [200] * 5 + [429] * 3
    assert [a.headers[REQUESTS_LEFT] for a in answers] == ["4", "3", "2", "1", "0", "0", "0", "0"]
    used = next(c["used"] for c in limits["clients"] if c["name"] == "client")
    assert used["requests_60s"] == 5  # the refused ones used up nothing, rpm included
    assert body["error"]["type"] == "rate_limited" and body["error"]["limit"] == "rpm"
    assert 0 < _retry_pair(answers[-1]) <= 60_000
    assert all("Retry-After" not in a.headers and "retry-after-ms" not in a.headers for a in answers[:5])
    refused = records[0]
    assert refused["id"] == answers[-1].headers[REQUEST_ID] and refused["status"] == 429
    tokens = refused["prompt_tokens"], refused["completion_tokens"]
    assert (refused["provider"], refused["cost_usd"], tokens) == (None, "0", (0, 0))
    assert len(up.requests) == 5  # nothing of the refused one was sent upstream


async def test_tpm_refuses_once_the_tokens_of_the_last_minute_have_reached_it(
    sops_project: SopsProject,
) -> None:
    """ "hi" is 1 token in and "a says: hi" 3 out: a tpm of 8 serves two (4 then 0 left), then refuses."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"tpm": 8})
        async with running(sops_project) as board:
            answers = [await chat(board, max_tokens=5) for _ in range(3)]
            body = await answers[-1].json()
    assert [(a.status, a.headers[TOKENS_LEFT]) for a in answers] == [(200, "4"), (200, "0"), (429, "0")]
    assert body["error"]["limit"] == "tpm" and _retry_pair(answers[-1]) > 0
    assert all(a.headers[REQUESTS_LEFT] == "unlimited" for a in answers)


async def test_a_clients_limits_are_checked_max_parallel_then_rpm_then_tpm_then_budget(
    sops_project: SopsProject,
) -> None:
    """Each refusal is named by the first limit in that order that refuses, though the later ones
    would refuse too: one request in flight and every other limit used up."""
    async with FakeUpstream(name="a", latency_s=0.5) as up:
        priced_provider(sops_project, "a", up, models=["fake-model"])
        write_routing(sops_project, chat="a")
        # "hi" with max_tokens 3 costs 7 USD (4 tokens), reserved 95 (89 bytes, 3 x 2): the budget covers one
        budget = {"usd": "100", "period": "day"}
        write_clients(sops_project, {"max_parallel": 1, "rpm": 1, "tpm": 4, "budget": budget})
        async with running(sops_project) as board:
            slow = asyncio.ensure_future(chat(board, max_tokens=3))
            await eventually(lambda: len(up.requests) == 1)
            limits = [(await (await chat(board, max_tokens=3)).json())["error"].get("limit")]
            assert (await slow).status == 200
            limits.append((await (await chat(board, max_tokens=3)).json())["error"].get("limit"))
            write_clients(sops_project, {"tpm": 4, "budget": budget})
            await eventually(lambda: _without_rpm(board), timeout=10)
            limits.append((await (await chat(board, max_tokens=3)).json())["error"].get("limit"))
            write_clients(sops_project, {"budget": budget})
            await eventually(lambda: _without_tpm(board), timeout=10)
            last = await (await chat(board, max_tokens=3)).json()
            metrics = (await board.metrics()).splitlines()
    assert limits == ["max_parallel", "rpm", "tpm"]
    assert last["error"]["type"] == "budget_exceeded"
    for limit in ("max_parallel", "rpm", "tpm", "budget"):
        assert f'switchboard_limited_total{{client="client",limit="{limit}"}} 1.0' in metrics, [
            m for m in metrics if "limited_total" in m
        ]


async def _without_rpm(board: Switchboard) -> bool:
    answer = await chat(board, model="no-such-model")  # a 404 refused before the limits: counts nothing
    return answer.headers[REQUESTS_LEFT] == "unlimited"


async def _without_tpm(board: Switchboard) -> bool:
    answer = await chat(board, model="no-such-model")
    return answer.headers[TOKENS_LEFT] == "unlimited"


async def test_an_upstream_that_sends_one_request_id_for_every_answer_still_makes_a_record_of_each(
    sops_project: SopsProject,
) -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1}
    async with serving(_answering(usage, request_id="same-id")) as url:
        write_provider(
            sops_project, "a", provider="openai", base_url=f"{url}/v1", api_key="sk-up", pricing=PRICING
        )
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 10})
        async with running(sops_project) as board:
            answers = [await chat(board, max_tokens=5) for _ in range(3)]
            records = await _records(board, 3)
            usage_answer = await _read(board, f"{USAGE}?since=1d")
            paged: list[str] = []
            path = f"{REQUESTS}?limit=1"
            while path:
                page = await _read(board, path)
                paged += [r["id"] for r in page["requests"]]
                path = f"{REQUESTS}?limit=1&cursor={page['next_cursor']}" if page["next_cursor"] else ""
    assert [a.headers[REQUEST_ID] for a in answers] == ["same-id"] * 3  # the upstream's, passed back
    assert [r["id"] for r in records] == ["same-id"] * 3 and paged == ["same-id"] * 3
    assert usage_answer["totals"]["requests"] == 3 and usage_answer["totals"]["cost_usd"] == "9"


async def test_every_answer_of_an_upstream_that_sends_no_request_id_has_its_own_and_its_record_too(
    sops_project: SopsProject,
) -> None:
    """Streams and whole answers alike; an `ai_server` is free, though litellm's map prices its model."""
    async with serving(_answering({"prompt_tokens": 2, "completion_tokens": 1})) as url:
        write_provider(sops_project, "s", base_url=f"{url}/v1")
        write_routing(sops_project, chat="s")
        write_clients(sops_project, {"rpm": 10})
        async with running(sops_project) as board:
            answers = [await chat(board, model="gpt-4o", max_tokens=5, stream=i > 0) for i in range(3)]
            # a 400, refused before the limits: no record, an id of its own all the same
            refused = await board.post("/v1/chat/completions", {"model": 3}, token=TOKEN)
            records = await _records(board, 3)
    ids = [a.headers[REQUEST_ID] for a in answers]
    assert refused.status == 400 and refused.headers[REQUEST_ID] not in ids
    assert len(set(ids)) == 3 and [r["id"] for r in reversed(records)] == ids
    assert all((r["priced"], r["cost_usd"], r["prompt_tokens"]) == (False, "0", 2) for r in records)
    assert answers[0].headers[COST] == "0" and all(a.status == 200 for a in answers)
    assert [r["stream"] for r in reversed(records)] == [False, True, True]


async def test_an_answer_without_usage_is_charged_its_reservation_and_an_explicit_zero_is_a_zero(
    sops_project: SopsProject,
) -> None:
    """The reservation of "hi" with max_tokens 5: the body's bytes at 1 USD and 5 tokens at 2; a
    stream's is settled when it ends. A usage that leaves a count out: that count is 0, not
    estimated."""
    whole = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    found = []
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for usage in (None, zero, {"prompt_tokens": 3}):
        async with serving(_answering(usage)) as url:
            write_provider(
                sops_project, "a", provider="openai", base_url=f"{url}/v1", api_key="sk-up", pricing=PRICING
            )
            write_routing(sops_project, chat="a")
            write_clients(sops_project, {"budget": {"usd": "1000", "period": "total"}})
            async with running(sops_project) as board:
                for body in (whole, whole | {"stream": True}):
                    answer = await board.post("/v1/chat/completions", body, token=TOKEN)
                    assert answer.status == 200, await answer.text()
                    (record,) = (await _records(board, len(found) + 1))[:1]
                    reservation = len(json.dumps(body)) + 5 * 2  # aiohttp's `json=` sends json.dumps's text
                    found.append(
                        (
                            answer.headers.get(COST),
                            Decimal(record["cost_usd"]) - (reservation if record["estimated"] else 0),
                            record["estimated"],
                            record["completion_tokens"],
                        )
                    )
    assert found == [
        (str(len(json.dumps(whole)) + 10), 0, True, 0),
        (None, 0, True, 0),
        ("0", 0, False, 0),
        (None, 0, False, 0),
        ("3", 3, False, 0),
        (None, 3, False, 0),
    ]


async def test_the_budget_spent_metric_says_what_was_spent_as_soon_as_it_is_answered(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, budget={"usd": "1000", "period": "month"})
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "1000", "period": "month"}})
        async with running(sops_project) as board:
            answers = [await chat(board, max_tokens=5) for _ in range(3)]  # 7 USD each
            metrics = (await board.metrics()).splitlines()
    assert [a.headers[BUDGET_LEFT] for a in answers] == ["993", "986", "979"]
    assert 'switchboard_budget_spent_usd{kind="client",subject="client"} 21.0' in metrics
    assert 'switchboard_budget_spent_usd{kind="provider",subject="a"} 21.0' in metrics


async def test_a_start_with_the_shared_ledger_down_keeps_what_was_spent_and_serves(
    sops_project: SopsProject, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """Spent before the stop comes back from the snapshot beside the spool, never from zero; the
    service is ready, says the ledger is degraded, serves, and `/usage` answers 503 until it is back."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up)
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"budget": {"usd": "1000", "period": "month"}})
        async with running(sops_project, usage_db=postgres_url) as board:
            assert (await chat(board, max_tokens=3)).status == 200  # 7 USD
            await _records(board, 1)
        postgres_server.stop()
        try:
            async with running(sops_project, usage_db=postgres_url) as board:
                ready = await (await board.get("/readyz")).json()
                used = (await _read(board, "/api/v1/llm-config/limits"))["clients"][0]["used"]
                served = await chat(board, max_tokens=3)
                down = await board.get(USAGE, token=READER)
                down_body = await down.json()
                paged = await board.get(REQUESTS, token=READER)
        finally:
            postgres_server.ensure_running()
    assert ready["ledger"] == "degraded" and used["budget_spent_usd"] == "7"
    assert served.status == 200 and served.headers[BUDGET_LEFT] == "986"
    assert down.status == 503 and down_body["error"]["type"] == "ledger_unavailable"
    assert paged.status == 503


def _anthropic(usage: dict[str, int]) -> web.Application:
    """An Anthropic upstream answering every message with `usage`; streamed, as Anthropic splits
    it: the input (cache reads and writes too) in `message_start`, the output in `message_delta`."""

    async def messages(request: web.Request) -> web.StreamResponse:
        message = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not (await request.json()).get("stream"):
            return web.json_response(message)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        for kind, data in (
            ("message_start", {"message": start}),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
            ("content_block_stop", {"index": 0}),
            ("message_delta", {"delta": delta, "usage": {"output_tokens": usage["output_tokens"]}}),
            ("message_stop", {}),
        ):
            await stream.write(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode())
        return stream

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    return app


async def test_a_native_messages_stream_is_recorded_as_its_whole_answer_cache_tokens_included(
    sops_project: SopsProject,
) -> None:
    """Anthropic's stream gives the input (its cache reads and writes) at its start and the output
    at its end: the record of a streamed message holds both, priced as the same answer whole."""
    usage = {
        "input_tokens": 3,
        "cache_read_input_tokens": 5,
        "cache_creation_input_tokens": 7,
        "output_tokens": 2,
    }
    async with serving(_anthropic(usage)) as url:
        write_provider(
            sops_project, "anth", provider="anthropic", base_url=url, api_key="sk-up", pricing=CACHE_PRICING
        )
        write_routing(sops_project, chat="anth")
        write_clients(sops_project, None)
        async with running(sops_project) as board:
            message = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
            whole = await board.post("/v1/messages", message, token=TOKEN)
            streamed = await board.post("/v1/messages", {**message, "stream": True}, token=TOKEN)
            assert (whole.status, streamed.status) == (200, 200)
            records = await _records(board, 2)
    assert whole.headers[COST] == "77.5"  # 3 x 1 + 5 x 0.1 + 7 x 10 + 2 x 2
    by_stream = {r["stream"]: r for r in records}
    for record in by_stream.values():
        tokens = [
            record[k] for k in ("prompt_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens")
        ]
        assert tokens == [15, 5, 7, 2] and record["cost_usd"] == "77.5"
        assert record["priced"] is True and record["estimated"] is False


async def test_an_error_answered_before_the_relay_carries_a_cost_of_zero(sops_project: SopsProject) -> None:
    """docs/reference.md §13.3: an answer that is not streamed carries `x-switchboard-cost-usd`,
    `0` on an error or a refusal: those given before the limits are asked (no token, a body
    that is not JSON, a media type that is not JSON, a model no provider serves, a body too
    large) too, in either protocol's shape."""
    async with FakeUpstream(name="a") as up:
        priced_provider(sops_project, "a", up, models=["fake-model"])
        write_routing(sops_project, chat="a")
        write_clients(sops_project, {"rpm": 5})
        async with running(sops_project, max_body_bytes=1000) as board:
            url = f"{board.base_url}/chat/completions"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            message = {
                "model": "no-such-model",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            }
            answers = [
                await chat(board, token="sk-nobody-0123456789"),
                await chat(board, model="no-such-model", max_tokens=5),
                await chat(board, "x" * 2000),
                await board.post("/v1/messages", message, token=TOKEN),
            ]
            for data, media in ((b"{not json", "application/json"), (b"{}", "text/plain")):
                async with board.http.post(url, data=data, headers={**auth, "Content-Type": media}) as r:
                    await r.read()
                    answers.append(r)
    assert [a.status for a in answers] == [401, 404, 413, 404, 400, 415]
    assert [a.headers.get(COST) for a in answers] == ["0"] * 6
    assert not up.requests

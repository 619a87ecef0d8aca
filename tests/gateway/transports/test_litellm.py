"""The litellm path: Anthropic behind Switchboard, spoken to in OpenAI's protocol."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
from typing import Any

import openai
import pydantic
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from service.http.context import HEALTH
from tests.conftest import SopsProject
from tests.support.gateway import CANARY, running, write_clients, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, serving, upstreams

# litellm's own types warn about pydantic internals while it works; warnings are errors here.
pytestmark = pytest.mark.filterwarnings(r"ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")

MESSAGES: Any = [{"role": "user", "content": "hello claude"}]


def _anthropic(project: SopsProject, up: FakeUpstream, provider_id: str = "claude", **fields: Any) -> None:
    write_provider(project, provider_id, provider="anthropic", base_url=up.url, api_key=CANARY, **fields)


async def test_a_completion_through_litellm(sops_project: SopsProject) -> None:
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY, models=("claude-x",)) as up:
        _anthropic(sops_project, up, models=["claude-x"], model_map={"smart": "claude-x"})
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
            raw = await client.chat.completions.with_raw_response.create(
                model="smart", messages=MESSAGES, max_tokens=50
            )
            await client.close()
            metrics = await board.metrics()
    completion = raw.parse()
    assert completion.choices[0].message.content == "claude says: hello claude"
    assert raw.headers["x-switchboard-provider"] == "claude"
    assert raw.headers["x-request-id"] == "req_claude_1"  # Anthropic's request-id, passed back
    assert raw.headers["x-ratelimit-remaining-requests"] == "999"
    assert up.requests[-1].path == "/v1/messages"
    assert up.requests[-1].json["model"] == "claude-x"
    assert up.requests[-1].headers["x-api-key"] == CANARY
    assert (
        'switchboard_tokens_total{client="anonymous",kind="completion",model="smart",provider="claude"} 4.0'
        in metrics
    )
    assert CANARY not in metrics


async def test_a_stream_through_litellm(sops_project: SopsProject) -> None:
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY) as up:
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
            raw = await client.chat.completions.with_raw_response.create(
                model="claude-x", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            assert raw.headers["x-request-id"] == "req_claude_1"
            assert raw.headers["x-content-type-options"] == "nosniff"  # prepared by the transport
            stream = raw.parse()
            parts, usage = [], None
            async for chunk in stream:
                parts += [c.delta.content or "" for c in chunk.choices]
                usage = chunk.usage or usage
            await client.close()
    assert "".join(parts) == "claude says: hello claude"
    assert usage is not None and usage.prompt_tokens == 2
    assert up.requests[-1].json["stream"] is True


async def test_an_anthropic_failure_falls_back_and_a_refusal_does_not(sops_project: SopsProject) -> None:
    async with upstreams(
        {"protocol": "anthropic", "name": "claude", "api_key": CANARY}, {"name": "backup"}
    ) as (
        up,
        backup,
    ):
        _anthropic(sops_project, up)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "claude", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            up.fail(529)
            overloaded = await board.chat(max_tokens=10)
            up.fail(429)
            limited = await board.chat(max_tokens=10, stream=True)
            up.fail(401)
            revoked = await board.chat(max_tokens=10)
            assert board.app[HEALTH].is_open("claude")  # a refused key opens the circuit at once
            board.app[HEALTH].succeeded("claude", 0.01)  # as its trial would
            up.fail(400)
            refused = await board.chat(max_tokens=10)
            refused_text = await refused.text()
    assert overloaded.status == limited.status == revoked.status == 200
    assert {r.headers["x-switchboard-provider"] for r in (overloaded, limited, revoked)} == {"backup"}
    assert refused.status == 400 and refused.headers["x-switchboard-provider"] == "claude"
    assert "injected failure 400" in refused_text and CANARY not in refused_text
    assert len(backup.requests) == 3


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_vendor_that_says_wait_through_litellm_makes_the_502_say_it(
    sops_project: SopsProject, stream: bool
) -> None:
    """docs/reference.md §7: the upstream's `retry-after` passed back. A 429 through litellm
    (with `retry-after: 7`), its only candidate: the 502 says how long to wait."""
    async with upstreams({"protocol": "anthropic", "name": "claude"}) as (up,):
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            up.fail(429)
            answer = await board.chat(max_tokens=10, stream=stream)
    assert answer.status == 502, await answer.text()
    assert (answer.headers["Retry-After"], answer.headers["retry-after-ms"]) == ("7", "7000")


@pytest.mark.parametrize("stream", [False, True])
async def test_an_anthropic_client_error_keeps_its_status_which_litellm_would_change(
    sops_project: SopsProject, stream: bool
) -> None:
    """litellm takes Anthropic's 413 (a request too large) for its 400; the client gets the
    upstream's own status (docs/reference.md §14), in chat's error shape, and no fallback."""
    async with upstreams({"protocol": "anthropic", "name": "claude"}, {"name": "backup"}) as (up, backup):
        _anthropic(sops_project, up)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "claude", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            for status in (413, 422):
                up.fail(status, times=1)
                refused = await board.chat(max_tokens=10, stream=stream)
                assert refused.status == status, await refused.text()
                assert refused.headers["x-switchboard-provider"] == "claude"
                assert (await refused.json())["error"]["type"] == "invalid_request_error"
    assert not backup.requests


@pytest.mark.parametrize("stream", [False, True])
async def test_an_anthropic_client_error_passes_back_its_request_id_and_rate_limits(
    sops_project: SopsProject, stream: bool
) -> None:
    """docs/reference.md §7: the upstream's request id and rate limits are passed back, on a
    refusal returned to the client as on an answer; the id names the answer and its record."""
    async with FakeUpstream(protocol="anthropic", name="claude") as up:
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            served = await board.chat(max_tokens=10, stream=stream)
            up.fail(422, times=1)
            refused = await board.chat(max_tokens=10, stream=stream)
    assert served.status == 200 and served.headers["x-request-id"] == "req_claude_1"
    assert refused.status == 422, await refused.text()
    assert refused.headers["x-request-id"] == "req_claude_2"  # Anthropic's `request-id`
    assert refused.headers["x-ratelimit-remaining-requests"] == "998"  # named as on an answer
    assert refused.headers["x-ratelimit-limit-requests"] == "1000"
    assert "x-upstream-name" not in refused.headers  # only what the gateway passes back


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_answer_through_litellm_that_reflects_the_key_has_it_masked(
    sops_project: SopsProject, stream: bool
) -> None:
    """A vendor that quotes the key it was sent, in its answer's text and its headers: the client
    reads `****` and the gateway's own request id (docs/reference.md §2.4)."""

    async def messages(request: web.Request) -> web.StreamResponse:
        await request.read()
        key = request.headers["x-api-key"]
        headers = {"request-id": key, "x-ratelimit-remaining-requests": f"9 {key}"}
        text = f"you sent {key}"
        usage = {"input_tokens": 3, "output_tokens": 4}
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": key}
        if not stream:
            content = [{"type": "text", "text": text}]
            answer = {**message, "content": content, "stop_reason": "end_turn", "usage": usage}
            return web.json_response(answer, headers=headers)
        events = [
            (
                "message_start",
                {"type": "message_start", "message": {**message, "content": [], "usage": usage}},
            ),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        for name, data in events:
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    async with serving(app) as url:
        write_provider(sops_project, "claude", provider="anthropic", base_url=url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            response = await board.chat("hi", max_tokens=10, stream=stream)
            body = await response.text()
            metrics = await board.metrics()  # the model an answer names labels them
    assert response.status == 200 and "you sent ****" in body and CANARY not in body
    assert CANARY not in metrics
    assert not any(CANARY in value for value in response.headers.values()), response.headers
    assert len(response.headers["x-request-id"]) == 32  # the gateway's own


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_refusal_through_litellm_that_reflects_the_key_in_its_headers_has_none_passed_back(
    sops_project: SopsProject, stream: bool
) -> None:
    """A vendor refusing the client's request (422) with the key it was sent as its request id
    and its rate limits: the client gets the gateway's own id, and no header holds the key
    (docs/reference.md §2.4). The id also names the request's usage record."""

    async def messages(request: web.Request) -> web.Response:
        await request.read()
        key = request.headers["x-api-key"]
        headers = {"request-id": key, "anthropic-ratelimit-requests-remaining": f"9 {key}"}
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}
        return web.json_response(error, status=422, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    async with serving(app) as url:
        write_provider(sops_project, "claude", provider="anthropic", base_url=url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            response = await board.chat("hi", max_tokens=10, stream=stream)
            body = await response.text()
    assert response.status == 422, body
    assert CANARY not in body
    assert not any(CANARY in value for value in response.headers.values()), response.headers
    assert len(response.headers["x-request-id"]) == 32  # the gateway's own


@pytest.mark.parametrize("status", [200, 422])
async def test_a_request_id_through_litellm_quoting_the_prompt_is_not_passed_back(
    sops_project: SopsProject, status: int
) -> None:
    """Anthropic's `request-id` holding a word of the request's prompt, on an answer or on a
    refusal: the gateway's own id names the answer and its record (docs/reference.md §13)."""
    word = "prompt-canary-word-8d1f3b60"

    async def messages(request: web.Request) -> web.Response:
        content = (await request.json())["messages"][-1]["content"]  # litellm sends text blocks
        text = content if isinstance(content, str) else content[-1]["text"]
        headers = {"request-id": text.split()[-1]}
        if status != 200:
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}
            return web.json_response(error, status=status, headers=headers)
        usage = {"input_tokens": 3, "output_tokens": 4}
        answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x"}
        content = [{"type": "text", "text": "hello"}]
        return web.json_response(
            {**answer, "content": content, "stop_reason": "end_turn", "usage": usage}, headers=headers
        )

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    async with serving(app) as url:
        write_provider(sops_project, "claude", provider="anthropic", base_url=url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            response = await board.chat(f"say {word}", max_tokens=10)
    assert response.status == status, await response.text()
    assert len(response.headers["x-request-id"]) == 32  # the gateway's own


def test_the_direct_path_does_not_import_litellm() -> None:
    code = (
        "import sys, service.http.app, service.gateway.relay, service.gateway.transports.litellm\n"
        "assert 'litellm' not in sys.modules, 'litellm imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def _hostile_bodies(attacker: str) -> list[dict[str, Any]]:
    """Bodies that try to send the provider's key elsewhere, or to choose its credentials."""
    v1 = f"{attacker}/v1"
    return [
        {"base_url": attacker},
        {"api_base": attacker},
        {"base_url": v1, "api_base": v1, "custom_llm_provider": "openai"},
        {"custom_llm_provider": "openai", "api_base": v1},
        {"api_version": "2099-01-01", "api_base": attacker},
        {"api_key": "sk-attacker-chosen"},
        {"extra_headers": {"x-api-key": "sk-attacker-chosen", "x-stolen": "1"}},
        {"headers": {"x-api-key": "sk-attacker-chosen"}},
        {"extra_body": {"base_url": attacker, "api_base": attacker}},
        {"litellm_params": {"api_base": attacker, "api_key": "sk-attacker-chosen"}},
        {"metadata": {"api_base": attacker, "headers": {"x-stolen": "1"}}},
        {"model_list": [{"model_name": "claude-x", "litellm_params": {"api_base": attacker}}]},
        {"deployment_id": "x", "azure_ad_token": "t", "aws_region_name": "us-east-1"},
        {"mock_response": "not from the vendor"},
        {"stream_options": {"include_usage": True, "api_base": attacker}},
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_hostile_body_cannot_send_the_key_elsewhere(sops_project: SopsProject, stream: bool) -> None:
    async with upstreams(
        {"protocol": "anthropic", "name": "claude", "api_key": CANARY},
        {"name": "attacker"},
    ) as (up, attacker):
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            answers = []
            for hostile in _hostile_bodies(attacker.url):
                response = await board.chat("hi", max_tokens=10, stream=stream, **hostile)
                answers.append((hostile, response.status, await response.text()))
    assert not attacker.requests, [r.path for r in attacker.requests]
    for hostile, status, text in answers:
        assert status == 200, (hostile, text)
        assert "claude says: hi" in text or "claude" in text, (hostile, text)
        assert "not from the vendor" not in text
    assert len(up.requests) == len(answers)
    for request in up.requests:
        assert request.headers["x-api-key"] == CANARY
        assert "x-stolen" not in request.headers
        assert set(request.json) <= {"model", "messages", "max_tokens", "stream", "metadata", "system"}


async def test_a_plain_answer_slower_than_the_first_byte_timeout_is_not_cut(
    sops_project: SopsProject,
) -> None:
    async with upstreams(
        {"protocol": "anthropic", "name": "claude", "api_key": CANARY, "latency_s": 0.5}, {"name": "backup"}
    ) as (up, backup):
        _anthropic(sops_project, up, first_byte_timeout_s=0.1)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "claude", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            response = await board.chat("slowly", max_tokens=10)
            body = await response.json()
    assert response.status == 200, body
    assert response.headers["x-switchboard-provider"] == "claude"
    assert body["choices"][0]["message"]["content"] == "claude says: slowly"
    assert len(up.requests) == 1 and not backup.requests


async def test_a_stream_through_litellm_begins_when_the_vendors_answer_does_not_at_its_first_token(
    sops_project: SopsProject,
) -> None:
    """An Anthropic stream begins with `message_start`, its first token a model's while later;
    litellm gives nothing until that token. The client has the answer's head as soon as the
    vendor's answer began (docs/reference.md §14: the first byte of a translated stream follows
    the vendor's), not half a minute later with the token."""
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY, chunk_interval_s=30) as up:
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            warm = await board.chat("warm", max_tokens=5)  # litellm is imported on its first call
            assert warm.status == 200
            payload = {"model": "claude-x", "messages": MESSAGES, "max_tokens": 5, "stream": True}
            started = asyncio.get_running_loop().time()
            async with asyncio.timeout(10):  # the first token would come 30 s after the head
                response = await board.http.post(board.base_url + "/chat/completions", json=payload)
            began = asyncio.get_running_loop().time() - started
            assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
            assert response.headers["x-switchboard-provider"] == "claude"
            response.close()  # the client leaves: the vendor's request is let go of
    assert began < 10


async def test_a_stream_through_litellm_that_falls_silent_ends_with_an_error_event(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY, chunk_interval_s=0.5) as up:
        _anthropic(sops_project, up, idle_timeout_s=0.1, timeout_s=0.2)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            response = await board.chat("a b c", max_tokens=10, stream=True)
            text = await response.text()
    assert response.status == 200
    assert "no chunk within 0.1 s" in text
    assert CANARY not in text


def _litellm_only(answer: pydantic.BaseModel, where: str = "") -> list[str]:
    """The fields of `answer` (and of its usage, all the way down) that OpenAI's schema, as the
    pinned `openai` SDK has it, does not name: what litellm added of its own."""
    found = [f"{where}{name}" for name in answer.model_extra or {}]
    for name in type(answer).model_fields:
        value = getattr(answer, name)
        if isinstance(value, pydantic.BaseModel) and name != "choices":
            found += _litellm_only(value, f"{where}{name}.")
    return found


async def test_a_stream_through_litellm_carries_openai_fields_alone_as_the_plain_answer_does(
    sops_project: SopsProject,
) -> None:
    """docs/reference.md §13: money is exact, in strings of decimals. litellm stamps its own bill on
    a stream's usage chunk (`"cost": 0.00008400000000000001`, a binary float from its price map,
    whatever the provider's `pricing` says); the plain answer has no such field, nor may the stream."""
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY) as up:
        # A model litellm's map prices, and a price of the provider's own: neither reaches the client.
        _anthropic(sops_project, up, pricing={"*": {"input": 3, "output": 15}})
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            body: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 10}
            streamed = await board.chat("a b c", stream=True, stream_options={"include_usage": True}, **body)
            plain = await board.chat("a b c", **body)
    text = await streamed.text()
    assert "cost" not in text
    events = [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]
    assert [_litellm_only(chunk) for chunk in chunks] == [[]] * len(chunks)
    answer = ChatCompletion.model_validate(await plain.json())
    assert _litellm_only(answer) == []
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage  # the same counts, the same shape
    assert answer.usage is not None and answer.usage.prompt_tokens == 3
    assert plain.headers["x-switchboard-cost-usd"] == "0.000084"  # the provider's price, exactly


async def test_a_stream_through_litellm_is_counted_when_the_client_did_not_ask(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY) as up:
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
            stream = await client.chat.completions.create(model="claude-x", messages=MESSAGES, stream=True)
            chunks = [chunk async for chunk in stream]
            await client.close()
            metrics = await board.metrics()
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "claude says: hello claude"
    )
    assert all(c.choices and c.usage is None for c in chunks), chunks  # no usage the client did not ask for
    # Anthropic declares no models here: the label is the model the answer names.
    assert 'kind="completion",model="claude-x",provider="claude"} 4.0' in metrics
    assert 'kind="prompt",model="claude-x",provider="claude"} 2.0' in metrics


MALFORMED: list[dict[str, Any]] = [
    {"tools": [{"type": "function"}]},
    {"messages": "not a list"},
    {"messages": [{"role": "user", "content": [{"type": "weird"}]}]},
    {"response_format": {"type": "json_schema", "json_schema": "x"}},
]
"""Bodies litellm fails to translate for Anthropic, reporting a 500 `APIConnectionError`."""


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_malformed_requests_cannot_open_a_healthy_providers_circuit(
    sops_project: SopsProject, stream: bool
) -> None:
    """They counted as the provider's failures: three requests from a client holding only
    `completions` opened the circuit of a healthy provider, for everyone, for the cooldown."""
    async with upstreams(
        {"protocol": "anthropic", "name": "claude", "api_key": CANARY}, {"name": "backup"}
    ) as (up, backup):
        _anthropic(sops_project, up)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "claude", "fallbacks": ["backup"]})
        write_clients(sops_project, {"app": ("tok-c", ["completions"])})
        async with running(sops_project) as board:
            for body in MALFORMED * 3:
                await board.chat("hi", token="tok-c", max_tokens=10, stream=stream, **body)
            assert not board.app[HEALTH].is_open("claude")
            assert board.app[HEALTH].get("claude").status != "unhealthy"
            normal = await board.chat("hi", token="tok-c", max_tokens=10, stream=stream)
            text = await normal.text()
    assert normal.status == 200 and normal.headers["x-switchboard-provider"] == "claude", text
    assert len(up.requests) == 1, "none of the malformed requests reached the vendor"
    assert CANARY not in text


@pytest.mark.parametrize(
    "fields",
    [{"tools": [{"type": "function"}]}, {"max_tokens": "x"}, {"messages": 0}],
    ids=["tools", "max_tokens", "messages"],
)
async def test_a_malformed_request_is_400_with_why_and_leaves_a_half_open_trial_free(
    sops_project: SopsProject, fields: dict[str, Any]
) -> None:
    """A request litellm cannot translate for any candidate is the client's to mend: 400
    `invalid_request_error` listing the attempts (it was 502, as if the vendor had failed), and
    the provider's half-open trial stays free for the next request."""
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY) as up:
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project, circuit_cooldown_s=0.01) as board:
            health = board.app[HEALTH]
            for _ in range(3):
                health.failed("claude", "HTTP 500")
            assert health.is_open("claude")
            await asyncio.sleep(0.05)  # half-open: the next request is its trial
            refused = await board.chat("hi", **{"max_tokens": 10, **fields})
            body = await refused.json()
            trial = await board.chat("hi", max_tokens=10)
            metrics = await board.metrics()
    assert refused.status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and "translated" in body["error"]["message"]
    # the client's error, not the provider's: not an error outcome of its upstream attempts
    assert 'switchboard_upstream_requests_total{outcome="failed",provider="claude"}' not in metrics
    assert 'switchboard_upstream_requests_total{outcome="client_error",provider="claude"} 1.0' in metrics
    assert "litellm could not translate the request" in body["error"]["attempts"][0]["reason"]
    assert CANARY not in json.dumps(body)
    assert trial.status == 200 and trial.headers["x-switchboard-provider"] == "claude"


async def test_nothing_is_fetched_from_the_internet_at_run_time(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """litellm fetched Anthropic's beta headers from raw.githubusercontent.com on the first
    request to Anthropic (docs/reference.md §1: nothing is downloaded at run time)."""
    from service.gateway.transports.litellm import _import_litellm

    _import_litellm()  # as the service imports it: importing it here first would fetch the cost map
    import litellm.anthropic_beta_headers_manager as beta

    fetched: list[str] = []

    def fetch(url: str, timeout: int = 5) -> object:
        fetched.append(url)
        raise OSError("no network here")

    monkeypatch.delenv("LITELLM_OFFLINE_MODE", raising=False)
    monkeypatch.setattr(beta, "_BETA_HEADERS_CONFIG", None)  # as in a fresh process
    monkeypatch.setattr(beta.GetAnthropicBetaHeadersConfig, "fetch_remote_beta_headers_config", fetch)
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY) as up:
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            document = [{"type": "file", "file": {"file_id": "https://example.invalid/a.pdf"}}]
            messages = [{"role": "user", "content": document}]  # a file: Anthropic's beta headers
            plain = await board.chat(max_tokens=10, messages=messages)
            streamed = await board.chat(max_tokens=10, stream=True, messages=messages)
    assert plain.status == streamed.status == 200
    assert not fetched


HOSTILE_MODELS = [
    "../../../../v1beta/cachedContents?x=",
    "x/../../tunedModels#",
    "gemini-x?key=attacker&",
    "gemini-x:batchGenerateContent?",
    "http://attacker.invalid/x",
    "gemini-x/../../files",
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_model_name_cannot_choose_the_vendors_endpoint(
    sops_project: SopsProject, stream: bool
) -> None:
    """litellm puts Gemini's model in the URL (`models/{model}:generateContent`): a client with
    `completions` sent the provider's key to `/v1beta/cachedContents`, `/tunedModels`, or with
    a `key=` of its choosing, on the vendor's host."""
    seen: list[str] = []

    async def gemini(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"error": {"code": 404, "message": "no", "status": "NOT_FOUND"}}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", gemini)
    async with serving(app) as url, FakeUpstream(name="backup") as backup:
        write_provider(sops_project, "gem", provider="gemini", base_url=url, api_key=CANARY)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "gem", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            answers = [await board.chat("hi", model=m, max_tokens=5, stream=stream) for m in HOSTILE_MODELS]
            health = board.app[HEALTH].get("gem").status
            normal = await board.chat("hi", model="gemini-2.0-flash", max_tokens=5, stream=stream)
    assert not seen[:-1], seen
    assert seen[-1].startswith("/models/gemini-2.0-flash:") and "?key" not in seen[-1]
    assert [a.headers["x-switchboard-provider"] for a in answers] == ["backup"] * len(HOSTILE_MODELS)
    assert health != "unhealthy" and normal.status == 404


# -- what litellm reads is bounded (SWITCHBOARD_MAX_UPSTREAM_BYTES, reference §7) -------------------------


async def test_an_answer_through_litellm_over_the_limit_fails_and_falls_back(
    sops_project: SopsProject,
) -> None:
    """litellm read whatever the vendor sent, whole, into memory: a hostile or broken upstream
    could answer gigabytes to one request."""
    async with upstreams(
        {"protocol": "anthropic", "name": "claude", "api_key": CANARY, "padding": 200_000}, {"name": "backup"}
    ) as (up, backup):
        _anthropic(sops_project, up)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "claude", "fallbacks": ["backup"]})
        async with running(sops_project, max_upstream_bytes=50_000) as board:
            fell_back = await board.chat("hi", max_tokens=10)
            up.padding = 0
            fits = await board.chat("hi", max_tokens=10)
            fits_text = await fits.text()
    assert fell_back.status == 200 and fell_back.headers["x-switchboard-provider"] == "backup"
    assert fits.status == 200 and fits.headers["x-switchboard-provider"] == "claude", fits_text
    assert len(up.requests) == 2


async def test_an_answer_through_litellm_over_the_limit_is_a_502_naming_it(sops_project: SopsProject) -> None:
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY, padding=200_000) as up:
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project, max_upstream_bytes=50_000) as board:
            response = await board.chat("hi", max_tokens=10)
            body = await response.json()
    assert response.status == 502
    assert body["error"]["attempts"] == [
        {"provider": "claude", "status": None, "reason": "answer over 50000 bytes"}
    ]


async def test_a_compressed_answer_through_litellm_is_bounded_as_it_inflates(
    sops_project: SopsProject,
) -> None:
    """A few kilobytes of gzip inflate to megabytes: the limit is on what is read, decoded."""
    inflated = json.dumps({"type": "message", "padding": "x" * 5_000_000}).encode()
    packed = gzip.compress(inflated)

    async def messages(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=packed, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    async with serving(app) as url:
        write_provider(sops_project, "claude", provider="anthropic", base_url=url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project, max_upstream_bytes=1_000_000) as board:
            response = await board.chat("hi", max_tokens=10)
            body = await response.json()
    assert len(packed) < 1_000_000 < len(inflated)
    assert response.status == 502
    assert body["error"]["attempts"][0]["reason"] == "answer over 1000000 bytes"


async def test_a_stream_through_litellm_is_not_cut_by_the_limit(sops_project: SopsProject) -> None:
    """The limit is for answers read whole; a stream is relayed as it comes, however long."""
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY) as up:
        _anthropic(sops_project, up)
        write_routing(sops_project, chat="claude")
        async with running(sops_project, max_upstream_bytes=300) as board:
            words = " ".join(f"word{i}" for i in range(200))
            response = await board.chat(words, max_tokens=10, stream=True)
            text = await response.text()
    assert response.status == 200
    assert "word199" in text and "upstream_failed" not in text


@pytest.mark.parametrize("units", [b"1.5", b"NaN", b"1e400"], ids=["fraction", "nan", "infinite"])
async def test_an_answer_litellm_cannot_read_is_the_vendors_failure_not_the_clients_request(
    sops_project: SopsProject, units: bytes
) -> None:
    """A Cohere rerank whose `meta.billed_units` litellm refuses to read (a fraction of a search
    unit, NaN): the vendor had the request and answered, so it is the vendor's failure (502, the
    provider's circuit hears of it), not a request litellm could not translate (a 400 that blamed
    the client)."""

    async def rerank(request: web.Request) -> web.Response:
        await request.read()
        meta = b'{"billed_units":{"search_units":' + units + b"}}"
        body = b'{"id":"rr","results":[{"index":0,"relevance_score":0.5}],"meta":' + meta + b"}"
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/rerank", rerank)
    async with serving(app) as url:
        write_provider(
            sops_project, "co", provider="cohere", base_url=url, api_key="sk-up", purposes=["reranking"]
        )
        write_routing(sops_project, reranking="co")
        async with running(sops_project) as board:
            response = await board.post(
                "/v1/rerank", {"model": "rerank-v3.5", "query": "q", "documents": ["a"]}
            )
            failed = (await response.json())["error"]
    assert response.status == 502, failed
    assert (
        failed["attempts"][0]["provider"] == "co" and "could not be read" in failed["attempts"][0]["reason"]
    )

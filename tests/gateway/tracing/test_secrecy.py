"""No prompt, completion, key or token in anything exported (docs/reference.md §14): canary values sent every
way a request can carry them, looked for in the raw bytes the collector received."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import SopsProject
from tests.support.gateway import CANARY, running, write_clients, write_provider, write_routing
from tests.support.otlp import OTLPReceiver
from tests.support.upstreams import FakeUpstream, serving

PROMPT = "prompt-canary-7c1e9d02b4"
SYSTEM = "system-canary-51aa7be3c0"
TOOL_ARGUMENT = "tool-canary-0e4f2c9a1d"
TOKEN = "tok-canary-client-3f9b8e7d6c5a"
HEADER = "header-canary-a8d7c6b5e4"
ANTHROPIC_KEY = "sk-ant-canary-9f8e7d6c5b4a"


async def test_no_prompt_completion_key_or_token_is_exported(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    async with (
        FakeUpstream(name="a", api_key=CANARY, tool_calls={"look": {"at": TOOL_ARGUMENT}}) as up,
        FakeUpstream(
            protocol="anthropic", name="claude", api_key=ANTHROPIC_KEY, models=("claude-x",)
        ) as claude,
    ):
        write_provider(
            sops_project,
            "a",
            provider="openai",
            base_url=up.base_url,
            api_key=CANARY,
            purposes=["chat", "embeddings"],
        )
        write_provider(
            sops_project,
            "claude",
            provider="anthropic",
            base_url=claude.url,
            api_key=ANTHROPIC_KEY,
            models=["claude-x"],
        )
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["claude"]}, embeddings="a")
        write_clients(sops_project, {"team": (TOKEN, ["completions"])})
        async with running(sops_project) as board:
            bearer = {"Authorization": f"Bearer {TOKEN}", "x-secret": HEADER, "cookie": f"s={HEADER}"}
            tools = [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]
            chat = {
                "model": "fake-model",
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
            }
            calls: list[tuple[str, dict[str, Any], dict[str, str]]] = [
                ("/v1/chat/completions", chat, bearer),
                ("/v1/chat/completions", {**chat, "stream": True}, bearer),
                ("/v1/chat/completions", {**chat, "tools": tools}, bearer),
                ("/v1/responses", {"model": "fake-model", "instructions": SYSTEM, "input": PROMPT}, bearer),
                ("/v1/completions", {"model": "fake-model", "prompt": PROMPT, "stream": True}, bearer),
                ("/v1/embeddings", {"model": "fake-model", "input": PROMPT}, bearer),
                (
                    "/v1/messages",
                    {
                        "model": "claude-x",
                        "max_tokens": 20,
                        "system": SYSTEM,
                        "messages": [{"role": "user", "content": PROMPT}],
                    },
                    {"x-api-key": TOKEN, "anthropic-version": "2023-06-01", "x-secret": HEADER},
                ),
            ]
            for path, payload, headers in calls:
                async with board.http.post(board.url + path, json=payload, headers=headers) as response:
                    body = await response.read()
                    assert response.status == 200, (path, body)
            # A failed attempt: the upstream refuses the key (its reason is the gateway's own).
            # A failed attempt (the upstream refuses the key), then Claude through litellm.
            up.fail(401, times=1)
            to_claude = {**chat, "model": "claude-x"}
            async with board.http.post(
                board.url + "/v1/chat/completions", json=to_claude, headers=bearer
            ) as r:
                assert r.status == 200, await r.text()
            sent = claude.requests[-1]
            assert sent.path == "/v1/messages" and sent.headers["traceparent"].startswith("00-")
            await otlp.spans_matching(lambda s: s.kind == "SERVER", len(calls) + 1)
            await otlp.point(lambda p: p.metric == "gen_ai.client.token.usage")
        assert any(PROMPT in r.json.__repr__() for r in up.requests)  # the canaries did go upstream
        exported = b"".join(otlp.exports)
        for canary in (PROMPT, SYSTEM, TOOL_ARGUMENT, TOKEN, HEADER, CANARY, ANTHROPIC_KEY):
            assert canary.encode() not in exported, canary
            for span in otlp.spans:
                assert canary not in repr(span), (canary, span.name)
        clients = {s.attributes.get("switchboard.client.name") for s in otlp.spans if s.kind == "SERVER"}
        assert clients == {"team"}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_answer_naming_the_prompt_as_its_model_exports_no_prompt(
    sops_project: SopsProject, otlp: OTLPReceiver, stream: bool
) -> None:
    """An upstream that reflects the request's prompt as the model its answer names: no span
    holds it (`gen_ai.response.model`), nor a metric (the tokens' model label of a provider that
    declares no models, the token histogram's attribute)."""

    async def reflect(request: web.Request) -> web.StreamResponse:
        named = (await request.json())["messages"][-1]["content"]
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        message = {"role": "assistant", "content": "hi"}
        answer = {"id": "c1", "object": "chat.completion", "model": named, "usage": usage}
        if not stream:
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response({**answer, "choices": [choice]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {**answer, "object": "chat.completion.chunk", "usage": None}
        for data in (
            {**chunk, "choices": [{"index": 0, "delta": message, "finish_reason": None}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": usage},
        ):
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reflect)
    async with serving(app) as url:
        write_provider(sops_project, "a", provider="openai", base_url=f"{url}/v1", api_key=CANARY)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            response = await board.chat(PROMPT, stream=stream, stream_options={"include_usage": True})
            assert response.status == 200, await response.text()
            assert PROMPT in await response.text()  # the client's own answer names it
            metrics = await board.metrics()
            await otlp.spans_matching(lambda s: s.kind == "SERVER", 1)
            await otlp.point(lambda p: p.metric == "gen_ai.client.token.usage")
    assert PROMPT not in metrics
    assert PROMPT.encode() not in b"".join(otlp.exports)


async def test_an_answer_naming_the_prompt_as_the_client_escaped_it_exports_no_prompt(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    """A client whose JSON encoder escapes characters of its prompt (.NET's: an apostrophe as
    `\\u0027`) sends bytes that do not hold it as it is; an upstream reflecting the prompt it
    read as its answer's model has it in no span and no metric all the same."""
    prompt = f"don't-{PROMPT}"

    async def reflect(request: web.Request) -> web.Response:
        named = (await request.json())["messages"][-1]["content"]
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        return web.json_response({"id": "c1", "model": named, "choices": [choice], "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reflect)
    async with serving(app) as url:
        write_provider(sops_project, "a", provider="openai", base_url=f"{url}/v1", api_key=CANARY)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            body = '{"model": "m", "messages": [{"role": "user", "content": "don\\u0027t-' + PROMPT + '"}]}'
            assert json.loads(body)["messages"][0]["content"] == prompt
            headers = {"Content-Type": "application/json"}
            async with board.http.post(f"{board.url}/v1/chat/completions", data=body, headers=headers) as r:
                assert r.status == 200, await r.text()
            metrics = await board.metrics()
            await otlp.spans_matching(lambda s: s.kind == "SERVER", 1)
            await otlp.point(lambda p: p.metric == "gen_ai.client.token.usage")
    assert PROMPT not in metrics
    assert PROMPT.encode() not in b"".join(otlp.exports)

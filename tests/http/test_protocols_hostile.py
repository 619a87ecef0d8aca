"""A hostile reviewer of the protocols (docs/reference.md §14, §7): bodies crafted to reach another
host or another provider's key, malformed upstream streams, tool arguments that are not JSON,
huge and deep bodies. None may work, and none may make the service answer 500."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import SopsProject
from tests.support.gateway import CANARY, running, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, serving, upstreams

HOSTILE = {
    "base_url": "ATTACKER",
    "api_base": "ATTACKER",
    "api_key": "sk-attacker-chosen",
    "extra_headers": {"Authorization": "Bearer sk-attacker-chosen"},
    "custom_llm_provider": "openai",
    "metadata": {"user_id": "u"},
}
JSON = {"Content-Type": "application/json"}
MESSAGE = {"model": "fake-model", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


async def test_no_field_or_header_of_any_protocol_chooses_a_host_or_a_key(sops_project: SopsProject) -> None:
    async with upstreams(
        {"name": "a", "api_key": CANARY},
        {"name": "claude", "protocol": "anthropic", "api_key": CANARY},
        {"name": "attacker"},
    ) as (a, claude, attacker):
        write_provider(sops_project, "a", base_url=a.base_url, api_key=CANARY, models=["fake-model"])
        write_provider(
            sops_project,
            "claude",
            provider="anthropic",
            base_url=claude.url,
            api_key=CANARY,
            models=["claude-x"],
        )
        write_routing(sops_project, chat=["a", "claude"])
        hostile = {k: attacker.base_url if v == "ATTACKER" else v for k, v in HOSTILE.items()}
        headers = {"x-api-key": "sk-attacker-chosen", "anthropic-version": "2023-06-01", "Host": "127.0.0.1"}
        async with running(sops_project) as board:
            for path, body in (
                ("/v1/messages", {**MESSAGE, **hostile}),  # translated for `a`
                ("/v1/messages", {**MESSAGE, "model": "claude-x", **hostile}),  # native to `claude`
                ("/v1/responses", {"model": "fake-model", "input": "hi", **hostile}),  # native to `a`
                ("/v1/completions", {"model": "fake-model", "prompt": "hi", **hostile}),
            ):
                async with board.http.post(board.url + path, json=body, headers=headers) as response:
                    assert response.status == 200, (path, await response.text())
    assert not attacker.requests
    sent = [*a.requests, *claude.requests]
    assert len(sent) == 4 and all("sk-attacker-chosen" not in json.dumps(r.headers) for r in sent)
    assert a.requests[0].headers["authorization"] == f"Bearer {CANARY}"
    assert claude.requests[0].headers["x-api-key"] == CANARY
    translated = a.requests[0].json
    assert not set(HOSTILE) - {"metadata"} & set(translated)  # only chat's fields were translated


async def test_tool_arguments_that_are_not_json_reach_the_client_as_they_came(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a", tool_calls={"f": "{not json"}) as up:
        write_provider(sops_project, "a", server_type="llamacpp", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        tools = [{"name": "f", "input_schema": {"type": "object"}}]
        async with running(sops_project) as board:
            response = await board.post("/v1/messages", {**MESSAGE, "tools": tools})
            assert response.status == 200
            assert (await response.json())["content"][0]["input"] == "{not json"
            response = await board.post("/v1/messages", {**MESSAGE, "tools": tools, "stream": True})
            deltas = [
                json.loads(line[5:])
                for line in (await response.text()).splitlines()
                if "partial_json" in line
            ]
            assert "".join(d["delta"]["partial_json"] for d in deltas) == "{not json"
            tool = {"type": "function", "name": "f", "parameters": {}}
            response = await board.post(
                "/v1/responses", {"model": "fake-model", "input": "x", "tools": [tool]}
            )
            assert (await response.json())["output"][0]["arguments"] == "{not json"


async def garbage(request: web.Request) -> web.StreamResponse:
    """An upstream whose stream is not what it claims, then breaks off."""
    body = await request.json()
    if not body.get("stream"):
        return web.Response(text="<html>not json</html>", content_type="application/json")
    answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await answer.prepare(request)
    await answer.write(b"data: {broken\n\ndata: [1,2]\n\n: comment\n\ndata: " + b'{"choices": "x"}\n\n')
    await answer.write(b'data: {"choices": [{"index": 0, "delta": {"content": "half"}}]}\n\n')
    assert request.transport is not None
    request.transport.abort()
    return answer


async def test_a_malformed_upstream_never_makes_a_500(sops_project: SopsProject) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", garbage)
    async with serving(app) as url:
        write_provider(sops_project, "bad", server_type="llamacpp", base_url=f"{url}/v1")
        write_routing(sops_project, chat="bad")
        async with running(sops_project, circuit_failures=100) as board:
            response = await board.post("/v1/messages", MESSAGE)
            assert response.status == 502 and (await response.json())["type"] == "error"
            response = await board.post("/v1/responses", {"model": "m", "input": "x"})
            assert response.status == 502 and (await response.json())["error"]["type"] == "upstreams_failed"
            response = await board.post("/v1/messages", {**MESSAGE, "stream": True})
            text = await response.text()
            assert response.status == 200 and "half" in text and text.rstrip().endswith("}")
            assert "event: error" in text and "message_stop" not in text
            response = await board.post("/v1/responses", {"model": "m", "input": "x", "stream": True})
            assert "response.failed" in await response.text()


def deep(depth: int) -> str:
    """A JSON value nested `depth` arrays deep, as text (too deep for Python to encode)."""
    return "[" * depth + "1" + "]" * depth


async def test_huge_and_deep_bodies_are_refused_in_the_protocols_shape(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", server_type="llamacpp", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project, max_body_bytes=100_000) as board:
            response = await board.post("/v1/messages", {**MESSAGE, "pad": "x" * 200_000})
            assert response.status == 413 and (await response.json())["error"]["type"] == "request_too_large"
            for depth in (*range(850, 1000, 3), 5000):  # around where parsing and encoding give up
                nested = deep(depth)
                call = '{"type": "tool_use", "id": "t", "name": "f", "input": {"x": ' + nested + "}}"
                tool = '{"type": "function", "name": "f", "parameters": {"x": ' + nested + "}}"
                for path, raw in (
                    (
                        "/v1/messages",
                        '{"model": "m", "messages": [{"role": "assistant", "content": [' + call + "]}]}",
                    ),
                    ("/v1/responses", '{"model": "m", "input": "x", "tools": [' + tool + "]}"),
                    (
                        "/v1/responses",
                        '{"model": "m", "input": "x", "stream": true, "tools": [' + tool + "]}",
                    ),
                    ("/v1/messages/count_tokens", '{"model": "m", "messages": [], "system": ' + nested + "}"),
                ):
                    async with board.http.post(board.url + path, data=raw, headers=JSON) as response:
                        assert response.status in (200, 400), (path, depth, await response.text())


@pytest.mark.parametrize("torn", [3, 40])
async def test_a_torn_first_event_holds_back_no_protocols_head(sops_project: SopsProject, torn: int) -> None:
    """The head goes out with a stream's first bytes, or alone when the first bytes are no
    whole event (the translators, and a relay that drops the usage chunk, have nothing to
    write yet): the client has it before the upstream sends more."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model"}
    delta: dict[str, Any] = {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}
    stop: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    events = [
        {**chunk, "choices": [delta], "usage": None},
        {**chunk, "choices": [stop], "usage": None},
        {**chunk, "choices": [], "usage": usage},
    ]
    wire = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    headed = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await answer.prepare(request)
        await answer.write(wire[:torn])
        await asyncio.wait_for(headed.wait(), 5)  # the client must have had the head by then
        await answer.write(wire[torn:])
        return answer

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    app.router.add_post("/v1/completions", stream)
    asked = [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/chat/completions", {"model": "m", "messages": [], "stream_options": {"include_usage": True}}),
        ("/v1/messages", MESSAGE),
        ("/v1/responses", {"model": "m", "input": "x"}),
        ("/v1/completions", {"model": "m", "prompt": "x"}),
    ]
    async with serving(app) as url:
        write_provider(sops_project, "up", server_type="llamacpp", base_url=f"{url}/v1")
        write_routing(sops_project, chat="up")
        async with running(sops_project) as board:
            for path, body in asked:
                headed.clear()
                async with board.http.post(board.url + path, json={**body, "stream": True}) as response:
                    headed.set()
                    text = await response.text()
                assert response.status == 200, path
                assert "hi" in text and "upstream_failed" not in text and "event: error" not in text, path


@pytest.mark.parametrize("status", [204, 205])
async def test_an_event_stream_with_a_status_that_has_no_body_writes_none(
    sops_project: SopsProject, status: int
) -> None:
    """A 204 or 205 carries no body (RFC 9110 §15.3.5, §15.3.6), whatever its Content-Type: no
    translator's events may follow its head, or the client reads them as its next answer."""

    async def bodiless(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=status, headers={"Content-Type": "text/event-stream"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", bodiless)
    app.router.add_post("/v1/completions", bodiless)
    asked = [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/messages", MESSAGE),
        ("/v1/responses", {"model": "m", "input": "x"}),
        ("/v1/completions", {"model": "m", "prompt": "x"}),
    ]
    async with serving(app) as url:
        write_provider(sops_project, "up", server_type="llamacpp", base_url=f"{url}/v1")
        write_routing(sops_project, chat="up")
        async with running(sops_project, circuit_failures=100) as board:
            for path, body in asked:
                async with board.http.post(board.url + path, json={**body, "stream": True}) as response:
                    await response.read()
                assert response.status in (status, 502), path
                ready = await board.get("/readyz")  # the next answer on the same connection
                assert ready.status == 200, path


BODIES = {
    "/v1/chat/completions": {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "fake-model", "prompt": "hi"},
    "/v1/messages": MESSAGE,
    "/v1/responses": {"model": "fake-model", "input": "hi"},
}


@pytest.mark.parametrize("stream", ["yes", 1, "true", {}, []])
async def test_a_stream_that_is_no_boolean_is_a_400_in_each_protocols_shape(
    sops_project: SopsProject, stream: object
) -> None:
    """`"stream": "yes"` made the upstream stream while the gateway read the answer as one body
    (no usage counted, no stream's headers): refused before anything is sent."""
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            for path, body in BODIES.items():
                async with board.http.post(board.url + path, json={**body, "stream": stream}) as response:
                    answer = await response.json()
                    assert response.status == 400, (path, answer)
                    if path == "/v1/messages":
                        assert answer["type"] == "error"
                    assert answer["error"]["type"] == "invalid_request_error", (path, answer)
                    assert "`stream` must be a boolean" in answer["error"]["message"]
            for path, body in BODIES.items():  # a boolean, or null, is as it was
                for allowed in (False, None):
                    async with board.http.post(
                        board.url + path, json={**body, "stream": allowed}
                    ) as response:
                        assert response.status == 200, (path, allowed, await response.text())
    assert len(a.requests) == 2 * len(BODIES)


async def test_a_chat_request_without_a_model_is_a_400_as_one_whose_model_is_null(
    sops_project: SopsProject,
) -> None:
    """Each chat protocol names its model (OpenAI's and Anthropic's APIs require it): none was
    forwarded, and on /v1/messages answered as model "None". Embeddings and rerank may leave it
    to the server, as TEI's clients do."""
    async with upstreams({"name": "a"}, {"protocol": "tei", "name": "tei"}) as (a, tei):
        write_provider(sops_project, "a", base_url=a.base_url, purposes=["chat", "embeddings"])
        write_provider(sops_project, "tei", base_url=tei.base_url, server_type="tei", purposes=["reranking"])
        write_routing(sops_project, chat="a", embeddings="a", reranking="tei")
        async with running(sops_project) as board:
            for path, body in BODIES.items():
                for model in ({}, {"model": None}):
                    without = {k: v for k, v in body.items() if k != "model"} | model
                    async with board.http.post(board.url + path, json=without) as response:
                        answer = await response.json()
                        assert response.status == 400, (path, model, answer)
                        assert "`model`" in answer["error"]["message"]
                        assert (path == "/v1/messages") == (answer.get("type") == "error")
            sent = len(a.requests)
            embedded = await board.post("/v1/embeddings", {"input": "hi"})
            reranked = await board.post("/v1/rerank", {"query": "q", "documents": ["d"]})
    assert sent == 0
    assert (embedded.status, reranked.status) == (200, 200)


WRONG = [None, [], {}, "", 0, -1, 10**30, 1e308, True, [None], [{}], {"type": None}, "\ud800"]
"""A field's value of every wrong kind: null, empty, huge, a lone surrogate..."""
FIELDS = {
    "/v1/chat/completions": ("messages", "max_tokens", "tools", "tool_choice", "stop", "stream_options"),
    "/v1/embeddings": ("input", "encoding_format", "dimensions"),
    "/v1/rerank": ("query", "documents", "top_n"),
    "/v1/completions": ("prompt", "max_tokens", "stream_options"),
    "/v1/messages": (
        "messages",
        "system",
        "max_tokens",
        "tools",
        "tool_choice",
        "stop_sequences",
        "metadata",
    ),
    "/v1/messages/count_tokens": ("messages", "system", "tools"),
    "/v1/responses": ("input", "instructions", "tools", "tool_choice", "text", "reasoning", "include"),
}


async def test_a_field_of_any_wrong_kind_is_never_a_500_and_keeps_the_protocols_shape(
    sops_project: SopsProject,
) -> None:
    """Every gateway endpoint, native (`n`: vLLM) and translated (`t`: llama.cpp): each field of
    every wrong kind is answered (as the upstream answers it, or refused), never 500, and on the
    Messages paths in Anthropic's shape."""
    bodies = {
        **BODIES,
        "/v1/embeddings": {"model": "fake-model", "input": "hi"},
        "/v1/rerank": {"model": "fake-model", "query": "q", "documents": ["a", "b"]},
        "/v1/messages/count_tokens": {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
    }
    everything = ["chat", "embeddings", "reranking"]
    async with upstreams({"name": "n", "models": ("n",)}, {"name": "t", "models": ("t",)}) as (n, t):
        write_provider(sops_project, "n", base_url=n.base_url, models=["n"], purposes=everything)
        write_provider(
            sops_project, "t", server_type="llamacpp", base_url=t.base_url, models=["t"], purposes=everything
        )
        write_routing(sops_project, chat=["n", "t"], embeddings=["n", "t"], reranking=["n", "t"])
        async with running(sops_project, circuit_failures=10_000) as board:
            for path, fields in FIELDS.items():
                for model, field, value in itertools.product(("n", "t"), fields, WRONG):
                    body = {**bodies[path], "model": model, field: value}
                    data = json.dumps(body).encode("utf-8", "surrogatepass")
                    async with board.http.post(board.url + path, data=data, headers=JSON) as response:
                        answer = await response.read()
                    assert response.status != 500, (path, model, field, value, answer)
                    if path.startswith("/v1/messages") and response.status >= 400:
                        assert json.loads(answer)["type"] == "error", (path, model, field, value, answer)

"""docs/reference.md §14 as the real `anthropic` and `openai` SDKs see it: what the service sends them
is what their parsers read, whatever the upstream behind a translation did."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import SopsProject
from tests.support.gateway import running, write_clients, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, serving

_OPEN: list[anthropic.AsyncAnthropic | openai.AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().close()


def claude(url: str, token: str = "unused") -> anthropic.AsyncAnthropic:  # noqa: S107 - no auth
    _OPEN.append(anthropic.AsyncAnthropic(base_url=url, api_key=token, max_retries=0))
    return _OPEN[-1]  # type: ignore[return-value]


def gpt(url: str) -> openai.AsyncOpenAI:
    _OPEN.append(openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))
    return _OPEN[-1]  # type: ignore[return-value]


def _whole_chat_app(answers: list[dict[str, Any]], arguments: Any = '{"at": "it"}') -> web.Application:
    """A chat server that answers every request whole, `stream` or not (as some servers do
    with tools), recording the requests' bodies in `answers`; its tool call's `arguments` are
    text, or an object as some servers write them."""

    async def whole(request: web.Request) -> web.Response:
        answers.append(await request.json())
        call = {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": arguments}}
        message = {"role": "assistant", "content": "Let me look.", "tool_calls": [call]}
        return web.json_response(
            {
                "id": "chatcmpl-whole",
                "object": "chat.completion",
                "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", whole)
    return app


@pytest.mark.parametrize("arguments", ['{"at": "it"}', {"at": "it"}], ids=["text", "object"])
async def test_a_translated_stream_whose_upstream_answered_whole_still_comes_as_events(
    sops_project: SopsProject, arguments: Any
) -> None:
    """A client that asked for a stream reads events alone (the SDKs raise on a JSON body); an
    upstream that ignored `stream` and answered whole is translated into the events it would
    have streamed, text, tool call (its arguments as a whole answer's are read, an object too),
    stop reason and usage."""
    asked: list[dict[str, Any]] = []
    async with serving(_whole_chat_app(asked, arguments)) as url:
        write_provider(sops_project, "a", server_type="llamacpp", base_url=f"{url}/v1")
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            tools: Any = [{"name": "look", "input_schema": {"type": "object"}}]
            question: Any = [{"role": "user", "content": "look"}]
            async with claude(board.url).messages.stream(
                model="m", max_tokens=50, tools=tools, messages=question
            ) as stream:
                kinds = [event.type async for event in stream]
                message = await stream.get_final_message()
            assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
            assert message.content[0].type == "text" and message.content[0].text == "Let me look."
            assert message.content[1].type == "tool_use" and message.content[1].input == {"at": "it"}
            assert message.stop_reason == "tool_use"
            assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 9)

            functions: Any = [{"type": "function", "name": "look", "parameters": {"type": "object"}}]
            async with gpt(board.url).responses.stream(model="m", input="look", tools=functions) as events:
                names = [event.type async for event in events]
                response = await events.get_final_response()
            assert names[0] == "response.created" and names[-1] == "response.completed", names
            assert response.output_text == "Let me look."
            call = response.output[1]
            assert call.type == "function_call" and json.loads(call.arguments) == {"at": "it"}
            assert response.usage is not None and response.usage.output_tokens == 9
    assert [body["stream"] for body in asked] == [True, True]


async def test_each_status_comes_to_the_anthropic_sdk_with_anthropics_error_type(
    sops_project: SopsProject,
) -> None:
    """docs/reference.md §14: errors on /v1/messages keep section 6's statuses in Anthropic's shape,
    `{"type": "error", "error": {"type", "message"}}`, each with the `type` Anthropic gives that
    status, so that the SDK raises the class it raises for Anthropic's own."""
    client, reader, stranger = "tok-messages-client-01", "tok-messages-reader-01", "tok-messages-nobody-01"
    async with FakeUpstream(name="a", models=("m",)) as up:
        write_provider(sops_project, "a", base_url=up.base_url, models=["m"])
        write_routing(sops_project, chat="a")
        clients = write_clients(sops_project, {"reader": (reader, ["config:read"]), "client": (client, [])})
        limited = "scopes: [completions]\n  limits: {rpm: 1}"
        clients.write_text(clients.read_text().replace("scopes: []", limited))
        async with running(sops_project, max_body_bytes=4096, circuit_failures=2) as board:
            question: Any = [{"role": "user", "content": "hi"}]
            seen: list[tuple[type[Exception], int, str]] = []

            async def refused(token: str, **body: Any) -> None:
                request = {"model": "m", "max_tokens": 5, "messages": question, **body}
                with pytest.raises(anthropic.APIStatusError) as caught:
                    await claude(board.url, token).messages.create(**request)
                error = caught.value.body
                assert isinstance(error, dict) and error["type"] == "error", error
                assert isinstance(error["error"]["message"], str) and error["error"]["message"]
                seen.append((type(caught.value), caught.value.status_code, error["error"]["type"]))

            await refused(stranger)
            await refused(reader)
            await refused(client, model="no-such-model")
            await refused(client, system="x" * 5000)
            up.fail(500)
            await refused(client)  # the upstream fails: 502
            await refused(client)  # over its rpm now: 429
            generation = (await (await board.get("/readyz")).json())["generation"]
            write_clients(sops_project, {"client": (client, ["completions"])})  # no limit any more
            await board.wait_for_generation(generation + 1)
            await refused(client)  # its second failure opens its circuit
            await refused(client)  # no candidate now: 503
    assert seen == [
        (anthropic.AuthenticationError, 401, "authentication_error"),
        (anthropic.PermissionDeniedError, 403, "permission_error"),
        (anthropic.NotFoundError, 404, "not_found_error"),
        (anthropic.ContentTooLargeError, 413, "request_too_large"),
        (anthropic.InternalServerError, 502, "api_error"),
        (anthropic.RateLimitError, 429, "rate_limit_error"),
        (anthropic.InternalServerError, 502, "api_error"),
        (anthropic.ServiceUnavailableError, 503, "api_error"),
    ]

"""Anthropic Messages at /v1/messages with the real `anthropic` SDK (docs/reference.md §14): translated to
chat for an OpenAI-protocol upstream, native to an Anthropic one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest

from tests.conftest import SopsProject
from tests.gateway.test_metering import TOKEN as LIMITED
from tests.gateway.test_metering import write_clients as write_limited
from tests.support.gateway import CANARY, running, write_clients, write_provider, write_routing
from tests.support.upstreams import FakeUpstream

TOKEN = "tok-messages-client-0001"


_OPEN: list[anthropic.AsyncAnthropic] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().close()


def client(url: str, token: str = "unused") -> anthropic.AsyncAnthropic:  # noqa: S107 - no auth here
    """The SDK as an application builds it (closed after the test)."""
    _OPEN.append(anthropic.AsyncAnthropic(base_url=url, api_key=token, max_retries=0))
    return _OPEN[-1]


async def test_a_translated_message_and_its_stream(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a", api_key=CANARY, tool_calls={"look": {"at": "it"}}) as up:
        write_provider(sops_project, "a", base_url=up.base_url, api_key=CANARY)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            sdk = client(board.url)
            message = await sdk.messages.create(
                model="fake-model",
                max_tokens=100,
                system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                messages=[{"role": "user", "content": "hello there"}],
                thinking={"type": "enabled", "budget_tokens": 1024},
            )
            assert message.content[0].type == "text" and message.content[0].text == "a says: hello there"
            assert message.stop_reason == "end_turn" and message.role == "assistant"
            assert message.usage.input_tokens == 2 and message.usage.output_tokens == 4
            sent = up.requests[-1]
            assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {CANARY}"
            assert sent.json["messages"][0] == {"role": "system", "content": "Be brief."}
            assert "thinking" not in sent.json

            tools = [{"name": "look", "description": "look at a thing", "input_schema": {"type": "object"}}]
            async with sdk.messages.stream(
                model="fake-model",
                max_tokens=100,
                tools=tools,
                messages=[{"role": "user", "content": "look"}],
            ) as stream:
                kinds = [event.type async for event in stream]
                final = await stream.get_final_message()
            assert final.stop_reason == "tool_use"
            assert final.content[0].type == "tool_use" and final.content[0].input == {"at": "it"}
            assert kinds[0] == "message_start" and "input_json" in kinds and kinds[-1] == "message_stop"
            assert final.usage.output_tokens > 0

            async with sdk.messages.stream(
                model="fake-model", max_tokens=50, messages=[{"role": "user", "content": "stream me"}]
            ) as stream:
                text = "".join([t async for t in stream.text_stream])
            assert text == "a says: stream me"


async def test_a_native_message_goes_as_it_is_with_the_providers_key(sops_project: SopsProject) -> None:
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY, models=("claude-x",)) as up:
        write_provider(
            sops_project,
            "claude",
            provider="anthropic",
            base_url=up.url,
            api_key=CANARY,
            model_map={"sonnet": "claude-x"},
        )
        write_routing(sops_project, chat="claude")
        write_clients(sops_project, {"cc": (TOKEN, ["completions"])})
        async with running(sops_project) as board:
            sdk = client(board.url, TOKEN)  # the token as `x-api-key`, as Claude Code sends it
            raw = {
                "model": "sonnet",
                "max_tokens": 64,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
                    }
                ],
                "thinking": {"type": "adaptive"},
            }
            message = await sdk.messages.create(
                **raw, extra_headers={"anthropic-beta": "context-1m-2025-08-07"}
            )  # type: ignore[arg-type]
            assert message.content[0].text == "claude says: hi"  # type: ignore[union-attr]
            sent = up.requests[-1]
            assert sent.path == "/v1/messages"
            assert sent.headers["x-api-key"] == CANARY and "authorization" not in sent.headers
            assert sent.headers["anthropic-beta"] == "context-1m-2025-08-07"
            assert sent.json == {**raw, "model": "claude-x"}  # as it is, but for the model's name
            assert TOKEN not in str(sent.headers)

            async with sdk.messages.stream(**raw) as stream:  # type: ignore[arg-type]
                final = await stream.get_final_message()
            assert final.content[0].text == "claude says: hi"  # type: ignore[union-attr]
            assert up.requests[-1].json["stream"] is True
            metrics = await board.metrics()
            tokens = 'switchboard_tokens_total{client="cc",kind="%s",model="claude-x",provider="claude"} %s'
            assert tokens % ("prompt", "2.0") in metrics and tokens % ("completion", "6.0") in metrics

            counted = await sdk.messages.count_tokens(
                model="sonnet", messages=[{"role": "user", "content": "hi"}]
            )
            assert counted.input_tokens > 1000 and up.requests[-1].path == "/v1/messages/count_tokens"

            with pytest.raises(anthropic.AuthenticationError) as refused:
                await client(board.url, "tok-wrong").messages.create(**raw)  # type: ignore[arg-type]
            assert refused.value.body["type"] == "error"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_native_answer_and_refusal_carry_anthropics_request_id(
    sops_project: SopsProject, stream: bool
) -> None:
    """docs/reference.md §7: the upstream's request id is passed back; Anthropic names it `request-id`,
    and a native request's answer names it as the same upstream's answer through chat does."""
    async with FakeUpstream(protocol="anthropic", name="claude") as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            body = {
                "model": "m",
                "max_tokens": 8,
                "stream": stream,
                "messages": [{"role": "user", "content": "hi"}],
            }
            served = await board.post("/v1/messages", body)
            up.fail(400, times=1)
            refused = await board.post("/v1/messages", body)
    assert (served.status, refused.status) == (200, 400)
    assert served.headers["x-request-id"] == "req_claude_1"
    assert refused.headers["x-request-id"] == "req_claude_2"


async def test_count_tokens_is_a_local_estimate_where_no_provider_speaks_messages(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            sdk = client(board.url)
            short = await sdk.messages.count_tokens(
                model="fake-model", messages=[{"role": "user", "content": "hi"}]
            )
            longer = await sdk.messages.count_tokens(
                model="fake-model", messages=[{"role": "user", "content": "hi " * 500}]
            )
    assert 0 < short.input_tokens < longer.input_tokens
    assert not up.requests


async def test_count_tokens_is_a_local_estimate_when_the_provider_that_counts_cannot_now(
    sops_project: SopsProject,
) -> None:
    """The provider that speaks Messages natively fails (a 500, then its circuit open): the count
    is the local estimate, not a 502 or a 503 that would stop a client sizing its context by it;
    its headers say no provider answered, and how many were tried."""
    async with FakeUpstream(protocol="anthropic", name="claude", models=("claude-x",)) as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project, circuit_failures=1) as board:
            up.fail(500)
            question = {"model": "claude-x", "messages": [{"role": "user", "content": "hi " * 50}]}
            failed = await board.post("/v1/messages/count_tokens", question)
            failed_body = await failed.json()
            opened = await board.post("/v1/messages/count_tokens", question)
            opened_body = await opened.json()
    assert (failed.status, opened.status) == (200, 200), (failed_body, opened_body)
    assert failed_body["input_tokens"] == opened_body["input_tokens"] > 0
    assert failed.headers["x-switchboard-provider"] == "none"
    assert failed.headers["x-switchboard-attempts"] == "1"
    assert opened.headers["x-switchboard-attempts"] == "0"
    assert [r.path for r in up.requests] == ["/v1/messages/count_tokens"]  # then its circuit is open


async def test_errors_come_in_anthropics_shape_with_sections_6_statuses(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a", models=("only-this",)) as up:
        write_provider(sops_project, "a", base_url=up.base_url, models=["only-this"])
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            sdk = client(board.url)
            with pytest.raises(anthropic.NotFoundError) as missing:
                await sdk.messages.create(
                    model="other", max_tokens=5, messages=[{"role": "user", "content": "x"}]
                )
            assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
            up.fail(400, times=1)
            with pytest.raises(anthropic.BadRequestError) as refused:
                await sdk.messages.create(
                    model="only-this", max_tokens=5, messages=[{"role": "user", "content": "x"}]
                )
            assert "injected failure 400" in str(refused.value.body)
            up.fail(500)
            with pytest.raises(anthropic.APIStatusError) as failed:
                await sdk.messages.create(
                    model="only-this", max_tokens=5, messages=[{"role": "user", "content": "x"}]
                )
            assert failed.value.status_code == 502 and failed.value.body["type"] == "error"  # type: ignore[index]
            response = await board.post("/v1/messages?beta=true", {"model": "only-this"})
            assert (
                response.status == 400 and (await response.json())["error"]["type"] == "invalid_request_error"
            )
            async with board.http.head(board.url + "/") as probe:
                assert probe.status == 200


async def test_the_routers_own_errors_on_the_messages_paths_come_in_anthropics_shape(
    sops_project: SopsProject,
) -> None:
    """Not only the endpoint's: a method the path does not take is answered by the router (405,
    its `Allow` kept), and still in Anthropic's shape; so is an unknown path below /v1/messages."""
    write_provider(sops_project, "a", base_url="http://127.0.0.1:9/v1")
    write_routing(sops_project, chat="a")
    json_type = {"Content-Type": "application/json"}
    async with running(sops_project) as board:
        for method, path, headers in (
            ("GET", "/v1/messages", json_type),
            ("PUT", "/v1/messages", json_type),
            ("GET", "/v1/messages/count_tokens", json_type),
            ("POST", "/v1/messages/batches", json_type),
        ):
            async with board.http.request(method, board.url + path, headers=headers, data=b"{}") as response:
                body = await response.json()
                assert body["type"] == "error" and body["error"]["message"], (method, path, body)
                if response.status == 405:
                    assert body["error"]["type"] == "invalid_request_error"
                    assert response.headers["Allow"] == "POST"
                else:
                    assert (response.status, body["error"]["type"]) == (404, "not_found_error")
        async with board.http.get(board.url + "/v1/responses") as response:  # other paths keep theirs
            assert (await response.json())["error"]["type"] == "method_not_allowed"


async def test_a_provider_without_count_tokens_is_estimated_at_once_and_keeps_speaking_messages(
    sops_project: SopsProject,
) -> None:
    """A 404 at `/v1/messages/count_tokens` from a provider that speaks Messages by default: it
    does not count tokens, so that count is a local estimate (not a 502), and it is remembered;
    its Messages still go as they are."""
    missing = ("/v1/messages/count_tokens",)
    async with FakeUpstream(protocol="anthropic", name="claude", models=("claude-x",), missing=missing) as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            sdk = client(board.url)
            question: Any = [{"role": "user", "content": "hi"}]
            first = await sdk.messages.count_tokens(model="claude-x", messages=question)
            second = await sdk.messages.count_tokens(model="claude-x", messages=question)
            assert 0 < first.input_tokens == second.input_tokens
            assert [r.path for r in up.requests] == ["/v1/messages/count_tokens"]  # then remembered
            raw = {
                "model": "claude-x",
                "max_tokens": 9,
                "messages": question,
                "thinking": {"type": "adaptive"},
            }
            message = await sdk.messages.create(**raw)
            assert message.content[0].text == "claude says: hi"  # type: ignore[union-attr]
            assert up.requests[-1].path == "/v1/messages" and up.requests[-1].json == raw  # as it is


async def test_a_count_estimated_after_a_404_at_the_path_says_the_attempt_it_made(
    sops_project: SopsProject,
) -> None:
    """docs/reference.md §14: an estimated count's `x-switchboard-attempts` is how many providers
    were tried. The one that answered 404 at `/v1/messages/count_tokens` was (its 404 is what
    made the count an estimate); the next count, which tries none, says 0."""
    missing = ("/v1/messages/count_tokens",)
    async with FakeUpstream(protocol="anthropic", name="claude", models=("claude-x",), missing=missing) as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            question = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}
            first = await board.post("/v1/messages/count_tokens", question)
            second = await board.post("/v1/messages/count_tokens", question)
    assert (first.status, second.status) == (200, 200)
    assert [r.path for r in up.requests] == ["/v1/messages/count_tokens"]
    assert first.headers["x-switchboard-provider"] == second.headers["x-switchboard-provider"] == "none"
    assert (first.headers["x-switchboard-attempts"], second.headers["x-switchboard-attempts"]) == ("1", "0")


async def test_a_translated_message_maps_what_chat_has_and_drops_the_rest_never_refusing(
    sops_project: SopsProject,
) -> None:
    """The reference's §14 details, as Claude Code sends them (`?beta=true`, its betas' header and fields):
    `stop_sequences` as `stop`, `metadata` kept, a `system` message inside `messages` joined to
    the system prompt in its order; hosted tools, `thinking`, `cache_control` and the betas'
    fields dropped, and the Anthropic headers not sent to a chat upstream."""
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", server_type="llamacpp", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            body = {
                "model": "fake-model",
                "max_tokens": 9,
                "system": [{"type": "text", "text": "First.", "cache_control": {"type": "ephemeral"}}],
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "Second."},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}}],
                    },
                ],
                "stop_sequences": ["END"],
                "metadata": {"user_id": "u-1"},
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "tools": [
                    {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
                    {"type": "bash_20250124", "name": "bash"},
                    {"name": "f", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}},
                ],
                "context_management": {"edits": []},
                "top_k": 5,
            }
            headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "context-management-2025-06-27"}
            async with board.http.post(
                board.url + "/v1/messages?beta=true", json=body, headers=headers
            ) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["type"] == "message"
    sent = up.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json == {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "First.\n\nSecond."},
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
        ],
        "max_tokens": 9,
        "stop": ["END"],
        "metadata": {"user_id": "u-1"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }
    assert not {"anthropic-version", "anthropic-beta"} & set(sent.headers)


async def test_a_token_count_for_a_limited_client_says_what_remains_and_counts_nothing(
    sops_project: SopsProject,
) -> None:
    """The reference's §13: every answer to a client with limits carries the remaining-* headers. A
    token count is no completion (nothing is counted or charged), and says what remains all the
    same: counted by its provider, estimated, or refused."""
    async with (
        FakeUpstream(protocol="anthropic", name="claude", models=("claude-x",)) as claude,
        FakeUpstream(name="a") as a,
    ):
        write_provider(
            sops_project,
            "claude",
            provider="anthropic",
            base_url=claude.url,
            api_key=CANARY,
            models=["claude-x"],
            pricing={"*": {"input": 1, "output": 2}},
        )
        write_provider(sops_project, "a", base_url=a.base_url, models=["fake-model"])
        write_routing(sops_project, chat=["claude", "a"])
        write_limited(sops_project, {"rpm": 5, "budget": {"usd": "300", "period": "day"}})
        async with running(sops_project) as board:
            question = [{"role": "user", "content": "hi"}]
            answers = [
                await board.post(
                    "/v1/messages/count_tokens", {"model": m, "messages": question}, token=LIMITED
                )
                for m in ("claude-x", "fake-model", "no-such-model")
            ]
            served = await board.post(
                "/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": question}, token=LIMITED
            )
    assert [r.status for r in answers] == [200, 200, 404]
    assert answers[0].headers["x-switchboard-provider"] == "claude"  # counted by its provider
    assert answers[1].headers["x-switchboard-provider"] == "none"  # estimated
    for answer in answers:
        assert answer.headers["x-switchboard-remaining-requests"] == "5", answer.status
        assert answer.headers["x-switchboard-remaining-tokens"] == "unlimited"
        assert answer.headers["x-switchboard-budget-remaining-usd"] == "300"
        assert answer.headers["x-switchboard-cost-usd"] == "0"  # not streamed: it says its cost
    assert served.status == 200 and served.headers["x-switchboard-remaining-requests"] == "4"


async def test_a_native_message_keeps_the_clients_anthropic_version_and_betas(
    sops_project: SopsProject,
) -> None:
    """The reference's §14: a native request keeps its protocol's headers (`anthropic-version`,
    `anthropic-beta`), the count of tokens too; the URL and the key still come from the file."""
    async with FakeUpstream(protocol="anthropic", name="claude", api_key=CANARY) as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            headers = {"anthropic-version": "2023-01-01", "anthropic-beta": "a-2025-01-01,b-2025-02-02"}
            question = [{"role": "user", "content": "hi"}]
            for path, body in (
                ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": question}),
                ("/v1/messages/count_tokens", {"model": "m", "messages": question}),
            ):
                async with board.http.post(board.url + path, json=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
    for sent in up.requests:
        assert sent.headers["anthropic-version"] == "2023-01-01"
        assert sent.headers["anthropic-beta"] == "a-2025-01-01,b-2025-02-02"
        assert sent.headers["x-api-key"] == CANARY
    assert [r.path for r in up.requests] == ["/v1/messages", "/v1/messages/count_tokens"]

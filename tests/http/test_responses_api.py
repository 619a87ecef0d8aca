"""OpenAI Responses at /v1/responses and legacy completions at /v1/completions, with the real
`openai` SDK (docs/reference.md §14): native where the provider speaks them, Responses translated otherwise,
`previous_response_id` only where the response came from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from service.http.context import REGISTRY
from tests.conftest import SopsProject, eventually
from tests.support.gateway import CANARY, running, write_clients, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, upstreams

_OPEN: list[openai.AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().close()


def client(url: str, token: str = "unused") -> openai.AsyncOpenAI:  # noqa: S107 - no auth here
    _OPEN.append(openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0))
    return _OPEN[-1]


TOOLS = [{"type": "function", "name": "look", "parameters": {"type": "object"}}, {"type": "web_search"}]


async def test_a_translated_response_its_stream_and_a_tool_round_trip(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a", api_key=CANARY, tool_calls={"look": {"at": "it"}}) as up:
        write_provider(sops_project, "a", server_type="llamacpp", base_url=up.base_url, api_key=CANARY)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            sdk = client(board.url)
            answer = await sdk.responses.create(
                model="fake-model",
                instructions="Be brief.",
                input="hello there",
                include=["reasoning.encrypted_content"],
            )
            assert answer.output_text == "a says: hello there" and answer.status == "completed"
            assert answer.usage is not None and answer.usage.input_tokens == 2
            sent = up.requests[-1]
            assert sent.path == "/v1/chat/completions" and sent.json["messages"][0]["content"] == "Be brief."

            called = await sdk.responses.create(model="fake-model", input="look", tools=TOOLS)  # type: ignore[arg-type]
            call = called.output[0]
            assert call.type == "function_call" and call.name == "look" and call.arguments == '{"at": "it"}'
            assert [t["function"]["name"] for t in up.requests[-1].json["tools"]] == [
                "look"
            ]  # web_search dropped

            history = [
                {"role": "user", "content": "look"},
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": "look",
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": call.call_id, "output": "a cat"},
            ]
            async with sdk.responses.stream(model="fake-model", input=history, tools=TOOLS) as stream:  # type: ignore[arg-type]
                kinds = [event.type async for event in stream]
                final = await stream.get_final_response()
            assert final.output_text == "a says: a cat"
            assert (
                kinds[:2] == ["response.created", "response.in_progress"]
                and kinds[-1] == "response.completed"
            )
            assert "response.output_text.delta" in kinds
            assert up.requests[-1].json["messages"][-1] == {
                "role": "tool",
                "tool_call_id": call.call_id,
                "content": "a cat",
            }

            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.responses.create(model="fake-model", input="again", previous_response_id=answer.id)
            assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
            assert "does not speak Responses natively" in refused.value.body["message"]  # type: ignore[index]


async def test_a_response_translated_for_anthropic_through_litellm_is_answered(
    sops_project: SopsProject,
) -> None:
    """Responses -> chat -> litellm -> Anthropic Messages, and back: litellm's answer is a
    text, which the translation back to a Response must get as its bytes."""
    async with FakeUpstream(protocol="anthropic", name="claude", models=("claude-x",)) as claude:
        write_provider(
            sops_project,
            "claude",
            provider="anthropic",
            base_url=claude.url,
            api_key=CANARY,
            models=["claude-x"],
        )
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            sdk = client(board.url)
            answer = await sdk.responses.create(model="claude-x", input="hello")
            assert answer.output_text == "claude says: hello"
            assert answer.usage is not None and answer.usage.output_tokens == 3
            stream = await sdk.responses.create(model="claude-x", input="again", stream=True)
            texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            assert "".join(texts) == "claude says: again"
    assert [r.path for r in claude.requests] == ["/v1/messages", "/v1/messages"]


async def test_a_refusal_through_litellm_keeps_its_status_and_message(sops_project: SopsProject) -> None:
    """The vendor's 4xx, translated back to a Response's error: its status, and why."""
    async with FakeUpstream(protocol="anthropic", name="claude", models=("claude-x",)) as claude:
        write_provider(sops_project, "claude", provider="anthropic", base_url=claude.url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            claude.fail(400, times=1)
            with pytest.raises(openai.BadRequestError) as refused:
                await client(board.url).responses.create(model="claude-x", input="hello")
    assert "injected failure 400 from claude" in refused.value.message
    assert CANARY not in str(refused.value.body)


async def test_a_native_response_keeps_its_conversation_on_its_provider(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a", "api_key": CANARY}, {"name": "b"}) as (a, b):
        write_provider(sops_project, "a", base_url=a.base_url, api_key=CANARY)
        write_provider(sops_project, "b", base_url=b.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        write_clients(
            sops_project, {"one": ("tok-one-0001", ["completions"]), "two": ("tok-two-0002", ["completions"])}
        )
        async with running(sops_project) as board:
            sdk = client(board.url, "tok-one-0001")
            first = await sdk.responses.create(
                model="fake-model", input="hello", extra_headers={"OpenAI-Beta": "x=1"}
            )
            assert (
                first.output_text == "a says: hello"
                and first.id.startswith("resp_")
                and "resp_a_1" not in first.id
            )
            assert a.requests[-1].path == "/v1/responses" and a.requests[-1].headers["openai-beta"] == "x=1"
            assert a.requests[-1].headers["authorization"] == f"Bearer {CANARY}"

            async with sdk.responses.stream(
                model="fake-model", input="next", previous_response_id=first.id
            ) as stream:
                second = await stream.get_final_response()
            assert a.requests[-1].json["previous_response_id"] == "resp_a_1"  # unwrapped for its upstream
            assert second.output_text.endswith("(after: a says: hello)") and second.id != first.id
            assert second.previous_response_id == first.id  # the id it was given, not its upstream's
            third = await sdk.responses.create(model="fake-model", input="on", previous_response_id=second.id)
            assert third.previous_response_id == second.id and "resp_a_" not in third.model_dump_json()

            for forged in (first.id + "x", "resp_abc", "resp_a_1", first.id.replace("resp_", "resp_Zm9v", 1)):
                with pytest.raises(openai.BadRequestError) as refused:
                    await sdk.responses.create(model="fake-model", input="x", previous_response_id=forged)
                assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]
                assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
            with pytest.raises(openai.BadRequestError):  # another client cannot continue it
                await client(board.url, "tok-two-0002").responses.create(
                    model="fake-model", input="x", previous_response_id=first.id
                )
            a.fail(500)
            with pytest.raises(openai.APIStatusError) as failed:  # its provider's failure, never another's
                await sdk.responses.create(model="fake-model", input="x", previous_response_id=first.id)
            assert failed.value.status_code == 502 and not b.requests
            assert failed.value.body["attempts"] == [  # type: ignore[index]
                {"provider": "a", "status": 500, "reason": "HTTP 500"}
            ]
            with pytest.raises(openai.APIStatusError) as streamed:  # streamed alike, before its first byte
                async with sdk.responses.stream(model="fake-model", input="x", previous_response_id=first.id):
                    pass
            assert streamed.value.status_code == 502 and not b.requests


async def test_a_provider_that_answers_404_on_a_default_protocol_is_skipped_and_remembered(
    sops_project: SopsProject,
) -> None:
    async with upstreams({"name": "a", "missing": ("/v1/responses",)}, {"name": "b"}) as (a, b):
        write_provider(sops_project, "a", base_url=a.base_url)  # vllm: responses by default
        write_provider(sops_project, "b", base_url=b.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        async with running(sops_project) as board:
            sdk = client(board.url)
            first = await sdk.responses.create(model="fake-model", input="one")
            assert first.output_text == "b says: one"
            second = await sdk.responses.create(model="fake-model", input="two")
            assert second.output_text == "a says: two"  # translated to chat for `a` from now on
    assert [r.path for r in a.requests] == ["/v1/responses", "/v1/chat/completions"]


async def test_legacy_completions_go_only_where_they_are_spoken(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a"}, {"name": "claude", "protocol": "anthropic"}) as (a, claude):
        write_provider(sops_project, "a", base_url=a.base_url, models=["fake-model"])
        write_provider(
            sops_project,
            "claude",
            provider="anthropic",
            base_url=claude.url,
            api_key=CANARY,
            models=["claude-x"],
        )
        write_routing(sops_project, chat=["a", "claude"])
        async with running(sops_project) as board:
            sdk = client(board.url)
            done = await sdk.completions.create(model="fake-model", prompt="once upon", max_tokens=5)
            assert done.choices[0].text == "a says: once upon" and a.requests[-1].path == "/v1/completions"
            stream = await sdk.completions.create(model="fake-model", prompt="a time", stream=True)
            assert "".join([c.choices[0].text async for c in stream if c.choices]) == "a says: a time"
            assert a.requests[-1].json["stream_options"] == {"include_usage": True}  # counted, then dropped
            with pytest.raises(openai.NotFoundError) as missing:
                await sdk.completions.create(model="claude-x", prompt="x")
            assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert not claude.requests


async def test_legacy_completions_to_a_server_that_turns_out_not_to_speak_them_are_404_at_once(
    sops_project: SopsProject,
) -> None:
    """A 404 at `/v1/completions` from a server that speaks them only by default: it is skipped
    for that request as for the next, and when no candidate is left none serves the model over
    completions (404 `model_not_found`, as SDKs do not retry), never a 502; the attempt that
    found it out is counted and listed."""
    async with FakeUpstream(name="v", missing=("/v1/completions",)) as up:
        write_provider(sops_project, "v", base_url=up.base_url)  # vllm: completions by default
        write_routing(sops_project, chat="v")
        async with running(sops_project) as board:
            first = await board.post("/v1/completions", {"model": "fake-model", "prompt": "x"})
            error = (await first.json())["error"]
            assert (first.status, error["code"], first.headers["x-switchboard-attempts"]) == (
                404,
                "model_not_found",
                "1",
            )
            assert [a["provider"] for a in error["attempts"]] == ["v"]
            sdk = client(board.url)
            for _ in range(2):
                with pytest.raises(openai.NotFoundError) as missing:
                    await sdk.completions.create(model="fake-model", prompt="x")
                assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert [r.path for r in up.requests] == ["/v1/completions"]  # then remembered


async def test_a_completion_whose_only_speaker_is_skipped_now_is_503_not_404(
    sops_project: SopsProject,
) -> None:
    """The server tried turns out not to speak completions (404 at the path), and the one that
    does is skipped now (its circuit open): a candidate exists but none can take the request now,
    503 listing the attempt, as the next request, which tries nobody, says too."""
    async with upstreams({"name": "v", "missing": ("/v1/completions",)}, {"name": "w"}) as (v, w):
        write_provider(sops_project, "v", base_url=v.base_url)  # vllm: completions by default
        write_provider(sops_project, "w", base_url=w.base_url)
        write_routing(sops_project, chat={"primary": "w", "fallbacks": ["v"]})
        async with running(sops_project, circuit_failures=1) as board:
            w.fail(500, times=1)  # its circuit opens; v answers
            assert (await board.chat("hi")).headers["x-switchboard-provider"] == "v"
            first = await board.post("/v1/completions", {"model": "fake-model", "prompt": "x"})
            first_error = (await first.json())["error"]
            second = await board.post("/v1/completions", {"model": "fake-model", "prompt": "x"})
    assert (first.status, first_error["type"], first.headers["x-switchboard-attempts"]) == (
        503,
        "no_candidate",
        "1",
    )
    assert [a["provider"] for a in first_error["attempts"]] == ["v"]
    assert (second.status, second.headers["x-switchboard-attempts"]) == (503, "0")
    assert [r.path for r in v.requests] == ["/v1/chat/completions", "/v1/completions"]


async def test_a_response_is_continued_on_another_replica_at_once(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    """The id carries its provider (docs/reference.md §14): a second service on the same files
    continues it, for a provider with a key and for a server without one."""
    async with upstreams({"name": "a", "api_key": CANARY}, {"name": "s"}) as (a, s):
        write_provider(
            sops_project, "a", provider="openai", base_url=a.base_url, api_key=CANARY, models=["m1"]
        )
        write_provider(sops_project, "s", base_url=s.base_url, models=["m2"])
        write_routing(sops_project, chat=["a", "s"])
        other = {"events": tmp_path / "other.jsonl", "usage_spool": tmp_path / "other-spool"}
        async with running(sops_project) as one, running(sops_project, **other) as two:
            for model, up in (("m1", a), ("m2", s)):
                first = await client(one.url).responses.create(model=model, input="hello")
                second = await client(two.url).responses.create(
                    model=model, input="next", previous_response_id=first.id
                )
                assert second.output_text.endswith(f"(after: {up.name} says: hello)")


async def test_a_pinned_provider_removed_from_the_configuration_is_400_naming_it(
    sops_project: SopsProject,
) -> None:
    """Its file deleted, a response id of it can no longer be checked nor continued: 400 with
    `param`, naming the provider (it said "not the id of a response Switchboard gave this
    client", about an id Switchboard did give), and no other provider is asked."""
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        write_provider(sops_project, "a", provider="openai", base_url=a.base_url, api_key="sk-a")
        write_provider(sops_project, "b", base_url=b.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        async with running(sops_project) as board:
            sdk = client(board.url)
            first = await sdk.responses.create(model="fake-model", input="hi")
            write_routing(sops_project, chat="b")
            (sops_project.root / "providers.d" / "a.yaml").unlink()
            registry = board.app[REGISTRY]
            await eventually(lambda: "a" not in registry.snapshot.providers)
            asked = len(b.requests)
            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.responses.create(model="fake-model", input="x", previous_response_id=first.id)
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert "'a'" in refused.value.message and "not configured now" in refused.value.message
    assert len(b.requests) == asked


async def test_a_pinned_provider_that_cannot_be_tried_now_is_503_naming_it(sops_project: SopsProject) -> None:
    """Out of budget, circuit open, disabled: 503 naming the provider, and never another one."""
    pricing = {"*": {"input": 1_000_000, "output": 2_000_000}}  # 1 USD a token: a few use up 100
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        budget = {"usd": "100", "period": "day"}
        write_provider(
            sops_project, "a", provider="openai", base_url=a.base_url, api_key="sk-a", pricing=pricing
        )
        write_provider(sops_project, "b", base_url=b.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        async with running(sops_project, circuit_failures=1) as board:
            sdk = client(board.url)
            first = await sdk.responses.create(model="fake-model", input="hi", max_output_tokens=5)
            a.fail(500, times=1)
            with pytest.raises(openai.APIStatusError) as failed:
                await sdk.responses.create(model="fake-model", input="x", previous_response_id=first.id)
            assert failed.value.status_code == 502  # and now its circuit is open
            with pytest.raises(openai.APIStatusError) as open_circuit:
                await sdk.responses.create(model="fake-model", input="x", previous_response_id=first.id)
            write_provider(
                sops_project, "a", provider="openai", base_url=a.base_url, api_key="sk-a", enabled=False
            )
            write_routing(sops_project, chat="b")
            await board.wait_for_generation(2)
            with pytest.raises(openai.APIStatusError) as disabled:
                await sdk.responses.create(model="fake-model", input="x", previous_response_id=first.id)
    for refused, why in ((open_circuit, "circuit is open"), (disabled, "disabled")):
        assert (
            refused.value.status_code == 503
            and "'a'" in refused.value.message
            and why in refused.value.message
        )
    assert not b.requests

    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        write_provider(
            sops_project,
            "a",
            provider="openai",
            base_url=a.base_url,
            api_key="sk-a",
            pricing=pricing,
            budget=budget,
        )
        write_provider(sops_project, "b", base_url=b.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        async with running(sops_project) as board:
            sdk = client(board.url)
            first = await sdk.responses.create(model="fake-model", input="hi", max_output_tokens=5)
            with pytest.raises(openai.APIStatusError) as spent:  # its bound no longer fits the budget
                await sdk.responses.create(
                    model="fake-model", input="x", max_output_tokens=5, previous_response_id=first.id
                )
    assert spent.value.status_code == 503 and "a, which gave previous_response_id" in spent.value.message
    assert not b.requests

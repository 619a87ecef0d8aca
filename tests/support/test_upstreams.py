"""The stand-in vendors behave like the real ones, and misbehave when told to."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.support.upstreams import FakeUpstream, closed_port_url, embed, upstreams

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = "sk-test-upstream"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(name="alpha", api_key=KEY) as up:
        yield up


@pytest.fixture
async def anthropic() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(protocol="anthropic", name="claude-ish", api_key=KEY, models=("claude-x",)) as up:
        yield up


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        yield s


def _sdk(up: FakeUpstream, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=up.base_url, api_key=key, max_retries=0)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# -- OpenAI protocol -------------------------------------------------------------------------


async def test_chat_completion_names_the_upstream_and_records_what_arrived(upstream: FakeUpstream) -> None:
    async with _sdk(upstream) as client:
        reply = await client.chat.completions.create(
            model="renamed-model", messages=[{"role": "user", "content": "ping"}]
        )
    assert reply.choices[0].message.content == "alpha says: ping"
    assert reply.model == "renamed-model"
    assert reply.usage is not None and reply.usage.total_tokens == 4
    (seen,) = upstream.requests
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.json["model"] == "renamed-model"


async def test_stream_sends_deltas_then_usage_then_done(upstream: FakeUpstream) -> None:
    async with _sdk(upstream) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a b"}], stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "alpha says: a b"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


async def test_stream_ends_with_done_and_has_no_usage_unless_asked(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{upstream.base_url}/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = (await r.text()).strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e.removeprefix("data: ")) for e in events[:-1])


async def test_models_are_listed_with_and_without_v1(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    async with _sdk(upstream) as client:
        models = [m.id async for m in client.models.list()]
    async with session.get(f"{upstream.url}/models") as r:
        bare = await r.json()
    assert models == ["fake-model"] == [m["id"] for m in bare["data"]]


async def test_embeddings_are_deterministic_in_float_and_base64(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    async with _sdk(upstream) as client:  # the SDK asks for base64 and decodes it
        sdk = await client.embeddings.create(model="e", input=["x", "y"])
    body = {"model": "e", "input": "x", "dimensions": 4}
    async with session.post(f"{upstream.base_url}/embeddings", json=body) as r:
        floats = (await r.json())["data"][0]["embedding"]
    async with session.post(
        f"{upstream.base_url}/embeddings", json={**body, "encoding_format": "base64"}
    ) as r:
        packed = base64.b64decode((await r.json())["data"][0]["embedding"])
    assert sdk.data[0].embedding == pytest.approx(embed("x"))
    assert sdk.data[0].embedding != sdk.data[1].embedding
    assert floats == pytest.approx(embed("x", 4))
    assert list(struct.unpack("<4f", packed)) == pytest.approx(floats)


async def test_rerank_orders_by_relevance_and_honours_top_n(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    body = {
        "model": "r",
        "query": "red apple",
        "documents": ["blue sky", "red apple pie", "red car"],
        "top_n": 2,
    }
    async with session.post(f"{upstream.base_url}/rerank", json={**body, "return_documents": True}) as r:
        results = (await r.json())["results"]
    assert [x["index"] for x in results] == [1, 2]
    assert results[0]["relevance_score"] == 1.0
    assert results[0]["document"] == {"text": "red apple pie"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"model": "m", "messages": ["not an object"]}),
        ("/chat/completions", {"model": "m", "messages": [], "stream": True, "stream_options": 5}),
        ("/embeddings", {"model": "m", "input": "x", "dimensions": "eight"}),
        ("/rerank", {"query": "q", "documents": 3}),
    ],
)
async def test_a_body_of_the_wrong_shape_is_a_400_as_a_vendor_answers(
    upstream: FakeUpstream, session: aiohttp.ClientSession, path: str, body: dict[str, object]
) -> None:
    async with session.post(upstream.base_url + path, json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_wrong_key_is_refused_with_401(upstream: FakeUpstream) -> None:
    async with _sdk(upstream, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


# -- faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 429, 400, 408])
async def test_fail_answers_the_status_with_an_openai_error_body_then_recovers(
    upstream: FakeUpstream, session: aiohttp.ClientSession, status: int
) -> None:
    upstream.fail(status, times=1)
    async with session.post(f"{upstream.base_url}/chat/completions", json=CHAT) as r:
        assert r.status == status
        assert "injected failure" in (await r.json())["error"]["message"]
    async with session.post(f"{upstream.base_url}/chat/completions", json=CHAT) as r:
        assert r.status == 200


async def test_sdk_sees_an_injected_rate_limit(upstream: FakeUpstream) -> None:
    upstream.fail(429)
    async with _sdk(upstream) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


async def test_hang_sends_nothing_before_the_client_gives_up(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.hang(5)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await session.post(f"{upstream.base_url}/chat/completions", json=CHAT)


async def test_stall_sends_headers_then_no_body(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.stall(5)
    async with session.post(f"{upstream.base_url}/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status == 200
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await r.content.readany()


@pytest.mark.parametrize("stream", [True, False])
async def test_drop_closes_the_connection_midway(
    upstream: FakeUpstream, session: aiohttp.ClientSession, stream: bool
) -> None:
    upstream.drop_after(2)
    async with session.post(f"{upstream.base_url}/chat/completions", json={**CHAT, "stream": stream}) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_drop_after_two_chunks_delivers_those_two(upstream: FakeUpstream) -> None:
    upstream.drop_after(2)
    received = []
    async with _sdk(upstream) as client:
        stream = await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)  # type: ignore[arg-type]
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                received.append(chunk)
    assert len(received) == 2


async def test_refused_connections_come_back_on_the_same_port(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    url = f"{upstream.base_url}/models"
    async with session.get(url) as r:  # leaves a keep-alive connection in the pool
        assert r.status == 200
    await upstream.refuse_connections()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(url):
            pass
    with pytest.raises(aiohttp.ClientConnectorError):
        async with session.get(url):
            pass
    await upstream.accept_connections()
    async with session.get(url) as r:
        assert r.status == 200


async def test_closed_port_url_refuses(session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.ClientConnectorError):
        await session.get(f"{closed_port_url()}/models")


async def test_latency_delays_every_answer(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.latency_s = 0.2
    start = time.perf_counter()
    async with session.get(f"{upstream.base_url}/models") as r:
        assert r.status == 200
    assert time.perf_counter() - start >= 0.2


async def test_control_endpoint_sets_faults_and_lists_requests(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{upstream.url}/_control", json={"fault": "status", "status": 503, "times": 1}):
        pass
    async with session.post(f"{upstream.base_url}/chat/completions", json=CHAT) as r:
        assert r.status == 503
    async with session.post(f"{upstream.url}/_control", json={"fault": "bogus-field", "nope": 1}) as r:
        assert r.status == 400
    async with session.get(f"{upstream.url}/_requests") as r:
        assert [x["path"] for x in await r.json()] == ["/v1/chat/completions"]


async def test_several_upstreams_tell_apart(session: aiohttp.ClientSession) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        for up in (a, b):
            async with session.post(f"{up.base_url}/chat/completions", json=CHAT) as r:
                assert r.headers["x-upstream-name"] == up.name
                assert (await r.json())["choices"][0]["message"]["content"] == f"{up.name} says: hi"


# -- Anthropic protocol ----------------------------------------------------------------------


def _anthropic_headers(key: str = KEY) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01"}


async def test_anthropic_message(anthropic: FakeUpstream) -> None:
    body = {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{anthropic.url}/v1/messages", json=body, headers=_anthropic_headers()) as r,
    ):
        message = await r.json()
    assert message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": "claude-ish says: hi"}]
    assert message["usage"] == {"input_tokens": 1, "output_tokens": 3}


async def test_anthropic_stream_follows_the_real_event_sequence(anthropic: FakeUpstream) -> None:
    body = {
        "model": "claude-x",
        "max_tokens": 16,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{anthropic.url}/v1/messages", json=body, headers=_anthropic_headers()) as r,
    ):
        raw = await r.text()
    events = [block.split("\n") for block in raw.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert names == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    data = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert (
        "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta")
        == "claude-ish says: hi"
    )
    assert data[-2]["usage"] == {"output_tokens": 3}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"x-api-key": KEY}, 400),
        (_anthropic_headers("sk-wrong"), 401),
        ({"anthropic-version": "2023-06-01"}, 401),
    ],
)
async def test_anthropic_checks_version_and_key(
    anthropic: FakeUpstream, headers: dict[str, str], status: int
) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{anthropic.url}/v1/models", headers=headers) as r:
        assert r.status == status
        assert (await r.json())["type"] == "error"


async def test_anthropic_models(anthropic: FakeUpstream) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{anthropic.url}/v1/models", headers=_anthropic_headers()) as r,
    ):
        page = await r.json()
    assert [m["id"] for m in page["data"]] == ["claude-x"]
    assert page["has_more"] is False


# -- standalone ------------------------------------------------------------------------------


async def test_answers_carry_a_request_id_and_rate_limits(
    upstream: FakeUpstream, anthropic: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{upstream.base_url}/chat/completions", json=CHAT) as r:
        first = r.headers
    upstream.fail(429, times=1)
    async with session.post(f"{upstream.base_url}/chat/completions", json=CHAT) as r:
        limited = r.headers
    async with session.get(f"{anthropic.base_url}/models", headers=_anthropic_headers()) as r:
        claude = r.headers
    assert first["x-request-id"] == "req-alpha-1" and first["x-ratelimit-remaining-requests"] == "999"
    assert limited["retry-after"] == "7" and limited["x-request-id"] == "req-alpha-2"
    assert claude["request-id"] == "req_claude-ish_1" and "anthropic-ratelimit-requests-remaining" in claude


# -- TEI ---------------------------------------------------------------------------------------


async def test_tei_reranks_in_its_own_shape(session: aiohttp.ClientSession) -> None:
    async with FakeUpstream(protocol="tei", name="tei", api_key=KEY, models=("bge-reranker",)) as tei:
        body = {"query": "red apple", "texts": ["blue sky", "red apple pie", "red car"]}
        async with session.post(f"{tei.url}/rerank", json=body) as r:
            ranked = await r.json()
        async with session.post(f"{tei.url}/rerank", json={**body, "return_text": True}) as r:
            with_text = await r.json()
        async with session.post(f"{tei.url}/rerank", json={"query": "x"}) as r:
            invalid = (r.status, await r.json())
        async with session.post(f"{tei.base_url}/rerank", json=body) as r:
            no_v1_twin = r.status
        async with session.get(f"{tei.url}/info") as r:
            info = await r.json()
        async with session.post(f"{tei.url}/embed", json={"inputs": ["a", "b"]}) as r:
            vectors = await r.json()
        async with session.post(f"{tei.base_url}/embeddings", json={"model": "e", "input": "a"}) as r:
            openai_style = await r.json()
    assert [x["index"] for x in ranked] == [1, 2, 0] and ranked[0] == {"index": 1, "score": 1.0}
    assert with_text[0]["text"] == "red apple pie"
    assert invalid[0] == 422 and invalid[1]["error_type"] == "validation"
    assert no_v1_twin == 404
    assert info["model_id"] == "bge-reranker"
    assert vectors == [embed("a"), embed("b")]
    assert openai_style["data"][0]["embedding"] == embed("a")


async def test_runs_as_a_standalone_process() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.upstreams", "--port", "0", "--name", "solo", "--api-key", KEY,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        url = line.decode().strip().removeprefix("listening on ")
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client:
            reply = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "yo"}]
            )
        assert reply.choices[0].message.content == "solo says: yo"
    finally:
        process.terminate()
        await process.wait()

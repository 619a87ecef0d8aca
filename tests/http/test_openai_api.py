"""The gateway end to end: a real Switchboard in front of local stand-in vendors."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
from typing import Any

import openai
import pytest
from aiohttp import web

from service.gateway.call import VIA_HEADER
from service.gateway.transports import base as transports_base
from service.http.context import HEALTH, RELAY
from tests.conftest import SopsProject, eventually
from tests.support.gateway import (
    CANARY,
    running,
    write_clients,
    write_provider,
    write_routing,
)
from tests.support.upstreams import FakeUpstream, closed_port_url, serving, unanswered_url, upstreams

JSON = {"Content-Type": "application/json"}
"""Without authentication a POST must say it is JSON (docs/reference.md §6), as every client library does."""
PROVIDER = "x-switchboard-provider"
ATTEMPTS = "x-switchboard-attempts"


async def test_a_completion_is_relayed_with_the_providers_key(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a", api_key=CANARY) as up:
        write_provider(sops_project, "a", provider="openai", base_url=up.base_url, api_key=CANARY)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            response = await board.chat("hello there")
            assert response.status == 200, await response.text()
            body = await response.json()
    assert body["choices"][0]["message"]["content"] == "a says: hello there"
    assert (response.headers[PROVIDER], response.headers[ATTEMPTS]) == ("a", "1")
    assert up.requests[-1].headers["authorization"] == f"Bearer {CANARY}"
    assert up.requests[-1].json["messages"] == [{"role": "user", "content": "hello there"}]


async def test_the_body_goes_out_as_sent_unless_the_model_is_renamed(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        write_provider(sops_project, "a", base_url=a.base_url)
        write_provider(
            sops_project, "b", base_url=b.base_url, model_map={"alias": "real-model"}, purposes=["embeddings"]
        )
        write_routing(sops_project, chat="a", embeddings="b")
        async with running(sops_project) as board:
            raw = b'{"model":  "fake-model", "messages": [{"role": "user", "content": "x"}], "extra": 1}'
            async with board.http.post(
                f"{board.base_url}/chat/completions", data=raw, headers=JSON
            ) as response:
                assert response.status == 200
            response = await board.post("/v1/embeddings", {"model": "alias", "input": "text"})
            assert response.status == 200
    assert a.requests[-1].json == json.loads(raw)  # every field kept, unknown ones too
    assert b.requests[-1].json == {"model": "real-model", "input": "text"}


async def test_the_request_never_chooses_where_it_goes_on_the_direct_path(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a", "api_key": CANARY}, {"name": "attacker"}) as (a, attacker):
        write_provider(sops_project, "a", provider="openai", base_url=a.base_url, api_key=CANARY)
        write_routing(sops_project, chat="a")
        hostile = {
            "base_url": attacker.base_url,
            "api_base": attacker.base_url,
            "api_key": "sk-attacker-chosen",
            "extra_headers": {"Authorization": "Bearer sk-attacker-chosen"},
            "custom_llm_provider": "openai",
            "api_version": "2099-01-01",
            "extra_body": {"base_url": attacker.base_url},
        }
        client_headers = {"X-Api-Key": "sk-attacker-chosen", "X-Stolen": "1", "X-Forwarded-Host": "evil"}
        async with running(sops_project) as board:
            payload = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], **hostile}
            url = f"{board.base_url}/chat/completions"
            async with board.http.post(url, json=payload, headers=client_headers) as response:
                assert response.status == 200, await response.text()
    assert not attacker.requests
    received = a.requests[-1]
    assert received.json == payload  # the body passes unchanged: the server's business
    assert received.headers["authorization"] == f"Bearer {CANARY}"
    assert not {"x-api-key", "x-stolen", "x-forwarded-host"} & set(received.headers)


FAULTS = {
    "connection refused": None,
    "500": ("fail", 500),
    "503": ("fail", 503),
    "429": ("fail", 429),
    "408": ("fail", 408),
    "hang before the headers": ("hang", 5),
    "stall after the headers": ("stall", 5),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_failing_primary_falls_back(sops_project: SopsProject, fault: str, stream: bool) -> None:
    async with upstreams({"name": "primary"}, {"name": "backup"}) as (primary, backup):
        spec = FAULTS[fault]
        url = closed_port_url() if spec is None else primary.base_url
        if spec is not None:
            getattr(primary, spec[0])(spec[1])
        # A plain answer has `timeout_s` for all of it; a stream `first_byte_timeout_s` to start.
        write_provider(sops_project, "primary", base_url=url, first_byte_timeout_s=0.3, timeout_s=0.3)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "primary", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            response = await board.chat("ping", stream=stream)
            text = await response.text()
    assert response.status == 200, text
    assert (response.headers[PROVIDER], response.headers[ATTEMPTS]) == ("backup", "2")
    assert "backup says: ping" in text or "backup" in text
    assert len(backup.requests) == 1


@pytest.mark.parametrize("backup_fails", [429, 500], ids=["both-wait", "one-does-not-say"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_when_every_candidate_says_wait_the_502_says_how_long(
    sops_project: SopsProject, stream: bool, backup_fails: int
) -> None:
    """docs/reference.md §7: the upstream's `retry-after` is passed back to the client. When every
    candidate answered with one (a 429), the 502 carries the shortest: a client (the SDKs retry a
    502) waits as long as the first of them asked, instead of coming back at once. When one of
    them did not say, nothing is promised."""
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        a.fail(429)  # with `retry-after: 7`
        b.fail(backup_fails)
        write_provider(sops_project, "a", base_url=a.base_url)
        write_provider(sops_project, "b", base_url=b.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        async with running(sops_project) as board:
            answer = await board.chat("ping", stream=stream)
    assert answer.status == 502, await answer.text()
    if backup_fails == 429:
        assert (answer.headers["Retry-After"], answer.headers["retry-after-ms"]) == ("7", "7000")
    else:
        assert "Retry-After" not in answer.headers and "retry-after-ms" not in answer.headers


@pytest.mark.parametrize(
    "value", ["\u00b2", "1 Jan 2015 07:28:00 +99999999999999"], ids=["superscript", "huge-zone"]
)
@pytest.mark.parametrize("status", [200, 429])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_retry_after_that_says_no_time_it_can_read_is_none(
    sops_project: SopsProject, stream: bool, status: int, value: str
) -> None:
    """A hostile upstream's `Retry-After: \u00b2` (a digit to str.isdigit, none to int), or an
    HTTP date whose zone overflows, on a 429 or on an answer is no time said: the 429 falls
    back and the 502 carries no Retry-After, the answer is relayed without it; neither is a 500."""

    async def hostile(request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = {"error": {"message": "slow down"}}
        if status == 200:  # a whole answer, even to a stream request
            message = {"role": "assistant", "content": "pong"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            body = {"id": "c1", "object": "chat.completion", "model": "m", "choices": [choice]}
        return web.json_response(body, status=status, headers={"Retry-After": value})

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", hostile)
    async with serving(upstream) as url:
        write_provider(sops_project, "hostile", base_url=f"{url}/v1")
        write_routing(sops_project, chat={"primary": "hostile"})
        async with running(sops_project) as board:
            answer = await board.chat("ping", stream=stream)
            text = await answer.text()
    assert answer.status == (502 if status == 429 else 200), text
    assert "Retry-After" not in answer.headers and "retry-after-ms" not in answer.headers


@pytest.mark.parametrize(
    "field", ["connect_timeout_s", "timeout_s", "first_byte_timeout_s", "idle_timeout_s"]
)
async def test_an_infinite_timeout_is_refused_not_a_500(sops_project: SopsProject, field: str) -> None:
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "endless", base_url=a.base_url, **{field: float("inf")})
        write_routing(sops_project, chat="endless")
        async with running(sops_project) as board:
            refused = (await (await board.get("/readyz")).json())["refused"]
            answers = [await board.chat(stream=s) for s in (False, True)]
    reasons = {r["file"]: r["reason"] for r in refused}
    assert "finite" in reasons["providers.d/endless.yaml"]
    assert 500 not in [r.status for r in answers]


async def test_a_plain_answer_slower_than_the_first_byte_timeout_is_not_cut(
    sops_project: SopsProject,
) -> None:
    async with upstreams({"name": "slow", "latency_s": 0.5}, {"name": "backup"}) as (slow, backup):
        write_provider(sops_project, "slow", base_url=slow.base_url, first_byte_timeout_s=0.1)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "slow", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            response = await board.chat("take your time")
            body = await response.json()
    assert response.status == 200, body
    assert (response.headers[PROVIDER], response.headers[ATTEMPTS]) == ("slow", "1")
    assert body["choices"][0]["message"]["content"] == "slow says: take your time"
    assert len(slow.requests) == 1 and not backup.requests  # asked once, paid once


async def test_a_stream_longer_than_timeout_s_is_not_cut(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a", "chunk_interval_s": 0.08}, {"name": "backup"}) as (a, backup):
        write_provider(sops_project, "a", base_url=a.base_url, timeout_s=0.2, idle_timeout_s=5)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
            stream = await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "one two three four five"}],
                stream=True,
            )
            started = asyncio.get_running_loop().time()
            parts = [c.delta.content or "" async for chunk in stream for c in chunk.choices]
            took = asyncio.get_running_loop().time() - started
            await client.close()
            metrics = await board.metrics()
    assert "".join(parts) == "a says: one two three four five"
    assert took > 0.4  # twice `timeout_s`: a stream has no total limit
    assert not backup.requests
    assert 'outcome="broken"' not in metrics


async def test_a_stream_that_falls_silent_ends_with_an_error_event(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a", "chunk_interval_s": 0.5}, {"name": "backup"}) as (a, backup):
        write_provider(sops_project, "a", base_url=a.base_url, idle_timeout_s=0.1)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
            stream = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], stream=True
            )
            parts = []
            with pytest.raises(openai.APIError, match=r"no chunk within 0\.1 s"):
                async for chunk in stream:
                    parts += [c.delta.content or "" for c in chunk.choices]
            await client.close()
            metrics = await board.metrics()
    assert parts == [""]  # the role chunk came, then silence
    assert not backup.requests
    assert 'switchboard_upstream_requests_total{outcome="broken",provider="a"} 1.0' in metrics


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_connect_timeout_falls_back(sops_project: SopsProject, stream: bool) -> None:
    async with upstreams({"name": "backup"}) as (backup,):
        with unanswered_url() as url:
            write_provider(
                sops_project,
                "unanswered",
                base_url=url,
                connect_timeout_s=0.2,
                first_byte_timeout_s=30,
                timeout_s=30,
            )
            write_provider(sops_project, "backup", base_url=backup.base_url)
            write_routing(sops_project, chat={"primary": "unanswered", "fallbacks": ["backup"]})
            async with running(sops_project) as board:
                started = asyncio.get_running_loop().time()
                served = await board.chat(stream=stream)
                backup.fail(500)
                failed = await board.chat(stream=stream)
                took = asyncio.get_running_loop().time() - started
                error = (await failed.json())["error"]
    assert (served.status, served.headers[PROVIDER], served.headers[ATTEMPTS]) == (200, "backup", "2")
    assert failed.status == 502
    assert error["attempts"][0] == {
        "provider": "unanswered",
        "status": None,
        "reason": "no connection within 0.2 s",
    }
    assert took < 5


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_a_client_error_is_returned_as_it_is(sops_project: SopsProject, status: int) -> None:
    async with upstreams({"name": "primary"}, {"name": "backup"}) as (primary, backup):
        primary.fail(status)
        write_provider(sops_project, "primary", base_url=primary.base_url)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "primary", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            response = await board.chat()
            body = await response.json()
    assert response.status == status
    assert body["error"]["message"] == f"injected failure {status} from primary"
    assert (response.headers[PROVIDER], response.headers[ATTEMPTS]) == ("primary", "1")
    assert not backup.requests


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_falls_back_and_opens_the_circuit(
    sops_project: SopsProject, status: int, stream: bool
) -> None:
    async with upstreams({"name": "primary"}, {"name": "backup"}) as (primary, backup):
        primary.fail(status)
        write_provider(sops_project, "primary", base_url=primary.base_url)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "primary", "fallbacks": ["backup"]})
        async with running(sops_project, circuit_failures=3) as board:
            served = await board.chat(stream=stream)
            skipped = await board.chat(stream=stream)
            backup.fail(500)
            failed = await board.chat(stream=stream)
            error = (await failed.json())["error"]
            await board.recorded()
            changes = board.events("provider.health_changed")
    assert (served.status, served.headers[PROVIDER], served.headers[ATTEMPTS]) == (200, "backup", "2")
    assert skipped.headers[ATTEMPTS] == "1" and len(primary.requests) == 1
    assert failed.status == 502 and [a["provider"] for a in error["attempts"]] == ["backup"]
    reason = f"HTTP {status}: the upstream refused the provider's key"
    assert [(e["subject"], e["changes"]["status"]["new"], e["reason"]) for e in changes] == [
        ("primary", "unhealthy", reason)
    ]


async def test_a_key_pasted_with_a_newline_works_and_one_that_is_no_header_is_refused(
    sops_project: SopsProject,
) -> None:
    """A line break around a key is a paste; one inside it could never be sent (or would smuggle a
    header): that file is refused with its reason, where /readyz and the event log show it."""
    async with upstreams({"name": "a", "api_key": CANARY}, {"name": "backup"}) as (a, backup):
        write_provider(sops_project, "pasted", provider="openai", base_url=a.base_url, api_key=CANARY + "\n")
        broken_key = "sk-a\r\nX-Evil: 1"
        write_provider(
            sops_project,
            "broken",
            provider="openai",
            base_url=a.base_url,
            api_key=broken_key,
            purposes=["embeddings"],
        )
        write_provider(sops_project, "backup", base_url=backup.base_url, purposes=["embeddings"])
        write_routing(sops_project, chat={"primary": "pasted"}, embeddings={"primary": "backup"})
        async with running(sops_project) as board:
            pasted = [await board.chat(stream=s) for s in (False, True)]
            embedded = await board.post("/v1/embeddings", {"model": "e", "input": "x"})
            ready = await (await board.get("/readyz")).json()
            check = await (await board.post("/api/v1/llm-config/providers/pasted/test", {})).json()
            rejected = board.events("config.rejected")
    assert [r.status for r in pasted] == [200, 200]
    assert {r.headers["authorization"] for r in a.requests} == {f"Bearer {CANARY}"}
    assert (embedded.status, embedded.headers[PROVIDER]) == (200, "backup")
    assert check["ok"] is True
    (refused,) = [r for r in ready["refused"] if r["file"] == "providers.d/broken.yaml"]
    assert "control character" in refused["reason"]
    assert [e["file"] for e in rejected] == ["providers.d/broken.yaml"]
    assert broken_key not in json.dumps(ready) + json.dumps(rejected)
    assert not [r for r in a.requests if "x-evil" in r.headers]


async def test_every_candidate_failing_is_a_502_listing_each_attempt(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a", "api_key": CANARY}, {"name": "b"}) as (a, b):
        a.fail(500)
        b.fail(429)
        write_provider(sops_project, "a", provider="openai", base_url=a.base_url, api_key=CANARY)
        write_provider(sops_project, "b", base_url=b.base_url)
        dead = closed_port_url()
        write_provider(sops_project, "c", base_url=dead)
        write_routing(sops_project, chat={"primary": ["a"], "fallbacks": ["b", "c"]})
        async with running(sops_project) as board:
            response = await board.chat()
            text = await response.text()
    assert response.status == 502
    assert response.headers[ATTEMPTS] == "3"
    error = json.loads(text)["error"]
    assert error["type"] == "upstreams_failed"
    assert [(x["provider"], x["status"]) for x in error["attempts"]] == [("a", 500), ("b", 429), ("c", None)]
    assert error["attempts"][2]["reason"].startswith("cannot connect")
    assert CANARY not in text


async def test_a_model_no_provider_serves_is_404_model_not_found_and_the_sdk_asks_once(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as a:
        write_provider(
            sops_project, "a", base_url=a.base_url, models=["only-this"], purposes=["chat", "embeddings"]
        )
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            # The SDK's own retries are on (2, for a 5xx), as a new user has them.
            async with openai.AsyncOpenAI(base_url=board.base_url, api_key="unused") as client:
                with pytest.raises(openai.NotFoundError) as caught:
                    await client.chat.completions.create(
                        model="another-model", messages=[{"role": "user", "content": "hi"}]
                    )
            asked = await board.metrics()
            excluded = await board.chat(model="another-model")
            unrouted = await board.post("/v1/embeddings", {"model": "only-this", "input": "x"})
            served = await board.chat(model="only-this")
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    route = 'route="/v1/chat/completions"'
    counted = [line for line in asked.splitlines() if "http_requests_total{" in line and route in line]
    assert counted == [
        f'switchboard_http_requests_total{{method="POST",{route},status="404"}} 1.0'
    ]  # one request: the SDK does not retry a 404 as it retries a 503
    assert excluded.status == unrouted.status == 404
    for answer in (excluded, unrouted):
        error = (await answer.json())["error"]
        assert error["type"] == error["code"] == "model_not_found"
    assert "another-model" in (await excluded.json())["error"]["message"]
    assert (excluded.headers[PROVIDER], excluded.headers[ATTEMPTS]) == ("none", "0")
    assert served.status == 200
    assert [r.json["model"] for r in a.requests] == ["only-this"]


async def test_a_model_whose_providers_are_all_skipped_now_is_503_no_candidate(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url, models=["m"])
        write_provider(sops_project, "off", base_url=a.base_url, models=["m-off"], enabled=False)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": []})
        async with running(sops_project, circuit_failures=1) as board:
            a.fail(500)
            failed = await board.chat(model="m")
            skipped = await board.chat(model="m")  # its circuit is open: served, but not now
            disabled = await board.chat(model="m-off")  # only a disabled provider names it
    assert failed.status == 502
    assert skipped.status == 503
    assert (await skipped.json())["error"]["type"] == "no_candidate"
    assert (skipped.headers[PROVIDER], skipped.headers[ATTEMPTS]) == ("none", "0")
    assert disabled.status == 404


async def test_a_disabled_provider_is_skipped(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        write_provider(sops_project, "a", base_url=a.base_url)
        write_provider(sops_project, "b", base_url=b.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        async with running(sops_project) as board:
            generation = (await (await board.get("/readyz")).json())["generation"]
            write_routing(sops_project, chat={"primary": "b"})
            write_provider(sops_project, "a", base_url=a.base_url, enabled=False)
            await board.wait_for_generation(generation + 1)
            response = await board.chat()
    assert response.headers[PROVIDER] == "b"
    assert not a.requests


async def test_malformed_and_oversized_bodies_are_refused(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project, max_body_bytes=2048) as board:
            url = f"{board.base_url}/chat/completions"
            async with board.http.post(url, data=b"{not json", headers=JSON) as malformed:
                assert malformed.status == 400
            async with board.http.post(url, data=b"[1, 2]", headers=JSON) as not_an_object:
                assert not_an_object.status == 400
            big = await board.chat("x" * 4096)

            async def chunks() -> Any:
                yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
                yield b"y" * 4096
                yield b'"}]}'

            async with board.http.post(url, data=chunks(), headers=JSON) as chunked:
                chunked_body = await chunked.json()
    assert big.status == 413
    assert (await big.json())["error"]["type"] == "payload_too_large"
    assert (big.headers[PROVIDER], big.headers[ATTEMPTS]) == ("none", "0")
    assert chunked.status == 413, chunked_body
    assert not a.requests


async def test_a_body_is_read_whole_however_it_arrives(sops_project: SopsProject) -> None:
    """With its head or after it, gzipped or not: the upstream gets the body as the client meant
    it, and one that inflates past the limit is 413 (the body is taken at once when it came whole
    with the head, read as it comes otherwise)."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "z" * 1000}]}
    raw = json.dumps(body).encode()
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project, max_body_bytes=2048) as board:
            host, port = board.base_url.removeprefix("http://").split("/")[0].split(":")
            statuses = []
            for encoding, data, pause in [
                (None, raw, False),
                (None, raw, True),  # the body comes after the handler started
                ("gzip", gzip.compress(raw), False),
                ("gzip", gzip.compress(raw), True),
                ("gzip", gzip.compress(raw.replace(b"z" * 1000, b"z" * 5000)), False),  # 5 KB inflated
            ]:
                head = (
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n"
                    + (f"Content-Encoding: {encoding}\r\n" if encoding else "")
                    + "\r\n"
                ).encode()
                reader, writer = await asyncio.open_connection(host, int(port))
                if pause:
                    writer.write(head + data[:10])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(data[10:])
                else:
                    writer.write(head + data)
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                statuses.append(int(answer.split(b" ", 2)[1]))
    assert statuses == [200, 200, 200, 200, 413]
    assert [r.json for r in a.requests] == [body] * 4


async def test_every_kind_of_gateway_answer_forbids_sniffing(sops_project: SopsProject) -> None:
    """`X-Content-Type-Options: nosniff` on a whole answer, a relayed stream (prepared where it is
    relayed), one cut short, an upstream's error relayed, the gateway's own errors, and
    `/v1/models`: each taken before the router (`gateway.Gateway`)."""
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            answers = {"whole": await board.chat(), "stream": await board.chat(stream=True)}
            up.drop_after(2, times=1)
            answers["stream cut short"] = await board.chat(stream=True)
            up.fail(400, times=1)
            answers["upstream's 400"] = await board.chat()
            up.fail(500)
            answers["502"] = await board.chat()
            answers["404"] = await board.post("/v1/embeddings", {"model": "m", "input": "x"})
            answers["models"] = await board.get("/v1/models")
    assert answers["stream"].headers["Content-Type"].startswith("text/event-stream")
    assert [answers[k].status for k in ("whole", "upstream's 400", "502", "404")] == [200, 400, 502, 404]
    for kind, response in answers.items():
        assert response.headers.getall("X-Content-Type-Options") == ["nosniff"], kind


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/rerank"])
async def test_a_body_nested_too_deep_is_a_400(sops_project: SopsProject, path: str) -> None:
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url, purposes=["chat", "embeddings", "reranking"])
        write_routing(sops_project, chat="a", embeddings="a", reranking="a")
        async with running(sops_project) as board:
            answers = []
            for raw in (
                NESTED,
                '{"model": "m", "messages": ' + NESTED + "}",
                '{"a":' * 100_000 + "1" + "}" * 100_000,
            ):
                async with board.http.post(board.url + path, data=raw.encode(), headers=JSON) as response:
                    answers.append((response.status, await response.json()))
    for status, body in answers:
        assert status == 400, body
        assert body["error"] == {"type": "bad_request", "message": "the body is JSON nested too deep"}
    assert not a.requests


async def test_a_body_nested_near_the_limit_with_a_model_map_is_not_a_500(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url, model_map={"alias": "real"})
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            statuses = set()
            for depth in range(850, 1000, 5):
                raw = '{"model": "alias", "messages": [], "x": ' + "[" * depth + "]" * depth + "}"
                async with board.http.post(
                    f"{board.base_url}/chat/completions", data=raw.encode(), headers=JSON
                ) as response:
                    statuses.add(response.status)
    assert statuses <= {200, 400}, statuses


async def test_a_lone_surrogate_in_a_body_that_is_re_encoded_is_not_a_500(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a"}, {"protocol": "tei", "name": "tei"}) as (a, tei):
        write_provider(sops_project, "a", base_url=a.base_url, model_map={"alias": "real"})
        write_provider(sops_project, "tei", base_url=tei.base_url, server_type="tei", purposes=["reranking"])
        write_routing(sops_project, chat="a", reranking="tei")
        async with running(sops_project) as board:
            url = board.base_url
            raw = b'{"model": "alias", "messages": [{"role": "user", "content": "\\ud800"}]'
            statuses = []
            for extra in (b"}", b', "stream": true}'):  # renamed; asked for its usage
                async with board.http.post(
                    f"{url}/chat/completions", data=raw + extra, headers=JSON
                ) as response:
                    statuses.append(response.status)
            rerank = (
                b'{"model": "r", "query": "\\ud800", "documents": ["\\udfff x"], "return_documents": true}'
            )
            async with board.http.post(f"{url}/rerank", data=rerank, headers=JSON) as response:
                statuses.append(response.status)
    assert statuses == [200, 200, 200]
    assert a.requests[0].json["messages"][0]["content"] == "\ud800"


async def test_an_answer_over_the_upstream_limit_falls_back(sops_project: SopsProject) -> None:
    async with upstreams({"name": "big", "padding": 5000}, {"name": "backup"}) as (big, backup):
        write_provider(sops_project, "big", base_url=big.base_url)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "big", "fallbacks": ["backup"]})
        async with running(sops_project, max_upstream_bytes=4096) as board:
            served = await board.chat()
            backup.padding = 5000
            failed = await board.chat()
            error = (await failed.json())["error"]
    assert (served.status, served.headers[PROVIDER]) == (200, "backup")
    assert failed.status == 502
    assert [(x["provider"], x["reason"]) for x in error["attempts"]] == [
        ("big", "answer over 4096 bytes"),
        ("backup", "answer over 4096 bytes"),
    ]


async def test_a_stream_request_answered_whole_is_read_within_the_limit(sops_project: SopsProject) -> None:
    async def whole(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})  # chunked, no length
        await response.prepare(request)
        for _ in range(10):
            await response.write(b" " * 1000)
        await response.write(b'{"choices": []}')
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", whole)
    async with serving(upstream) as url, FakeUpstream(name="backup") as backup:
        write_provider(sops_project, "whole", base_url=f"{url}/v1")
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "whole", "fallbacks": ["backup"]})
        async with running(sops_project, max_upstream_bytes=4096) as board:
            response = await board.chat(stream=True)
    assert (response.status, response.headers[PROVIDER], response.headers[ATTEMPTS]) == (200, "backup", "2")


@pytest.mark.parametrize("media", ["text/event-stream", "Text/Event-Stream; charset=utf-8"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_empty_stream_falls_back_as_one_that_never_started(
    sops_project: SopsProject, framing: str, media: str
) -> None:
    """A 200 event stream that ends before its first byte sent the client nothing yet: it falls
    back as a stream with no first byte does (and as one through litellm does), instead of
    relaying an empty 200 that no client can read as an answer. A media type's name is not
    case-sensitive (RFC 9110 §8.3.1): `Text/Event-Stream` is an event stream too."""

    async def empty(request: web.Request) -> web.StreamResponse:
        if framing == "length":
            return web.Response(body=b"", headers={"Content-Type": media})
        response = web.StreamResponse(headers={"Content-Type": media})
        await response.prepare(request)
        await response.write_eof()
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", empty)
    async with serving(upstream) as url, FakeUpstream(name="backup") as backup:
        write_provider(sops_project, "empty", base_url=f"{url}/v1")
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "empty", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            response = await board.chat("ping", stream=True)
            text = await response.text()
            metrics = await board.metrics()
    assert (response.status, response.headers[PROVIDER], response.headers[ATTEMPTS]) == (200, "backup", "2")
    assert "backup says: ping" in text or "backup" in text
    assert 'switchboard_upstream_requests_total{outcome="failed",provider="empty"} 1.0' in metrics


async def test_a_stream_in_capitals_is_relayed_as_it_comes(sops_project: SopsProject) -> None:
    """`Text/Event-Stream` is an event stream: relayed chunk by chunk, each within
    `idle_timeout_s`, not read whole within it (which cut a stream longer than it short)."""

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "Text/Event-Stream"})
        await response.prepare(request)
        for n in range(5):
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": f"part{n} "}, "finish_reason": None}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.1)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", slow)
    async with serving(upstream) as url:
        write_provider(sops_project, "slow", base_url=f"{url}/v1", idle_timeout_s=0.3)
        write_routing(sops_project, chat={"primary": "slow"})
        async with running(sops_project) as board:
            response = await board.chat("ping", stream=True)
            text = await response.text()
    assert response.status == 200, text
    assert all(f"part{n}" in text for n in range(5)) and "[DONE]" in text


async def test_a_compressed_answer_is_bounded_once_inflated(sops_project: SopsProject) -> None:
    """A gzip answer's `Content-Length` is its compressed size: 10 KB that inflate to 10 MB
    must fail like any answer over the limit, not be read whole because its length is small."""
    inflated = b'{"choices": [], "pad": "' + b" " * 10_000_000 + b'"}'
    packed = gzip.compress(inflated)
    assert len(packed) < 4096 * 10

    async def bomb(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=packed, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", bomb)
    async with serving(upstream) as url, FakeUpstream(name="backup") as backup:
        write_provider(sops_project, "bomb", base_url=f"{url}/v1")
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "bomb", "fallbacks": ["backup"]})
        async with running(sops_project, max_upstream_bytes=1 << 20) as board:
            response = await board.chat()
    assert (response.status, response.headers[PROVIDER], response.headers[ATTEMPTS]) == (200, "backup", "2")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_usage_nested_too_deep_is_relayed_without_counting(
    sops_project: SopsProject, stream: bool
) -> None:
    deep = b'{"choices": [], "usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    async def answer(request: web.Request) -> web.StreamResponse:
        if not stream:
            return web.Response(body=deep, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + deep + b"\n\ndata: [DONE]\n\n")
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", answer)
    async with serving(upstream) as url:
        write_provider(sops_project, "deep", base_url=f"{url}/v1")
        write_routing(sops_project, chat="deep")
        async with running(sops_project) as board:
            payload = {"model": "m", "messages": [], "stream": stream}
            async with board.http.post(f"{board.base_url}/chat/completions", json=payload) as response:
                body = await response.read()
            metrics = await board.metrics()
    assert response.status == 200
    assert deep in body
    assert "switchboard_tokens_total{" not in metrics


async def test_the_openai_sdk_works_plain_and_streaming(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
            messages: Any = [{"role": "user", "content": "stream me"}]
            plain = await client.chat.completions.with_raw_response.create(
                model="fake-model", messages=messages
            )
            stream = await client.chat.completions.create(
                model="fake-model", messages=messages, stream=True, stream_options={"include_usage": True}
            )
            parts, usage = [], None
            async for chunk in stream:
                parts += [c.delta.content or "" for c in chunk.choices]
                usage = chunk.usage or usage
            await client.close()
            metrics = await board.metrics()
    assert plain.headers[PROVIDER] == "a"
    assert plain.parse().choices[0].message.content == "a says: stream me"
    assert "".join(parts) == "a says: stream me"
    assert usage is not None and usage.completion_tokens == 4
    # The provider declares no models: the model its answers name is the label.
    assert (
        'switchboard_tokens_total{client="anonymous",kind="completion",model="fake-model",provider="a"} 8.0'
        in metrics
    )


async def test_a_stream_cut_after_its_first_byte_ends_with_an_error_event(sops_project: SopsProject) -> None:
    async with upstreams({"name": "primary", "chunk_interval_s": 0.01}, {"name": "backup"}) as (
        primary,
        backup,
    ):
        primary.drop_after(3)
        write_provider(sops_project, "primary", base_url=primary.base_url)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "primary", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
            stream = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "a b c d e"}], stream=True
            )
            parts = []
            with pytest.raises(openai.APIError, match="stream cut short"):
                async for chunk in stream:
                    parts += [c.delta.content or "" for c in chunk.choices]
            await client.close()
            metrics = await board.metrics()
    assert "".join(parts) == "primary says:"  # the role chunk, then two words
    assert not backup.requests
    assert 'switchboard_upstream_requests_total{outcome="broken",provider="primary"} 1.0' in metrics


async def test_a_plain_answer_cut_short_falls_back(sops_project: SopsProject) -> None:
    async with upstreams({"name": "primary"}, {"name": "backup"}) as (primary, backup):
        primary.drop_after(1)
        write_provider(sops_project, "primary", base_url=primary.base_url)
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "primary", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            response = await board.chat()
    assert response.status == 200
    assert response.headers[PROVIDER] == "backup"


async def test_a_client_that_leaves_cancels_the_upstream_request(sops_project: SopsProject) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.json_response({})

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", slow)
    runner = web.AppRunner(upstream, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        write_provider(sops_project, "slow", base_url=url, first_byte_timeout_s=30)
        write_routing(sops_project, chat="slow")
        async with running(sops_project) as board:
            request = asyncio.create_task(board.chat())
            await asyncio.wait_for(started.wait(), 5)
            request.cancel()
            await asyncio.wait_for(cancelled.wait(), 5)
            assert board.app  # the service is still up
            assert (await board.get("/healthz")).status == 200
    finally:
        await runner.cleanup()


async def test_embeddings_and_rerank_end_to_end(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="infinity", models=("embedder", "reranker")) as up:
        write_provider(
            sops_project,
            "tei",
            base_url=up.base_url,
            server_type="infinity",  # its /v1/rerank speaks the Cohere shape: forwarded as it is
            purposes=["embeddings", "reranking"],
            models=["embedder", "reranker"],
        )
        write_routing(sops_project, embeddings="tei", reranking="tei")
        async with running(sops_project) as board:
            client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
            embedded = await client.embeddings.create(model="embedder", input=["one", "two"])
            await client.close()
            documents = ["the cat sat", "dogs bark", "a cat and a dog"]
            response = await board.post(
                "/v1/rerank", {"model": "reranker", "query": "cat", "documents": documents, "top_n": 2}
            )
            ranked = await response.json()
            metrics = await board.metrics()
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) > 0
    assert response.status == 200 and response.headers[PROVIDER] == "tei"
    assert [r["index"] for r in ranked["results"]] == [0, 2]
    assert 'model="embedder",provider="tei"' in metrics
    assert 'model="reranker",provider="tei"' in metrics


async def test_rerank_on_tei_speaks_its_own_protocol(sops_project: SopsProject) -> None:
    async with upstreams({"protocol": "tei", "name": "tei", "api_key": CANARY, "models": ("bge",)}) as (tei,):
        write_provider(
            sops_project,
            "tei",
            base_url=tei.base_url,
            server_type="tei",
            api_key=CANARY,
            purposes=["embeddings", "reranking"],
        )
        write_routing(sops_project, embeddings="tei", reranking="tei")
        async with running(sops_project) as board:
            documents: list[Any] = ["the cat sat", {"text": "dogs bark"}, "a cat and a dog"]
            request = {"model": "bge", "query": "cat", "documents": documents}
            ranked = await board.post("/v1/rerank", {**request, "top_n": 2, "return_documents": True})
            body = await ranked.json()
            everything = await (await board.post("/v1/rerank", request)).json()
            invalid = await board.post("/v1/rerank", {"model": "bge", "query": "cat", "documents": "no"})
            tei.fail(422, times=1)
            refused = await board.post("/v1/rerank", request)
            refused_body = await refused.json()
            embedded = await board.post("/v1/embeddings", {"model": "bge", "input": "cat"})
            check = await (await board.post("/api/v1/llm-config/providers/tei/test", {})).json()
    assert ranked.status == 200 and ranked.headers[PROVIDER] == "tei"
    assert body["model"] == "bge" and body["id"].startswith("rerank-")
    assert body["results"] == [
        {"index": 0, "relevance_score": 1.0, "document": {"text": "the cat sat"}},
        {"index": 2, "relevance_score": 1.0, "document": {"text": "a cat and a dog"}},
    ]
    assert [r["index"] for r in everything["results"]] == [0, 2, 1]
    assert "document" not in everything["results"][0]
    rerank = tei.requests[0]
    assert (rerank.path, rerank.json) == (
        "/rerank",
        {"query": "cat", "texts": ["the cat sat", "dogs bark", "a cat and a dog"]},
    )
    assert rerank.headers["authorization"] == f"Bearer {CANARY}"
    assert invalid.status == 400
    assert refused.status == 422 and refused_body["error"]["type"] == "validation"
    assert embedded.status == 200 and tei.requests[-2].path == "/v1/embeddings"
    assert check["ok"] is True and tei.requests[-1].path == "/info"


async def test_upstream_request_ids_and_rate_limits_are_passed_back(sops_project: SopsProject) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        headers = {
            "X-Request-Id": "req-123",
            "Retry-After": "3",
            "X-RateLimit-Remaining-Tokens": "9000",
            "x-ratelimit-reset-requests": "2s",
            "X-Internal-Secret": "not for clients",
            "Set-Cookie": "session=upstream",
        }
        if not (await request.json()).get("stream"):
            return web.json_response({"choices": []}, headers=headers)
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", answer)
    async with serving(upstream) as url, FakeUpstream(name="a") as a:
        write_provider(sops_project, "custom", base_url=f"{url}/v1")
        write_provider(sops_project, "a", base_url=a.base_url)
        write_routing(sops_project, chat="custom")
        async with running(sops_project) as board:
            answers = [await board.chat(stream=s) for s in (False, True)]
            generation = (await (await board.get("/readyz")).json())["generation"]
            write_routing(sops_project, chat="a")
            await board.wait_for_generation(generation + 1)
            a.fail(400, times=1)
            refused = await board.chat()
    for response in answers:
        assert response.status == 200
        assert response.headers["x-request-id"] == "req-123"
        assert response.headers["retry-after"] == "3" and response.headers["retry-after-ms"] == "3000"
        assert response.headers["x-ratelimit-remaining-tokens"] == "9000"
        assert response.headers["x-ratelimit-reset-requests"] == "2s"
        assert "x-internal-secret" not in response.headers and "set-cookie" not in response.headers
    assert refused.status == 400 and refused.headers["x-request-id"] == "req-a-1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "999"


async def test_models_lists_what_enabled_providers_serve(sops_project: SopsProject) -> None:
    write_provider(
        sops_project, "a", base_url="http://127.0.0.1:9/v1", models=["m1", "m2"], model_map={"fast": "m1"}
    )
    write_provider(sops_project, "b", base_url="http://127.0.0.1:9/v1", models=["m3"], enabled=False)
    async with running(sops_project) as board:
        client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
        models = await client.models.list()
        await client.close()
    assert sorted(m.id for m in models.data) == ["fast", "m1", "m2"]


async def test_models_lists_what_checks_found_for_providers_that_declare_none(
    sops_project: SopsProject,
) -> None:
    async with upstreams({"name": "auto", "models": ("found-1", "found-2")}, {"name": "off"}) as (auto, off):
        write_provider(sops_project, "auto", base_url=auto.base_url)
        write_provider(sops_project, "declared", base_url=auto.base_url, models=["m1"])
        write_provider(sops_project, "off", base_url=off.base_url, enabled=False)
        async with running(sops_project) as board:
            before = await (await board.get("/v1/models")).json()
            for provider_id in ("auto", "off"):
                assert (
                    await board.post(f"/api/v1/llm-config/providers/{provider_id}/test", {})
                ).status == 200
            after = await (await board.get("/v1/models")).json()
            auto.fail(500)  # a failed check keeps what the last successful one listed
            await board.post("/api/v1/llm-config/providers/auto/test", {})
            failed = await (await board.get("/v1/models")).json()
    assert [(m["id"], m["owned_by"]) for m in before["data"]] == [("m1", "declared")]
    listed = [(m["id"], m["owned_by"]) for m in after["data"]]
    assert listed == [("m1", "declared"), ("found-1", "auto"), ("found-2", "auto")]
    assert failed == after


async def test_a_stream_is_counted_when_the_client_did_not_ask_for_usage(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a", models=("m",)) as a:
        write_provider(sops_project, "a", base_url=a.base_url, models=["m"])
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            client = openai.AsyncOpenAI(base_url=board.base_url, api_key="unused", max_retries=0)
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "count me"}], stream=True
            )
            chunks = [chunk async for chunk in stream]
            await client.close()
            own = await board.chat("x", model="m", stream=True, stream_options={"include_usage": False})
            own_text = await own.text()
            metrics = await board.metrics()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a says: count me"
    assert all(c.choices and c.usage is None for c in chunks)  # the usage chunk was the gateway's
    assert a.requests[0].json["stream_options"] == {"include_usage": True}
    assert a.requests[1].json["stream_options"] == {"include_usage": True}
    assert '"usage"' not in own_text and own_text.endswith("data: [DONE]\n\n")
    assert (
        'switchboard_tokens_total{client="anonymous",kind="completion",model="m",provider="a"} 7.0' in metrics
    )
    assert 'switchboard_tokens_total{client="anonymous",kind="prompt",model="m",provider="a"} 3.0' in metrics


async def test_an_upstream_that_refuses_stream_options_is_asked_again_and_remembered(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="old", stream_options=False) as old:
        write_provider(sops_project, "old", base_url=old.base_url)
        write_routing(sops_project, chat="old")
        async with running(sops_project) as board:
            first = await board.chat("one", stream=True)
            first_text = await first.text()
            second = await board.chat("two", stream=True)
            asked = await board.chat("three", stream=True, stream_options={"include_usage": True})
            metrics = await board.metrics()
    assert first.status == second.status == 200
    assert '"content": " one"' in first_text and first_text.endswith("data: [DONE]\n\n")
    assert [("stream_options" in r.json) for r in old.requests] == [True, False, False, True]
    assert asked.status == 400  # the client's own stream_options are the client's business
    assert 'outcome="failed"' not in metrics


async def test_a_refused_stream_is_not_taken_for_a_refusal_of_stream_options(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            a.fail(400, times=2)
            refused = await board.chat(stream=True)
            body = await refused.json()
            later = await board.chat(stream=True)
    assert refused.status == 400 and body["error"]["message"] == "injected failure 400 from a"
    assert later.status == 200
    assert [("stream_options" in r.json) for r in a.requests] == [True, False, True]


async def test_tokens_of_a_provider_without_models_are_labelled_by_the_answer(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream(name="any") as up:
        write_provider(sops_project, "any", base_url=up.base_url, model_map={"alias": "real-name"})
        write_routing(sops_project, chat="any")
        async with running(sops_project) as board:
            await board.chat("one", model="alias")  # the answer names the model sent upstream
            for i in range(105):
                await board.chat("two", model=f"model-{i:03}")
            await board.chat("three", model="model-000")  # seen already: still its own label
            metrics = await board.metrics()
    labels = {
        line.split('model="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("switchboard_tokens_total{") and 'kind="prompt"' in line
    }
    assert "real-name" in labels and "alias" not in labels
    assert len(labels) == 101 and "other" in labels  # 100 models of this provider, then `other`
    assert 'kind="prompt",model="model-000",provider="any"} 2.0' in metrics
    assert 'kind="prompt",model="other",provider="any"} 6.0' in metrics


async def test_a_model_name_that_is_no_text_is_labelled_other_and_metrics_still_answer(
    sops_project: SopsProject,
) -> None:
    # A lone surrogate (`"\\ud800"` in JSON) decodes to a str that UTF-8 cannot encode: kept as
    # a label, it failed every later scrape with a 500. The fake upstream echoes the model asked.
    async with FakeUpstream(name="any") as up:
        write_provider(sops_project, "any", base_url=up.base_url)
        write_routing(sops_project, chat="any")
        async with running(sops_project) as board:
            answered = await board.chat("one", model="\ud800 lone")
            scrape = await board.get("/metrics")
            metrics = await scrape.text()
    assert answered.status == 200
    assert scrape.status == 200
    assert 'kind="prompt",model="other",provider="any"} 1.0' in metrics


async def test_completions_need_the_scope_once_clients_exist(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url, models=["fake-model"])
        write_routing(sops_project, chat="a")
        write_clients(
            sops_project, {"app": ("tok-app", ["completions"]), "ops": ("tok-ops", ["config:read"])}
        )
        async with running(sops_project) as board:
            anonymous = await board.chat()
            wrong_scope = await board.chat(token="tok-ops")
            allowed = await board.chat(token="tok-app")
            metrics = await board.metrics()
    assert (anonymous.status, wrong_scope.status, allowed.status) == (401, 403, 200)
    assert (
        'switchboard_tokens_total{client="app",kind="prompt",model="fake-model",provider="a"} 1.0' in metrics
    )
    assert "tok-app" not in a.requests[-1].headers.get("authorization", "")


async def test_usage_latency_and_fallbacks_are_counted(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        a.fail(500)
        write_provider(sops_project, "a", base_url=a.base_url)
        write_provider(sops_project, "b", base_url=b.base_url, models=["fake-model"])
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        async with running(sops_project) as board:
            await board.chat("one two three")
            metrics = await board.metrics()
    assert 'switchboard_fallbacks_total{purpose="chat"} 1.0' in metrics
    assert 'switchboard_upstream_requests_total{outcome="failed",provider="a"} 1.0' in metrics
    assert 'switchboard_upstream_requests_total{outcome="ok",provider="b"} 1.0' in metrics
    assert (
        'switchboard_tokens_total{client="anonymous",kind="prompt",model="fake-model",provider="b"} 3.0'
        in metrics
    )
    assert 'switchboard_upstream_seconds_count{provider="b"} 1.0' in metrics


async def test_weights_share_the_load(sops_project: SopsProject) -> None:
    async with upstreams({"name": "heavy"}, {"name": "light"}) as (heavy, light):
        write_provider(sops_project, "heavy", base_url=heavy.base_url)
        write_provider(sops_project, "light", base_url=light.base_url)
        write_routing(sops_project, chat={"primary": ["heavy", "light"], "weights": {"heavy": 3}})
        async with running(sops_project) as board:
            served = [(await board.chat()).headers[PROVIDER] for _ in range(400)]
    share = served.count("heavy") / len(served)
    assert 0.68 < share < 0.82  # 0.75 expected; 5 standard deviations is about 0.11
    assert len(heavy.requests) + len(light.requests) == 400


async def test_the_litellm_parameters_are_given_and_audited(sops_project: SopsProject) -> None:
    async with upstreams({"name": "a"}, {"name": "b"}) as (a, b):
        write_provider(
            sops_project,
            "a",
            provider="openrouter",
            base_url=a.base_url,
            api_key=CANARY,
            models=["m"],
            model_map={"alias": "m"},
        )
        write_provider(sops_project, "b", base_url=b.base_url, purposes=["chat", "embeddings"])
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        write_clients(
            sops_project, {"deployer": ("tok-d", ["secrets:read"]), "ops": ("tok-o", ["config:read"])}
        )
        litellm = "/api/v1/llm-config/active/chat/litellm"
        async with running(sops_project) as board:
            denied = await board.get(litellm, token="tok-o")
            answer = await board.get(litellm, token="tok-d")
            unknown = await board.get("/api/v1/llm-config/active/nope/litellm", token="tok-d")
            unrouted = await board.get("/api/v1/llm-config/active/embeddings/litellm", token="tok-d")
            aliased = await (await board.get(f"{litellm}?model=alias", token="tok-d")).json()
            other = await (await board.get(f"{litellm}?model=other%2Fmodel", token="tok-d")).json()
            body = await answer.json()
            reads = board.events("secret.read")
    assert denied.status == 403 and unknown.status == 404 and unrouted.status == 404
    assert (body["provider"], body["model"]) == ("a", "m")
    assert body["litellm_params"] == {
        "model": "openrouter/m",
        "api_base": a.base_url,
        "api_key": CANARY,
        "timeout": 600,
    }
    assert (aliased["provider"], aliased["model"], aliased["litellm_params"]["model"]) == (
        "a",
        "alias",
        "openrouter/m",
    )
    # `a` does not serve it; `b`, which declares no models, serves any.
    assert (other["provider"], other["litellm_params"]["model"]) == ("b", "openai/other/model")
    assert [(e["subject"], e["provider"], e["client"], e["purpose"]) for e in reads] == [
        ("a", "a", "deployer", "chat"),  # docs/reference.md §5: secret.read (client, provider)
        ("a", "a", "deployer", "chat"),
        ("b", "b", "deployer", "chat"),
    ]


async def test_litellm_parameters_never_name_a_wildcard(sops_project: SopsProject) -> None:
    async with upstreams({"name": "any"}, {"name": "some"}) as (anything, some):
        write_provider(sops_project, "any", base_url=anything.base_url, purposes=["embeddings"])
        write_provider(sops_project, "some", base_url=some.base_url, models=["r1"], purposes=["reranking"])
        write_routing(sops_project, embeddings="any", reranking="some")
        async with running(sops_project) as board:
            base = "/api/v1/llm-config/active"
            unnamed = await board.get(f"{base}/embeddings/litellm")
            named = await board.get(f"{base}/embeddings/litellm?model=bge-m3")
            unserved = await board.get(f"{base}/reranking/litellm?model=r2")
            reads = board.events("secret.read")
    assert unnamed.status == 400
    error = (await unnamed.json())["error"]
    assert error["type"] == "bad_request" and "?model=" in error["message"] and "`any`" in error["message"]
    assert (await named.json())["litellm_params"]["model"] == "openai/bge-m3"
    assert unserved.status == 404
    assert (await unserved.json())["error"]["code"] == "model_not_found"
    assert [e["subject"] for e in reads] == ["any"]  # a refusal reads no key


async def test_provider_test_and_server_models(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="a", models=("m1", "m2")) as a:
        write_provider(sops_project, "a", base_url=a.base_url)
        write_provider(sops_project, "dead", base_url=closed_port_url())
        write_provider(sops_project, "k", provider="openai", base_url=a.base_url, api_key=CANARY)
        async with running(sops_project, health_confirm=1) as board:
            ok = await (await board.post("/api/v1/llm-config/providers/a/test", {})).json()
            down = await (await board.post("/api/v1/llm-config/providers/dead/test", {})).json()
            missing = await board.post("/api/v1/llm-config/providers/nope/test", {})
            models = await board.get("/api/v1/llm-config/servers/a/models")
            not_a_server = await board.get("/api/v1/llm-config/servers/k/models")
            dead_models = await board.get("/api/v1/llm-config/servers/dead/models")
            health = board.app[HEALTH].get("dead")
            await board.recorded()
            changes = board.events("provider.health_changed")
    assert ok["ok"] is True and ok["latency_ms"] >= 0 and "2 models" in ok["message"]
    assert down["ok"] is False and down["message"].startswith("cannot connect")
    assert missing.status == 404 and not_a_server.status == 404
    assert await models.json() == {"id": "a", "models": ["m1", "m2"]}
    assert dead_models.status == 502
    assert health.status == "unhealthy"
    assert [(e["subject"], e["changes"]["status"]) for e in changes] == [
        ("dead", {"old": "unknown", "new": "unhealthy"})
    ]


async def test_the_key_leaks_nowhere(sops_project: SopsProject, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeUpstream(name="a", api_key=CANARY) as a:
        write_provider(sops_project, "a", provider="openai", base_url=a.base_url, api_key=CANARY)
        write_provider(sops_project, "dead", provider="openai", base_url=closed_port_url(), api_key=CANARY)
        write_routing(sops_project, chat={"primary": "dead", "fallbacks": ["a"]})
        async with running(sops_project, circuit_failures=1) as board:
            answers = [await (await board.chat(stream=s)).text() for s in (False, True)]
            a.fail(500)
            answers.append(await (await board.chat()).text())
            a.fail(400)
            answers.append(await (await board.chat()).text())
            a.answer_normally()
            for path in ("/api/v1/llm-config/providers", "/api/v1/llm-config/providers/a/test"):
                answers.append(await (await board.get(path)).text())
            answers.append(await (await board.post("/api/v1/llm-config/providers/dead/test", {})).text())
            answers.append(await board.metrics())
            events = board.events_file.read_text()
    assert any("a says" in text for text in answers)
    for text in [*answers, events, caplog.text]:
        assert CANARY not in text
        assert CANARY[-12:] not in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_provider_that_points_at_the_service_itself_is_a_loop_refused_at_once(
    sops_project: SopsProject, stream: bool
) -> None:
    """A provider file whose base_url is the service (a pull request; without authentication
    nothing stops the request coming back) made one request forward itself again and again:
    within two seconds it held all 1,024 pooled connections, every other request waiting,
    until `timeout_s` ran out (600 s by default)."""
    port = _free_port()
    async with FakeUpstream(name="backup") as backup:
        write_provider(sops_project, "self", base_url=f"http://127.0.0.1:{port}/v1")
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "self", "fallbacks": ["backup"]})
        async with running(sops_project, port=port) as board:
            response = await asyncio.wait_for(board.chat("hi", stream=stream), 10)
            text = await response.text()
            in_use = len(board.app[RELAY].session.connector._acquired)  # type: ignore[union-attr]
            alone = await asyncio.wait_for(board.chat("hi", stream=stream), 10)
    assert response.status == 200 and response.headers["x-switchboard-provider"] == "backup", text
    assert response.headers["x-switchboard-attempts"] == "2"
    assert in_use <= 2
    assert alone.status == 200


async def test_a_request_that_came_back_is_508_and_one_from_another_gateway_is_served(
    sops_project: SopsProject,
) -> None:
    async with FakeUpstream() as up:
        write_provider(sops_project, "gpu", base_url=up.base_url)
        write_routing(sops_project, chat="gpu")
        async with running(sops_project) as board:
            token = board.app[RELAY].via
            payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
            url = board.url + "/v1/chat/completions"
            async with board.http.post(url, json=payload, headers={VIA_HEADER: f"abc, {token}"}) as back:
                looped = (back.status, await back.json())
            async with board.http.post(url, json=payload, headers={VIA_HEADER: "another-gateway"}) as other:
                assert other.status == 200
    assert looped[0] == 508 and looped[1]["error"]["type"] == "loop_detected"
    assert up.requests[-1].headers[VIA_HEADER] == f"another-gateway, {token}"


async def test_streams_that_fill_the_pool_do_not_open_another_providers_circuit(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client holding as many slow streams as an upstream has connections (1,024; 4 here)
    starved every other provider while the pool was shared: their requests waited for a
    connection, timed out, and opened their circuits, for every client. The limit is per
    upstream now, so only the slow one's requests wait."""
    monkeypatch.setattr(transports_base, "CONNECTIONS_PER_HOST", 4)
    async with upstreams({"name": "slow", "chunk_interval_s": 1.0}, {"name": "fast"}) as (slow, fast):
        write_provider(sops_project, "slow", base_url=slow.base_url, models=["s"])
        write_provider(sops_project, "fast", base_url=fast.base_url, models=["f"], first_byte_timeout_s=0.5)
        write_routing(sops_project, chat=["slow", "fast"])
        async with running(sops_project) as board:
            held = [asyncio.create_task(board.chat("a b c d e f", model="s", stream=True)) for _ in range(5)]
            try:
                await eventually(lambda: len(slow.requests) == 4)
                answers = [await board.chat("x", model="f", stream=True) for _ in range(3)]
                opened = board.app[HEALTH].is_open("fast")
                waiting = len(slow.requests)  # the fifth waits for one of the slow upstream's four
            finally:
                for task in held:
                    task.cancel()
                await asyncio.gather(*held, return_exceptions=True)
    assert [a.status for a in answers] == [200, 200, 200]
    assert not opened
    assert waiting == 4


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/rerank"])
async def test_names_that_differ_only_in_case_are_a_400(sops_project: SopsProject, path: str) -> None:
    # Go's encoding/json (Ollama, gateways written in Go) reads names without case and keeps the
    # last: `MODEL` (or `\u017ftream`, whose long s folds to `s`) would be read over the field the
    # gateway routed, priced and metered on. The body is refused before any upstream sees it.
    async with FakeUpstream(name="a") as a:
        write_provider(sops_project, "a", base_url=a.base_url, purposes=["chat", "embeddings", "reranking"])
        write_routing(sops_project, chat="a", embeddings="a", reranking="a")
        async with running(sops_project) as board:
            answers = []
            for raw in (
                '{"model": "m", "MODEL": "other", "messages": [], "input": "x", "query": "q"}',
                '{"model": "m", "messages": [], "stream": false, "\\u017ftream": true, "input": "x"}',
                # the gateway sets `include_usage` to count a stream: a later `INCLUDE_USAGE` would
                # be the one Go reads, and the stream would go uncounted (charged its bound only)
                '{"model": "m", "messages": [], "input": "x", "query": "q", "stream": true,'
                ' "stream_options": {"include_usage": true, "INCLUDE_USAGE": false}}',
            ):
                async with board.http.post(board.url + path, data=raw.encode(), headers=JSON) as response:
                    answers.append((response.status, await response.json()))
            async with board.http.post(
                board.url + path,
                data=b'{"model": "m", "messages": [], "input": "x", "query": "q", "documents": ["d"]}',
                headers=JSON,
            ) as response:
                plain = response.status
    for status, body in answers:
        assert status == 400, body
        assert body["error"]["type"] == "bad_request"
        assert "differ only in case" in body["error"]["message"]
    assert plain != 400
    assert len(a.requests) == 1  # only the plain body went upstream

"""The gateway's spans and metrics as an OTLP collector receives them (docs/reference.md §14): a real service
exporting to a real receiver, a stand-in upstream that records the `traceparent` it was sent."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web

from tests.conftest import SopsProject
from tests.support.gateway import CANARY, Switchboard, running, write_clients, write_provider, write_routing
from tests.support.otlp import OTLPReceiver, Span
from tests.support.upstreams import FakeUpstream, serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[0-3]$")  # sampled; 02: a random id


def sent_traceparent(up: FakeUpstream, index: int = -1) -> tuple[str, str]:
    """The trace id and parent span id of the `traceparent` the upstream received."""
    header = up.requests[index].headers.get("traceparent", "")
    match = _TRACEPARENT.match(header)
    assert match, f"no valid traceparent upstream: {header!r}"
    return match.group(1), match.group(2)


def requests_of(otlp: OTLPReceiver, trace_id: str) -> list[Span]:
    return [s for s in otlp.spans if s.trace_id == trace_id and s.kind == "SERVER"]


async def post(board: Switchboard, path: str, payload: Any, **headers: str) -> aiohttp.ClientResponse:
    async with board.http.post(board.url + path, json=payload, headers=headers) as response:
        await response.read()
        return response


async def test_a_chat_request_continues_the_clients_trace_and_passes_it_upstream(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    async with FakeUpstream(name="a", api_key=CANARY) as up:
        write_provider(
            sops_project, "a", provider="openai", base_url=up.base_url, api_key=CANARY, models=["fake-model"]
        )
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            response = await post(
                board,
                "/v1/chat/completions",
                {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
                traceparent=TRACEPARENT,
                tracestate="vendor=value",
            )
            assert response.status == 200
            request = await otlp.span(lambda s: s.kind == "SERVER")
            attempt = await otlp.span(lambda s: s.kind == "CLIENT")
            trace_id, parent = sent_traceparent(up)
            assert up.requests[-1].headers.get("tracestate") == "vendor=value"

            assert request.trace_id == attempt.trace_id == trace_id == TRACE_ID
            assert request.parent_span_id == CLIENT_SPAN
            assert attempt.parent_span_id == request.span_id
            assert parent == attempt.span_id  # the upstream's parent is the attempt
            assert request.name == attempt.name == "chat fake-model"
            assert request.attributes == {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "fake-model",
                "gen_ai.response.model": "fake-model",
                "gen_ai.provider.name": "openai",
                "gen_ai.usage.input_tokens": 1,
                "gen_ai.usage.output_tokens": 3,
                "server.address": "127.0.0.1",
                "server.port": up.port,
                "http.response.status_code": 200,
                "switchboard.client.name": "anonymous",
                "switchboard.protocol": "chat",
                "switchboard.provider.id": "a",
                "switchboard.attempts": 1,
            }
            assert attempt.attributes["gen_ai.provider.name"] == "openai"
            assert attempt.attributes["switchboard.attempt"] == 1
            assert attempt.attributes["http.response.status_code"] == 200
            assert attempt.attributes["gen_ai.usage.output_tokens"] == 3
            assert request.status == attempt.status == "UNSET"
            assert request.resource["service.name"] == "switchboard"
            assert request.scope == "switchboard.gateway"

            usage = await otlp.point(lambda p: p.metric == "gen_ai.client.token.usage")
            assert usage.unit == "{token}" and usage.bounds[:3] == (1, 4, 16)
            tokens = {
                p.attributes["gen_ai.token.type"]: p.sum
                for p in otlp.points
                if p.metric == "gen_ai.client.token.usage"
            }
            assert tokens == {"input": 1, "output": 3}
            assert usage.attributes["gen_ai.operation.name"] == "chat"
            assert usage.attributes["gen_ai.provider.name"] == "openai"
            assert usage.attributes["gen_ai.request.model"] == "fake-model"
            assert usage.attributes["server.address"] == "127.0.0.1"
            duration = await otlp.point(lambda p: p.metric == "gen_ai.client.operation.duration")
            assert duration.unit == "s" and duration.count == 1 and 0 < duration.sum < 10
            assert "error.type" not in duration.attributes


async def test_without_a_traceparent_the_upstream_gets_a_new_trace(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            assert (await board.chat("hi")).status == 200
            trace_id, parent = sent_traceparent(up)
            request = await otlp.span(lambda s: s.kind == "SERVER")
            attempt = await otlp.span(lambda s: s.kind == "CLIENT")
            assert request.trace_id == trace_id and request.parent_span_id == ""
            assert parent == attempt.span_id
            assert request.attributes["gen_ai.provider.name"] == "vllm"


async def test_a_malformed_traceparent_starts_a_new_trace_and_is_never_an_error(
    sops_project: SopsProject, otlp: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # an all-zero trace id
        f"00-{TRACE_ID}-0000000000000000-01",  # an all-zero span id
        f"ff-{TRACE_ID}-{CLIENT_SPAN}-01",  # version ff is invalid
        f"00-{TRACE_ID.upper()}-{CLIENT_SPAN}-01",  # upper case is not W3C
        f"00-{TRACE_ID}-{CLIENT_SPAN}-01-extra",  # version 00 has no more fields
        "00-" + "a" * 4000,
        "00-\u00e9\u00ff",
    ]
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", base_url=up.base_url)
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            for header in garbage:
                response = await post(
                    board,
                    "/v1/chat/completions",
                    {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
                    traceparent=header,
                    tracestate="x" * 6000 + ",a=b," * 50,
                )
                assert response.status == 200, header
                trace_id, _ = sent_traceparent(up)
                assert trace_id not in (TRACE_ID, "0" * 32)
                assert "x" * 100 not in up.requests[-1].headers.get("tracestate", "")
            spans = await otlp.spans_matching(lambda s: s.kind == "SERVER", len(garbage))
            assert all(s.parent_span_id == "" for s in spans)
            assert len({s.trace_id for s in spans}) == len(garbage)
        # A client's header is worth no log line per request (OpenTelemetry's would quote it).
        assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry.trace")] == []


async def test_a_fallback_is_two_attempt_spans_under_one_request(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    async with FakeUpstream(name="a") as down, FakeUpstream(name="b") as up:
        down.fail(503)
        write_provider(sops_project, "a", base_url=down.base_url)
        write_provider(sops_project, "b", base_url=up.base_url)
        write_routing(sops_project, chat={"primary": "a", "fallbacks": ["b"]})
        async with running(sops_project) as board:
            response = await post(
                board,
                "/v1/chat/completions",
                {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                traceparent=TRACEPARENT,
            )
            assert response.status == 200
            request = await otlp.span(lambda s: s.kind == "SERVER")
            attempts = await otlp.spans_matching(lambda s: s.kind == "CLIENT", 2)
            first, second = sorted(attempts, key=lambda s: s.attributes["switchboard.attempt"])
            assert {first.parent_span_id, second.parent_span_id} == {request.span_id}
            assert first.attributes["switchboard.provider.id"] == "a"
            assert first.attributes["http.response.status_code"] == 503
            assert first.attributes["error.type"] == "503"
            assert first.attributes["switchboard.failure.reason"] == "HTTP 503"
            assert first.status == "ERROR" and first.status_message == "HTTP 503"
            assert second.attributes["switchboard.provider.id"] == "b" and second.status == "UNSET"
            assert request.attributes["switchboard.attempts"] == 2
            assert request.attributes["switchboard.provider.id"] == "b"
            assert request.attributes["gen_ai.request.stream"] is True
            assert request.attributes["gen_ai.usage.output_tokens"] > 0
            assert request.status == "UNSET"
            # Each attempt sent its own span as the parent, in the client's trace.
            assert sent_traceparent(down) == (TRACE_ID, first.span_id)
            assert sent_traceparent(up) == (TRACE_ID, second.span_id)
            # The stream's span ended when the stream did, after its attempts.
            assert request.end_ns >= second.end_ns >= second.start_ns >= first.end_ns
            failed = await otlp.point(
                lambda p: p.metric == "gen_ai.client.operation.duration" and "error.type" in p.attributes
            )
            assert failed.attributes["error.type"] == "503" and failed.count == 1


async def test_a_request_no_provider_answers_is_an_error_span(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    async with FakeUpstream(name="a") as down:
        down.fail(500)
        write_provider(sops_project, "a", base_url=down.base_url, models=["fake-model"])
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            assert (await board.chat("hi")).status == 502
            request = await otlp.span(lambda s: s.kind == "SERVER")
            assert request.status == "ERROR" and "every candidate failed" in request.status_message
            assert request.attributes["error.type"] == "upstreams_failed"
            assert request.attributes["http.response.status_code"] == 502
            assert request.attributes["switchboard.attempts"] == 1
            assert "gen_ai.provider.name" not in request.attributes

            # The client's error is no error of the gateway's: the span says what it was.
            payload = {"model": "fake-model", "input": "hi", "previous_response_id": "resp_not_ours"}
            assert (await post(board, "/v1/responses", payload)).status == 400
            refused = await otlp.span(lambda s: s.attributes.get("switchboard.protocol") == "responses")
            assert refused.attributes["error.type"] == "invalid_request_error"
            assert refused.attributes["http.response.status_code"] == 400
            assert refused.attributes["switchboard.attempts"] == 0
            assert refused.status == "UNSET"


async def test_every_protocol_is_a_span_with_its_operation(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    token = "tok-traced-client-0001"
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", base_url=up.base_url, purposes=["chat", "embeddings", "reranking"])
        write_routing(sops_project, chat="a", embeddings="a", reranking="a")
        write_clients(sops_project, {"team-blue": (token, ["completions"])})
        async with running(sops_project) as board:
            bearer = {"Authorization": f"Bearer {token}"}
            calls: list[tuple[str, dict[str, Any], str]] = [
                ("/v1/embeddings", {"model": "fake-model", "input": "hi"}, "embeddings"),
                ("/v1/rerank", {"model": "fake-model", "query": "q", "documents": ["a", "b"]}, "rerank"),
                ("/v1/completions", {"model": "fake-model", "prompt": "hi"}, "text_completion"),
                (
                    "/v1/messages",
                    {"model": "fake-model", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]},
                    "chat",
                ),
                ("/v1/responses", {"model": "fake-model", "input": "hi", "stream": True}, "chat"),
                (
                    "/v1/messages",
                    {
                        "model": "fake-model",
                        "max_tokens": 9,
                        "stream": True,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                    "chat",
                ),
            ]
            for index, (path, payload, _) in enumerate(calls):
                traceparent = f"00-{index + 1:032x}-{CLIENT_SPAN}-01"
                response = await post(board, path, payload, traceparent=traceparent, **bearer)
                assert response.status == 200, (path, await response.text())
                assert sent_traceparent(up)[0] == f"{index + 1:032x}"
            for index, (path, _, operation) in enumerate(calls):
                trace_id = f"{index + 1:032x}"
                request = await otlp.span(lambda s, t=trace_id: s.trace_id == t and s.kind == "SERVER")
                attempt = await otlp.span(lambda s, t=trace_id: s.trace_id == t and s.kind == "CLIENT")
                assert request.attributes["gen_ai.operation.name"] == operation, path
                assert request.attributes["switchboard.client.name"] == "team-blue"
                assert attempt.parent_span_id == request.span_id
                spoken = attempt.attributes["switchboard.upstream.protocol"]
                assert spoken in ("chat", "completions", "responses")
                if operation != "rerank":
                    assert request.attributes["gen_ai.usage.input_tokens"] > 0, path
            messages = requests_of(otlp, f"{4:032x}")[0]
            assert messages.attributes["switchboard.protocol"] == "messages"
            assert messages.attributes["gen_ai.response.model"] == "fake-model"


async def test_an_upstreams_hostile_answer_is_no_count_and_no_log_line(
    sops_project: SopsProject, otlp: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Token counts past int64 (OTLP's) or below zero, and a model name of 400 characters: the span
    has no counts (the SDK would log a traceback per span for each, and the metrics would sum
    them), and the name is cut."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "model": "m" * 400,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 10**30, "completion_tokens": -5, "total_tokens": True},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serving(app) as url:
        write_provider(sops_project, "odd", base_url=url + "/v1")
        write_routing(sops_project, chat="odd")
        async with running(sops_project) as board:
            assert (await board.chat("hi")).status == 200
            request = await otlp.span(lambda s: s.kind == "SERVER")
            assert "gen_ai.usage.input_tokens" not in request.attributes
            assert "gen_ai.usage.output_tokens" not in request.attributes
            assert request.attributes["gen_ai.response.model"] == "m" * 256
            await otlp.point(lambda p: p.metric == "gen_ai.client.operation.duration")
            assert not [p for p in otlp.points if p.metric == "gen_ai.client.token.usage"]
        assert not [r for r in caplog.records if "Failed to encode" in r.getMessage()]


async def test_a_model_name_that_is_no_text_is_exported_without_an_error(
    sops_project: SopsProject, otlp: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A lone surrogate in the model an answer names (`"\\ud800"` in its JSON): no exporter can
    encode it, and a metric attribute that held it logged a failure at every export, for ever."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "model": "\ud800 lone",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serving(app) as url:
        write_provider(sops_project, "odd", base_url=url + "/v1")
        write_routing(sops_project, chat="odd")
        async with running(sops_project) as board:
            assert (await board.chat("hi")).status == 200
            request = await otlp.span(lambda s: s.kind == "SERVER")
            point = await otlp.point(lambda p: p.metric == "gen_ai.client.token.usage")
        assert request.attributes["gen_ai.response.model"] == "? lone"
        assert point.attributes["gen_ai.response.model"] == "other"
        assert not [r for r in caplog.records if "Failed to encode" in r.getMessage()]


async def test_a_token_count_is_a_span_estimated_or_not(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    async with FakeUpstream(name="a") as up:
        write_provider(sops_project, "a", base_url=up.base_url)  # vllm: no Messages, so an estimate
        write_routing(sops_project, chat="a")
        async with running(sops_project) as board:
            response = await post(board, "/v1/messages/count_tokens", payload)
            assert response.status == 200
            span = await otlp.span(lambda s: s.kind == "SERVER")
            assert span.attributes["gen_ai.operation.name"] == "count_tokens"
            assert span.attributes["switchboard.estimated"] is True
            assert span.attributes["switchboard.attempts"] == 0
            assert "error.type" not in span.attributes and span.status == "UNSET"


async def test_a_token_count_the_provider_that_counts_fails_is_an_estimated_span_not_an_error(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    """The provider that speaks Messages natively fails (500): the client has the local estimate
    (200), the request's span says so, and only the attempt's span holds the failure."""
    payload = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}
    async with FakeUpstream(protocol="anthropic", name="claude", models=("claude-x",)) as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            up.fail(500)
            response = await post(board, "/v1/messages/count_tokens", payload)
            assert response.status == 200
            span = await otlp.span(lambda s: s.kind == "SERVER")
            attempt = await otlp.span(lambda s: s.kind == "CLIENT")
    assert span.attributes["switchboard.estimated"] is True
    assert span.attributes["switchboard.attempts"] == 1
    assert "error.type" not in span.attributes and span.status == "UNSET"
    assert attempt.parent_span_id == span.span_id and attempt.attributes["http.response.status_code"] == 500


async def test_a_token_count_a_provider_does_not_take_is_an_estimated_span_not_an_error(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    """A provider that speaks Messages by default answers 404 at `/v1/messages/count_tokens`: the
    client has the local estimate (200), and the request's span says so, as when no provider
    speaks Messages; only the attempt's span holds the 404."""
    payload = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}
    missing = ("/v1/messages/count_tokens",)
    async with FakeUpstream(protocol="anthropic", name="claude", models=("claude-x",), missing=missing) as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            response = await post(board, "/v1/messages/count_tokens", payload)
            assert response.status == 200
            span = await otlp.span(lambda s: s.kind == "SERVER")
            attempt = await otlp.span(lambda s: s.kind == "CLIENT")
    assert span.attributes["switchboard.estimated"] is True
    assert span.attributes["switchboard.attempts"] == 1
    assert "error.type" not in span.attributes and "http.response.status_code" not in span.attributes
    assert span.status == "UNSET"
    assert attempt.parent_span_id == span.span_id and attempt.attributes["http.response.status_code"] == 404


async def test_an_anthropic_sdks_native_stream_continues_its_trace_with_the_streams_usage(
    sops_project: SopsProject, otlp: OTLPReceiver
) -> None:
    """A Messages stream the `anthropic` SDK sends, native to an Anthropic provider: the client's
    trace is continued and passed upstream (the attempt as parent), the span names Anthropic as
    the conventions do, and its token counts are the stream's own (`message_start`'s input,
    `message_delta`'s output)."""
    async with FakeUpstream(protocol="anthropic", name="claude", models=("claude-x",), api_key=CANARY) as up:
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            sdk = anthropic.AsyncAnthropic(base_url=board.url, api_key="unused", max_retries=0)
            try:
                async with sdk.messages.stream(
                    model="claude-x",
                    max_tokens=20,
                    messages=[{"role": "user", "content": "one two three"}],
                    extra_headers={"traceparent": TRACEPARENT},
                ) as stream:
                    final = await stream.get_final_message()
            finally:
                await sdk.close()
            request = await otlp.span(lambda s: s.kind == "SERVER")
            attempt = await otlp.span(lambda s: s.kind == "CLIENT")
    trace_id, parent = sent_traceparent(up)
    assert up.requests[-1].path == "/v1/messages" and up.requests[-1].json["stream"] is True
    assert request.trace_id == attempt.trace_id == trace_id == TRACE_ID
    assert request.parent_span_id == CLIENT_SPAN and parent == attempt.span_id
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 5)  # "claude says: one two three"
    for span in (request, attempt):
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.provider.name"] == "anthropic"
        assert span.attributes["gen_ai.request.model"] == "claude-x"
        assert span.attributes["gen_ai.response.model"] == "claude-x"
        assert span.attributes["gen_ai.usage.input_tokens"] == 3
        assert span.attributes["gen_ai.usage.output_tokens"] == 5
        assert span.attributes["server.address"] == "127.0.0.1"
    assert request.attributes["switchboard.protocol"] == "messages"
    assert request.attributes["gen_ai.request.stream"] is True
    assert attempt.attributes["switchboard.upstream.protocol"] == "messages"

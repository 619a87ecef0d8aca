"""The direct transport on its own: one `OpenAITransport` between a client and a stand-in upstream.

A small aiohttp app stands where the relay would: it builds the `Call` and hands it to the
transport, and answers a `Failure` as a 599 carrying its status and reason, so each test
sees exactly what the transport did with one attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from multidict import CIMultiDict

from service.config.models import AiServer, ApiKey, Provider
from service.config.secret import Secret
from service.config.upstreams import SETTING, AllowedUpstreams
from service.gateway.call import Call, Failure
from service.gateway.transports.base import open_session
from service.gateway.transports.openai import OpenAITransport
from tests.support.gateway import CANARY
from tests.support.upstreams import FakeUpstream, closed_port_url, serving

FAILED = 599


@dataclass
class Harness:
    """A client in front of one transport; `calls` are the calls it relayed."""

    url: str
    http: aiohttp.ClientSession
    transport: OpenAITransport
    calls: list[Call] = field(default_factory=list)

    async def post(
        self, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, CIMultiDict[str], bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.post(self.url + path, data=data, headers=headers or {}) as response:
            return response.status, CIMultiDict(response.headers), await response.read()


@contextlib.asynccontextmanager
async def relaying(provider: Provider, **options: Any) -> AsyncIterator[Harness]:
    """Serve `provider` through a fresh `OpenAITransport` (its `options`: `max_bytes`)."""
    async with open_session() as session, aiohttp.ClientSession() as http:
        transport = OpenAITransport(session, **options)
        calls: list[Call] = []

        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            path = "/" + request.match_info["path"]
            purpose = {"/embeddings": "embeddings", "/rerank": "reranking"}.get(path, "chat")
            call = Call(request, purpose, path, body, json.loads(body))
            calls.append(call)
            try:
                return await transport.send(call, provider, {"x-switchboard-provider": provider.id})
            except Failure as failure:
                answer = {"status": failure.status, "reason": failure.reason, "refused": failure.refused}
                return web.json_response(answer, status=FAILED)

        app = web.Application()
        app.router.add_post("/v1/{path:.*}", handler)
        async with serving(app) as url:
            yield Harness(f"{url}/v1", http, transport, calls)


def server(url: str, **fields: Any) -> AiServer:
    return AiServer(kind="ai_server", id="s", server_type="vllm", base_url=url, **fields)


def keyed(url: str, **fields: Any) -> ApiKey:
    return ApiKey(kind="api_key", id="k", provider="openai", base_url=url, api_key=Secret(CANARY), **fields)


# -- what goes out ---------------------------------------------------------------------------


async def test_the_body_goes_out_as_the_same_bytes() -> None:
    raw = '{ "messages":[{"role":"user","content":"h\\u00e9 — ok"}],  "model":"m", "extra": [1, 2.50] }'
    async with FakeUpstream() as up, relaying(server(up.base_url)) as harness:
        status, _, _ = await harness.post("/chat/completions", raw.encode())
        own_usage = json.loads(raw) | {"stream": True, "stream_options": {"include_usage": True}}
        streamed = json.dumps(own_usage, indent=1).encode()
        stream_status, _, _ = await harness.post("/chat/completions", streamed)
    assert status == stream_status == 200
    assert up.requests[0].raw == raw.encode()  # not re-encoded: spacing, order, escapes kept
    assert up.requests[1].raw == streamed  # the client asked for usage itself: untouched too


async def test_a_stream_asks_for_its_usage_after_the_clients_own_bytes() -> None:
    # The client's bytes go untouched, the member is put last: not re-encoded (a long
    # conversation would be encoded again before the first byte). Where that cannot be done
    # as text (UTF-16, a model to rename), the body is encoded as before: the same object.
    raw = (
        ' \n{ "messages":[{"role":"user","content":"h\\u00e9 \u2014 ok"}],  "stream":true, "model":"m" }\r\n '
    )
    utf16 = json.dumps({"model": "m", "messages": [], "stream": True}).encode("utf-16")
    renamed = {"model": "alias", "messages": [], "stream": True}
    async with FakeUpstream() as up:
        async with relaying(server(up.base_url)) as harness:
            assert (await harness.post("/chat/completions", raw.encode()))[0] == 200
            assert (await harness.post("/chat/completions", utf16))[0] == 200
        async with relaying(server(up.base_url, model_map={"alias": "real"})) as harness:
            assert (await harness.post("/chat/completions", renamed))[0] == 200
    asked = {"stream_options": {"include_usage": True}}
    first, second, third = up.requests
    assert first.raw == raw.rstrip().encode()[:-1] + b',"stream_options":{"include_usage":true}}'
    assert first.json == json.loads(raw) | asked
    assert second.json == json.loads(utf16) | asked
    assert third.json == renamed | {"model": "real"} | asked


async def test_the_gateways_stream_options_come_after_the_clients_members() -> None:
    # Parsers that take several spellings for one field keep the last: Go's encoding/json
    # (Ollama, Go gateways) matches names without case, and U+017F (long s) as `s`. The
    # gateway's member goes last, as when the body was encoded again, or `"STREAM_OPTIONS"`
    # would hide the usage.
    spellings = ("STREAM_OPTIONS", "Stream_Options", "\u017ftream_options")
    async with FakeUpstream() as up, relaying(server(up.base_url)) as harness:
        for key in spellings:
            hidden = {"model": "m", "messages": [], "stream": True, key: {"include_usage": False}}
            assert (await harness.post("/chat/completions", hidden))[0] == 200

    def folded(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        return {key.casefold(): value for key, value in pairs}

    for request in up.requests:
        assert json.loads(request.raw, object_pairs_hook=folded)["stream_options"] == {"include_usage": True}


async def test_a_lone_surrogates_bytes_are_not_sent_as_they_are_to_ask_for_usage() -> None:
    # json reads a lone surrogate's bytes (`\xed\xa0\x80`), which are no UTF-8: encoded again,
    # as before, it goes out escaped (`\ud800`), so the upstream gets UTF-8 JSON.
    raw = b'{"model":"m","messages":[{"role":"user","content":"a\xed\xa0\x80b"}],"stream":true}'
    async with FakeUpstream() as up, relaying(server(up.base_url)) as harness:
        assert (await harness.post("/chat/completions", raw))[0] == 200
    sent = up.requests[0].raw
    assert json.loads(sent.decode("utf-8")) == json.loads(raw) | {"stream_options": {"include_usage": True}}


async def test_model_map_renames_the_model_and_nothing_else() -> None:
    body = {"model": "alias", "messages": [], "temperature": 0.5, "unknown": {"kept": True}}
    async with FakeUpstream() as up, relaying(server(up.base_url, model_map={"alias": "real"})) as harness:
        await harness.post("/chat/completions", body)
        await harness.post("/chat/completions", {**body, "model": "other"})
    assert up.requests[0].json == {**body, "model": "real"}
    assert up.requests[1].raw == json.dumps({**body, "model": "other"}).encode()


async def test_the_url_and_headers_come_from_the_provider_file() -> None:
    client_headers = {
        "Authorization": "Bearer the-clients-own-token",
        "X-Api-Key": "sk-client",
        "Cookie": "session=client",
        "X-Forwarded-Host": "evil.example",
    }
    async with FakeUpstream() as up, relaying(keyed(f"{up.url}/custom/v1")) as harness:
        body = {"model": "m", "messages": [], "base_url": "http://evil.example", "api_key": "sk-client"}
        status, _, _ = await harness.post("/chat/completions", body, client_headers)
    received = up.requests[-1]
    assert status == 404 and received.path == "/custom/v1/chat/completions"  # where the file says
    assert received.headers["authorization"] == f"Bearer {CANARY}"
    assert received.headers["content-type"] == "application/json"
    assert not {"x-api-key", "cookie", "x-forwarded-host"} & set(received.headers)


async def test_a_provider_is_prepared_once_per_version_of_its_file() -> None:
    async with open_session() as session:
        transport = OpenAITransport(session)
        provider = keyed("http://127.0.0.1:9/v1")
        prepared = transport.upstream(provider)
        assert transport.upstream(provider) is prepared
        assert transport.upstream(keyed("http://127.0.0.1:9/v1")) is not prepared
    assert CANARY not in repr(prepared)


async def test_the_direct_path_holds_the_allowed_upstreams_without_the_sessions_hooks() -> None:
    """The gateway's requests skip the session (its per-request middleware and trace, its whole
    client) for `transports.wire`, on the same guarded resolver; a host the allowed upstreams
    refuse is then refused once per version of the provider's file, with the reason the
    middleware gives."""
    allowed = AllowedUpstreams.parse("localhost")
    async with open_session(allowed) as session:
        transport = OpenAITransport(session, allowed=allowed)
        assert transport.pool.resolver is session.connector._resolver  # type: ignore[union-attr]
        for refused in ("http://127.0.0.1:9/v1", "http://169.254.169.254/v1", "http://2852039166/v1"):
            target = transport.upstream(keyed(refused))
            assert target.unusable is not None and SETTING in target.unusable, refused
        assert transport.upstream(keyed("http://localhost:9/v1")).unusable is None
    assert transport.pool.closed  # closed with the session whose resolver it uses


async def test_a_refused_host_fails_the_attempt_before_any_connection() -> None:
    allowed = AllowedUpstreams.parse("localhost")
    async with FakeUpstream() as up, relaying(keyed(up.base_url), allowed=allowed) as harness:
        status, _, body = await harness.post("/chat/completions", {"model": "m", "messages": []})
    assert status == FAILED and SETTING in json.loads(body)["reason"]  # 127.0.0.1, written out
    assert not up.requests


# -- what comes back -------------------------------------------------------------------------


async def test_usage_and_the_answers_model_are_found() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "one two"}]}
    async with FakeUpstream(name="a") as up, relaying(server(up.base_url)) as harness:
        await harness.post("/chat/completions", chat)
        await harness.post("/chat/completions", {**chat, "stream": True})
        await harness.post("/embeddings", {"model": "e", "input": ["x y z"]})
    plain, streamed, embedded = harness.calls
    assert plain.usage == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert streamed.usage == plain.usage  # asked for on the client's behalf
    assert embedded.usage == {"prompt_tokens": 3, "total_tokens": 3}
    assert (plain.answer_model, streamed.answer_model) == ("m", "m")


async def test_upstream_headers_worth_passing_are_passed_back() -> None:
    async with FakeUpstream(name="a") as up, relaying(server(up.base_url)) as harness:
        _, headers, _ = await harness.post("/chat/completions", {"model": "m", "messages": []})
    assert headers["x-request-id"] == "req-a-1"
    assert headers["x-ratelimit-remaining-requests"] == "999"
    assert "x-upstream-name" not in headers


async def test_a_stream_is_relayed_chunk_by_chunk() -> None:
    second = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"delta": {"content": "one"}}]}\n\n')
        await asyncio.wait_for(second.wait(), 5)  # the client must have the first one by then
        await response.write(b'data: {"choices": [{"delta": {"content": "two"}}]}\n\ndata: [DONE]\n\n')
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", stream)
    async with serving(upstream) as url, relaying(server(f"{url}/v1")) as harness:
        body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
        async with harness.http.post(f"{harness.url}/chat/completions", json=body) as response:
            first = await response.content.readuntil(b"\n\n")
            second.set()
            rest = await response.content.read()
    assert first == b'data: {"choices": [{"delta": {"content": "one"}}]}\n\n'
    assert rest.endswith(b"data: [DONE]\n\n")
    assert response.headers["Content-Type"] == "text/event-stream"


async def test_the_usage_chunk_asked_for_is_dropped_even_when_events_are_torn() -> None:
    events = [
        {"model": "m", "choices": [{"delta": {"content": "one"}}], "usage": None},
        {"model": "m", "choices": [{"delta": {"content": " two"}}], "usage": None},
        {"model": "m", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]
    wire = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for at in range(0, len(wire), 7):  # torn everywhere, the usage chunk too
            await response.write(wire[at : at + 7])
            await asyncio.sleep(0)
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", stream)
    async with serving(upstream) as url, relaying(server(f"{url}/v1")) as harness:
        _, _, relayed = await harness.post(
            "/chat/completions", {"model": "m", "messages": [], "stream": True}
        )
    assert relayed == wire.replace(b"data: " + json.dumps(events[2]).encode() + b"\n\n", b"")
    assert harness.calls[0].usage == {"prompt_tokens": 5, "completion_tokens": 2}


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429, 401, 403])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_statuses_that_fall_back_are_failures(status: int, stream: bool) -> None:
    async with FakeUpstream() as up, relaying(server(up.base_url)) as harness:
        up.fail(status)
        code, _, body = await harness.post(
            "/chat/completions", {"model": "m", "messages": [], "stream": stream}
        )
    failure = json.loads(body)
    assert code == FAILED and failure["status"] == status
    assert failure["refused"] is (status in (401, 403))
    assert failure["reason"].startswith(f"HTTP {status}")


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_other_client_errors_are_the_clients(status: int) -> None:
    async with FakeUpstream(name="a") as up, relaying(server(up.base_url)) as harness:
        up.fail(status)
        code, headers, body = await harness.post("/chat/completions", {"model": "m", "messages": []})
    assert code == status
    assert json.loads(body)["error"]["message"] == f"injected failure {status} from a"
    assert headers["x-switchboard-provider"] == "s"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_error_answer_that_echoes_the_key_has_it_masked(stream: bool) -> None:
    """A client's error is relayed as it is; some servers quote the request's headers in it,
    and a client with `completions` read the provider's key in the answer (docs/reference.md §2.4)."""

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        error = {"error": {"message": f"bad request; you sent {dict(request.headers)}"}}
        return web.json_response(error, status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    async with serving(app) as url, relaying(keyed(f"{url}/v1")) as harness:
        code, _, body = await harness.post(
            "/chat/completions", {"model": "m", "messages": [], "stream": stream}
        )
    assert code == 400 and b"you sent" in body
    assert CANARY.encode() not in body and b"Bearer ****" in body


def _reflecting(status: int, *, gzipped: bool = False) -> web.Application:
    """An upstream that reflects the request's key (docs/reference.md §2.4) in its body, a
    passed-back rate limit, its request id and its `Content-Type`, header names in mixed case."""

    async def reflect(request: web.Request) -> web.Response:
        await request.read()
        auth = request.headers["Authorization"]
        body = json.dumps({"id": "x", "choices": [], "echo": auth}).encode()
        headers = {
            "Content-Type": f"application/json; charset=utf-8; k={auth.split()[-1]}",
            "X-Request-Id": auth.split()[-1],
            "X-RateLimit-Remaining-Requests": auth,
            "x-ratelimit-limit-requests": "100",
        }
        if gzipped:
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        return web.Response(body=body, status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reflect)
    return app


@pytest.mark.parametrize("status", [200, 201, 400, 404])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_answer_of_any_status_that_reflects_the_key_has_it_masked(status: int, stream: bool) -> None:
    """Not only an error: a 200 body, the passed-back headers and the request id the upstream
    reflected the key in never carry it to the client (docs/reference.md §2.4)."""
    async with serving(_reflecting(status)) as url, relaying(keyed(f"{url}/v1")) as harness:
        code, headers, body = await harness.post(
            "/chat/completions", {"model": "m", "messages": [], "stream": stream}
        )
    assert code == status and b'"echo": "Bearer ****"' in body
    assert CANARY.encode() not in body and int(headers["Content-Length"]) == len(body)
    assert not any(CANARY in value for value in headers.values()), headers
    assert "x-request-id" not in headers and "x-ratelimit-remaining-requests" not in headers
    assert headers["x-ratelimit-limit-requests"] == "100"  # the others are passed back still
    assert headers["Content-Type"] == "application/json; charset=utf-8; k=****"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_placeholder_key_is_not_masked_in_what_the_model_wrote(stream: bool) -> None:
    """A key shorter than `MIN_REFLECTED` is a placeholder a local server takes or ignores
    (`ollama`, `EMPTY`), not a secret: the model's words that happen to be it are left as written."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "x", "choices": [{"message": {"content": "run ollama"}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    placeholder = ApiKey(
        kind="api_key", id="k", provider="openai", base_url="http://x/v1", api_key=Secret("ollama")
    )
    async with (
        serving(app) as url,
        relaying(placeholder.model_copy(update={"base_url": f"{url}/v1"})) as harness,
    ):
        code, _, body = await harness.post(
            "/chat/completions", {"model": "m", "messages": [], "stream": stream}
        )
    assert code == 200 and b"run ollama" in body


async def test_a_gzipped_answer_that_reflects_the_key_has_it_masked() -> None:
    async with serving(_reflecting(200, gzipped=True)) as url, relaying(keyed(f"{url}/v1")) as harness:
        code, headers, body = await harness.post("/chat/completions", {"model": "m", "messages": []})
    assert code == 200 and json.loads(body)["echo"] == "Bearer ****"
    assert "Content-Encoding" not in headers and CANARY.encode() not in body


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_encoding_that_reflects_the_key_is_not_named_in_the_failure(stream: bool) -> None:
    """The refusal of an encoding not asked for named the upstream's `Content-Encoding` (32
    characters of it): a reflected key went into the attempt's reason, the client's 502."""

    reasons = []
    for reflected in (True, False):

        async def reflect(request: web.Request, reflected: bool = reflected) -> web.Response:
            await request.read()
            coding = request.headers["Authorization"].split()[-1] if reflected else "br"
            headers = {"Content-Type": "application/json", "Content-Encoding": coding}
            return web.Response(body=b"{}", headers=headers)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", reflect)
        async with serving(app) as url, relaying(keyed(f"{url}/v1")) as harness:
            code, _, body = await harness.post(
                "/chat/completions", {"model": "m", "messages": [], "stream": stream}
            )
        assert code == FAILED
        reasons.append(json.loads(body)["reason"])
    assert reasons[0] == "the upstream's answer is in an encoding not asked for"
    assert reasons[1] == "the upstream's answer is in an encoding not asked for (br)"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream-answered-whole"])
async def test_a_model_name_that_reflects_the_key_is_no_label(stream: bool) -> None:
    """The model an answer names labels the metrics of a provider that declares none, and the
    spans: read from the masked answer, never the key (docs/reference.md §2.4)."""

    async def reflect(request: web.Request) -> web.Response:
        await request.read()
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        return web.json_response({"model": request.headers["Authorization"], "choices": [], "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reflect)
    async with serving(app) as url, relaying(keyed(f"{url}/v1")) as harness:
        code, _, body = await harness.post(
            "/chat/completions", {"model": "m", "messages": [], "stream": stream}
        )
    assert code == 200 and CANARY.encode() not in body
    assert harness.calls[0].answer_model == "Bearer ****"


def _torn_stream(wire: bytes, size: int) -> web.Application:
    """An upstream streaming `wire` torn in pieces of `size` bytes, each its own write."""

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for at in range(0, len(wire), size):
            await response.write(wire[at : at + size])
            await asyncio.sleep(0.002)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    return app


def _events(*contents: str) -> bytes:
    chunks = [{"choices": [{"delta": {"content": c}}]} for c in contents]
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [3, 7, 40, 4096])
@pytest.mark.parametrize("ends_with_it", [False, True], ids=["within", "at-the-end"])
async def test_a_stream_that_reflects_the_key_torn_across_chunks_has_it_masked(
    size: int, ends_with_it: bool
) -> None:
    """A key split between two chunks (or more) is held back and masked whole; text that only
    begins like the key goes out as it came, once the next chunk shows it is not the key."""
    wire = _events("one", f"you sent {CANARY} ok", "sk-canary-5e1f0c not it", "two")
    if ends_with_it:  # torn, the last bytes of the stream: held, masked, sent with its end
        wire += b"data: " + CANARY.encode()
    async with serving(_torn_stream(wire, size)) as url, relaying(keyed(f"{url}/v1")) as harness:
        body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
        _, _, relayed = await harness.post("/chat/completions", body)
    assert relayed == wire.replace(CANARY.encode(), b"****")


async def test_a_stream_whose_usage_chunk_is_dropped_has_the_key_masked_too() -> None:
    """The gateway asked for the usage chunk (`drop_usage`): whole events only, the key masked."""
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    wire = _events(f"key {CANARY}") + b"data: " + json.dumps(usage).encode() + b"\n\n"
    async with serving(_torn_stream(wire, 5)) as url, relaying(keyed(f"{url}/v1")) as harness:
        _, _, relayed = await harness.post(
            "/chat/completions", {"model": "m", "messages": [], "stream": True}
        )
    assert relayed == _events("key ****")
    assert harness.calls[0].usage == {"prompt_tokens": 5, "completion_tokens": 2}


async def test_an_https_upstream_whose_certificate_is_refused_fails_with_the_reason() -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)  # a CA the system does not know
    listening = await asyncio.start_server(lambda _, writer: writer.close(), "127.0.0.1", 0, ssl=context)
    port = listening.sockets[0].getsockname()[1]
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with relaying(server(f"https://127.0.0.1:{port}/v1")) as harness:
            status, _, body = await harness.post("/chat/completions", chat)
            stream_status, _, stream_body = await harness.post("/chat/completions", {**chat, "stream": True})
    finally:
        listening.close()
        await listening.wait_closed()
    assert status == stream_status == FAILED
    for answer in (body, stream_body):
        assert json.loads(answer)["reason"].startswith(
            "cannot connect: the upstream's TLS certificate is refused ("
        )


async def test_what_goes_wrong_on_the_way_is_described() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "a b c"}]}
    async with FakeUpstream() as up:
        async with relaying(server(closed_port_url())) as harness:
            _, _, refused = await harness.post("/chat/completions", chat)
        async with relaying(server(up.base_url, first_byte_timeout_s=0.1)) as harness:
            up.stall(5, times=1)
            _, _, stalled = await harness.post("/chat/completions", {**chat, "stream": True})
        async with relaying(server(up.base_url, timeout_s=0.1)) as harness:
            up.hang(5, times=1)
            _, _, slow = await harness.post("/chat/completions", chat)
            up.drop_after(1, times=1)
            _, _, cut = await harness.post("/chat/completions", chat)
        async with relaying(server(up.base_url), max_bytes=100) as harness:
            _, _, large = await harness.post("/chat/completions", chat)
    assert json.loads(refused)["reason"].startswith("cannot connect")
    assert json.loads(stalled)["reason"] == "no first byte within 0.1 s"
    assert json.loads(slow)["reason"] == "no whole answer within 0.1 s"
    assert json.loads(cut)["reason"].startswith("answer cut short")
    assert json.loads(large)["reason"] == "answer over 100 bytes"


async def test_a_stream_answered_whole_is_bounded_once_not_twice() -> None:
    """A server that ignores `stream` answers whole: its first chunk counts once against the bound."""

    async def answered(size: int) -> tuple[int, bytes, bytes]:
        answer = json.dumps({"choices": [{"message": {"content": "x" * size}}]}).encode()

        async def whole(request: web.Request) -> web.Response:
            return web.Response(body=answer, content_type="application/json")

        upstream = web.Application()
        upstream.router.add_post("/v1/chat/completions", whole)
        async with serving(upstream) as url, relaying(server(f"{url}/v1"), max_bytes=100) as harness:
            status, _, body = await harness.post("/chat/completions", {"model": "m", "stream": True})
        return status, body, answer

    status, body, answer = await answered(40)  # ~70 bytes: within the bound, counted once
    assert (status, body) == (200, answer)
    status, refused, _ = await answered(200)
    assert status == FAILED and json.loads(refused)["reason"] == "answer over 100 bytes"


async def test_a_changed_provider_file_never_sends_the_old_head() -> None:
    """The head made once per path belongs to the provider's version: a rotated key, a new
    base URL or a new `via` each send their own, never the head made for the old file."""
    async with FakeUpstream() as up, open_session() as session:
        transport = OpenAITransport(session)
        versions = [
            keyed(f"{up.url}/v1"),
            ApiKey(
                kind="api_key", id="k", provider="openai", base_url=f"{up.url}/v1", api_key=Secret("sk-new")
            ),
            ApiKey(
                kind="api_key", id="k", provider="openai", base_url=f"{up.url}/v2", api_key=Secret("sk-new")
            ),
        ]
        for provider in versions:
            target = transport.upstream(provider)
            for _ in range(2):  # the head made, then reused
                response = await transport.pool.post(
                    target.url("/chat/completions"), target.headers, b"{}", connect_s=5
                )
                await response.read(1 << 20)
    seen = [(r.path, r.headers["authorization"]) for r in up.requests]
    assert seen == [
        ("/v1/chat/completions", f"Bearer {CANARY}"),
        ("/v1/chat/completions", f"Bearer {CANARY}"),
        ("/v1/chat/completions", "Bearer sk-new"),
        ("/v1/chat/completions", "Bearer sk-new"),
        ("/v2/chat/completions", "Bearer sk-new"),
        ("/v2/chat/completions", "Bearer sk-new"),
    ]

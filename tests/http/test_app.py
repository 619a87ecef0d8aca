"""What every answer of the app holds to, whatever the route (docs/reference.md §6): 405 with `Allow`, 415 for
a body that is not JSON, `HEAD /` without a token, a malformed request logged as one line."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import pytest
from aiohttp import web
from aiohttp.abc import AbstractMatchInfo
from multidict import CIMultiDictProxy

from service.http import app as app_module
from service.http import gateway as gateway_module
from service.http.app import create_app
from service.http.context import RELAY
from service.http.openapi import document
from tests import conftest
from tests.conftest import Service, SopsProject, eventually, serve, write_routing, write_server
from tests.support.gateway import Switchboard, running, write_clients, write_provider
from tests.support.upstreams import FakeUpstream, closed_port_url

API = "/api/v1/llm-config"
TOKEN = "sb_app_every_scope_0f1e2d3c4b5a69788"
SCOPES = ("completions", "config:read", "config:write", "admin", "secrets:read")
MALFORMED = {"receive_timeout": 0, "send_timeout": 0, "malformed": 1}
"""The cuts once one request was too malformed to parse."""


@pytest.fixture
async def guarded(sops_project: SopsProject) -> Service:  # type: ignore[misc]
    """The service with a clients file: one token with every scope."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    write_clients(sops_project, {"ops": (TOKEN, SCOPES)})
    async with serve(sops_project) as service:
        yield service


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/healthz", {"GET", "HEAD"}),
        ("POST", f"{API}/active/chat", {"GET", "HEAD", "PUT"}),
        ("PROPFIND", f"{API}/providers", {"GET", "HEAD"}),
        ("GET", "/v1/chat/completions", {"POST"}),
    ],
)
async def test_a_method_the_path_does_not_take_is_405_with_allow(
    guarded: Service, method: str, path: str, allowed: set[str]
) -> None:
    """docs/reference.md §6: 405 with `Allow`, written as a write refused by the write mode
    writes it (`GET, HEAD`): the methods a comma and a space apart."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with guarded.http.request(method, guarded.url + path, headers=headers) as response:
        assert response.status == 405
        assert response.headers["Allow"] == ", ".join(sorted(allowed))
        assert (await response.json())["error"]["type"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/chat/completions", "text/plain"),
        ("/v1/chat/completions", None),
        ("/v1/chat/completions", "application/jsonx"),
        ("/v1/chat/completions", "text/json"),
        ("/v1/embeddings", "application/x-www-form-urlencoded"),
        (f"{API}/providers/gpu/test", "text/plain"),
        (f"{API}/servers", "application/xml"),
    ],
)
async def test_a_body_that_is_not_json_is_415(guarded: Service, path: str, content_type: str | None) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    async with guarded.http.post(
        guarded.url + path, data=body, headers=headers, skip_auto_headers=["Content-Type"]
    ) as response:
        assert response.status == 415, await response.text()
        error = (await response.json())["error"]
    assert error["type"] == "unsupported_media_type"
    assert "JSON" in error["message"]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
@pytest.mark.parametrize("path", [f"{API}/providers", "/v1/models", f"{API}/whoami"])
async def test_a_body_that_is_not_json_is_415_whatever_the_method(
    guarded: Service, method: str, path: str
) -> None:
    """docs/reference.md §6: a non-empty body whose type is not JSON is 415, a GET's too (it was
    answered 200); the same request without a body, or with a JSON one, is answered."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = guarded.url + path
    sent = headers | {"Content-Type": "text/plain"}
    async with guarded.http.request(method, url, data=b"hello", headers=sent) as response:
        if method == "OPTIONS":  # a method the path does not take stays a 405
            assert response.status == 405
            return
        assert response.status == 415, await response.text()
    async with guarded.http.request(method, url, headers=headers) as response:
        assert response.status == 200
    sent = headers | {"Content-Type": "application/json"}
    async with guarded.http.request(method, url, data=b"{}", headers=sent) as response:
        assert response.status == 200


async def test_a_get_with_a_text_body_is_415_without_authentication_too(sops_project: SopsProject) -> None:
    write_server(sops_project, "gpu")
    async with serve(sops_project) as service:
        url = service.url + f"{API}/providers"
        sent = {"Content-Type": "text/plain"}
        async with service.http.get(url, data=b"hello", headers=sent) as response:
            assert response.status == 415
            assert (await response.json())["error"]["type"] == "unsupported_media_type"
        async with service.http.get(url, headers={"Content-Length": "0", **sent}) as response:
            assert response.status == 200  # no body: nothing to judge


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
    ],
)
async def test_a_json_media_type_in_any_spelling_is_json(guarded: Service, content_type: str) -> None:
    """`application/json` as sent is taken without parsing it (`auth._json_typed`); the other
    spellings are parsed, and are JSON all the same."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    async with guarded.http.post(
        guarded.url + "/v1/chat/completions", data=body, headers=headers
    ) as response:
        assert response.status == 502, await response.text()  # past the check: the server "gpu" is down


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions"), ("POST", f"{API}/providers/gpu/test"), ("GET", f"{API}/providers")],
)
async def test_an_expectation_it_cannot_meet_is_417_in_the_json_of_every_error(
    guarded: Service, method: str, path: str
) -> None:
    """The router's expect handler runs before the middleware, and its 417 was aiohttp's text
    (`Unknown Expect: a-teapot`); errors are JSON (docs/reference.md §6), this one too."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Expect": "a-teapot"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with guarded.http.request(
        method, guarded.url + path, headers=headers, json=chat if method == "POST" else None
    ) as response:
        assert response.status == 417
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        error = (await response.json())["error"]
    assert error == {"type": "expectation_failed", "message": "Expectation Failed"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/v1/chat/completions", {}, 405),
        ("PUT", "/v1/messages", {}, 405),
        ("POST", "/v1/chat/completions", {"Expect": "a-teapot"}, 417),
        ("POST", "/v1/no-such-thing", {}, 404),
    ],
)
async def test_the_routers_answers_on_gateway_paths_carry_the_gateways_headers(
    guarded: Service, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    """docs/reference.md §7: each gateway answer carries `x-switchboard-provider` and
    `x-switchboard-attempts`; §13: every one an `x-request-id`. The router's 405, 404 and 417 on
    `/v1/` paths too (they carried none of them)."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    sent = {"Authorization": f"Bearer {TOKEN}", **headers}
    async with guarded.http.request(
        method, guarded.url + path, headers=sent, json=chat if method != "GET" else None
    ) as response:
        assert response.status == status
        assert response.headers["x-switchboard-provider"] == "none"
        assert response.headers["x-switchboard-attempts"] == "0"
        assert len(response.headers["x-request-id"]) == 32
        await response.read()


async def test_every_answer_forbids_sniffing(guarded: Service) -> None:
    """`nosniff` on every answer (docs/reference.md §6), whichever way it is made: by a handler, the
    middleware's errors (401, 404, 405, 415, 502), the router's expect handler (417), a stream."""
    token = {"Authorization": f"Bearer {TOKEN}"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    requests: list[tuple[str, str, dict[str, str], object]] = [
        ("GET", "/healthz", {}, None),
        ("GET", "/readyz", {}, None),
        ("GET", "/metrics", token, None),
        ("HEAD", "/", {}, None),
        ("GET", "/openapi.json", {}, None),
        ("GET", "/v1/models", token, None),
        ("GET", f"{API}/providers", token, None),
        ("POST", "/v1/chat/completions", token, chat),  # 502: the server "gpu" is not up
        ("POST", "/v1/chat/completions", {}, chat),  # 401
        ("POST", "/v1/chat/completions", token | {"Content-Type": "text/plain"}, "{}"),  # 415
        ("POST", "/v1/chat/completions", token | {"Expect": "100-continue"}, chat),
        ("POST", "/v1/chat/completions", token | {"Expect": "a-teapot"}, chat),  # 417
        ("GET", "/nowhere/%3Cscript%3E", token, None),  # 404
        ("DELETE", "/healthz", token, None),  # 405
    ]
    statuses = []
    for method, path, headers, body in requests:
        data = body if isinstance(body, str) else None
        json = body if isinstance(body, dict) else None
        async with guarded.http.request(
            method, guarded.url + path, headers=headers, data=data, json=json
        ) as response:
            statuses.append(response.status)
            assert response.headers.getall("X-Content-Type-Options") == ["nosniff"], (method, path)
    assert statuses == [200, 200, 200, 200, 200, 200, 200, 502, 401, 415, 502, 417, 404, 405]
    async with guarded.http.get(guarded.url + f"{API}/events", headers=token) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers.getall("X-Content-Type-Options") == ["nosniff"]


async def test_with_authentication_a_write_without_a_body_needs_no_media_type(guarded: Service) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with guarded.http.post(guarded.url + f"{API}/providers/gpu/test", headers=headers) as response:
        assert response.status == 200, await response.text()


async def test_the_token_is_checked_before_the_media_type(guarded: Service) -> None:
    async with guarded.http.post(
        guarded.url + "/v1/chat/completions", data=b"x", headers={"Content-Type": "text/plain"}
    ) as response:
        assert response.status == 401


def test_the_document_lists_415_wherever_it_can_be_answered() -> None:
    doc = document()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            refused = "415" in operation["responses"]
            if path.endswith("/hooks/git"):  # signed by the git host: its body is the host's
                assert not refused, path
            else:  # behind a token, whatever the method (a GET's body too)
                assert refused == bool(operation["security"]), (method, path)


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_the_root_needs_no_token(guarded: Service, method: str) -> None:
    async with guarded.http.request(method, guarded.url + "/") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    "header",
    [
        b"X-Trace: a\x00b",
        b"Authorization: Bearer sk-secret-in-a-bad-header\x00",
        b"X\x00Name: value",
        b"X-Long: " + b"a" * 70_000,
    ],
)
@pytest.mark.parametrize(
    "line", [b"GET /healthz", b"POST /v1/chat/completions", b"POST /v1/messages?beta=true"]
)
async def test_a_malformed_header_is_answered_and_logged_without_its_bytes(
    guarded: Service, header: bytes, line: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own answer quoted the bytes (a token in them) as plain text: it is the
    service's JSON error now, naming the fault only, and one line in the log; counted as a cut,
    `malformed`, on the connection the fast path handed to aiohttp (in no route's count). On a
    gateway path it carries the gateway's headers, and on Anthropic's Messages paths it comes in
    Anthropic's shape, as every error there (docs/reference.md §14)."""
    host = guarded.url.removeprefix("http://")
    request = line + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Length: 2\r\n" + header
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection(*host.split(":"))
    try:
        writer.write(request + b"\r\n\r\n{}")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # and the connection closed
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0]
    fields = {k.lower(): v.strip() for k, _, v in (f.partition(b":") for f in head.split(b"\r\n")[1:])}
    assert fields[b"content-type"].startswith(b"application/json")
    assert fields[b"x-content-type-options"] == b"nosniff"
    answered = json.loads(body)
    error = answered["error"]
    if b"/v1/messages" in line:
        assert answered["type"] == "error" and error["type"] == "invalid_request_error"
    else:
        assert error["type"] == "bad_request"
    assert error["message"].startswith("malformed request: ")
    if b"/v1/" in line:
        assert (fields[b"x-switchboard-provider"], fields[b"x-switchboard-attempts"]) == (b"none", b"0")
        assert re.fullmatch(rb"[0-9a-f]{32}", fields[b"x-request-id"])  # every gateway answer has one
    assert b"sk-secret" not in answer and b"\\x00" not in answer and b"aaaa" not in answer
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(records) == 1, [r.getMessage() for r in records]
    (record,) = records
    assert record.levelno == logging.WARNING
    assert record.exc_info is None and record.exc_text is None
    text = record.getMessage()
    assert "\n" not in text and text.startswith("malformed request from 127.0.0.1")
    assert "sk-secret" not in text and "\\x00" not in text and "aaaa" not in text
    assert await guarded.cuts() == MALFORMED
    assert await guarded.metric("switchboard_http_requests_total", status="400") == 0


async def test_a_request_line_that_is_not_http_is_logged_without_its_bytes_at_debug_level_too(
    guarded: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp logs a connection's first request line that is not HTTP (TLS, a port scan) at
    debug level only, with a traceback quoting the line: with `SWITCHBOARD_LOG_LEVEL=DEBUG`, a
    token in it was in the log. It is the one line naming the fault, at debug level still."""
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection(*guarded.url.removeprefix("http://").split(":"))
    try:
        writer.write(b"sk-secret-in-a-request-line /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert b" 400 " in answer.split(b"\r\n")[0] and b"sk-secret" not in answer
    assert "sk-secret" not in caplog.text
    assert all(r.exc_info is None and "sk-secret" not in r.getMessage() for r in caplog.records)
    (line,) = [r for r in caplog.records if r.name == "service.http.protocol"]
    assert line.levelno == logging.DEBUG
    assert line.getMessage().startswith("malformed request from 127.0.0.1: BadHttpMethod")
    assert await guarded.cuts() == MALFORMED


@pytest.mark.parametrize("path", ["/healthz", "/v1/chat/completions"])
async def test_a_body_that_cannot_be_decoded_and_is_not_read_is_one_warning_line(
    guarded: Service, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """`Content-Encoding: gzip` over bytes that are not: a request answered without its body
    (405, 401) left aiohttp reading it after the answer, which logged the decoding's failure as an
    unhandled exception (an ERROR and a traceback, at a client's will). One warning line now."""
    reader, writer = await asyncio.open_connection(*guarded.url.removeprefix("http://").split(":"))
    try:
        writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-secret-token\r\n"
            b"Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 15\r\n\r\n"
        )
        await asyncio.sleep(0.1)  # the body after its answer
        writer.write(b"sk-secret-token")
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith((b"HTTP/1.1 405 ", b"HTTP/1.1 401 ")), answer[:40]
    await eventually(lambda: any(r.name == "service.http.protocol" for r in caplog.records))
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.WARNING, None)], caplog.text
    assert records[0].getMessage().startswith("malformed request from ?: ContentEncodingError")
    assert "sk-secret" not in caplog.text


async def test_the_gateways_routes_skip_the_router_and_answer_as_it_would(
    guarded: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`POST /v1/...` is taken before the router (`gateway.Gateway`): the same answer, headers,
    metrics and error shape as the router's way; a request with `Expect`, another method or
    another path still goes the router's way."""
    resolved = _counting_resolves(guarded.app, monkeypatch)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    answers = []
    for path, extra in [
        ("/v1/chat/completions", {}),
        ("/v1/chat/completions", {"Expect": "100-continue"}),  # the router's expect handler
        ("/v1/embeddings", {}),
    ]:
        async with guarded.http.post(guarded.url + path, json=body, headers=headers | extra) as response:
            answers.append((response.status, dict(response.headers), await response.json()))
    assert resolved == ["POST /v1/chat/completions"]  # only the one with `Expect`
    (fast, fast_headers, fast_body), (usual, usual_headers, usual_body), embeddings = answers
    assert (fast, fast_body) == (usual, usual_body) == (502, fast_body)  # the server "gpu" is not up
    changing = {"X-Request-ID", "Date"}
    assert {k: v for k, v in fast_headers.items() if k not in changing} == {
        k: v for k, v in usual_headers.items() if k not in changing
    }
    assert fast_headers["X-Content-Type-Options"] == "nosniff" and len(fast_headers["X-Request-ID"]) == 32
    assert embeddings[0] == 404 and embeddings[2]["error"]["type"] == "model_not_found"
    assert embeddings[1]["X-Content-Type-Options"] == "nosniff"
    resolved.clear()
    no_token = {"Content-Type": "application/json"}
    async with guarded.http.post(
        guarded.url + "/v1/chat/completions", json=body, headers=no_token
    ) as response:
        assert response.status == 401 and (await response.json())["error"]["type"] == "unauthorized"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    async with guarded.http.post(
        guarded.url + "/v1/chat/completions/", json=body, headers=headers
    ) as response:
        assert response.status == 404 and (await response.json())["error"]["type"] == "not_found"
    assert resolved == ["POST /v1/chat/completions/"]
    async with guarded.http.get(guarded.url + "/metrics", headers=headers) as response:
        text = await response.text()
    route = 'switchboard_http_requests_total{method="POST",route="/v1/chat/completions",status="%s"}'
    assert route % 502 + " 2.0" in text and route % 401 + " 1.0" in text
    assert 'route="/v1/embeddings",status="404"} 1.0' in text


GATEWAY_TOKEN = "sb_app_gateway_only_0f1e2d3c4b5a6978"
READER_TOKEN = "sb_app_reader_only_0f1e2d3c4b5a69788"


@pytest.fixture
async def gateway(sops_project: SopsProject) -> AsyncIterator[Switchboard]:
    """A gateway with a clients file, a 2 KiB body limit, a provider up (`fake-model`) and one
    down (`down-model`)."""
    async with FakeUpstream(name="a") as up:
        _write_gateway(sops_project, up)
        async with running(sops_project, max_body_bytes=2048) as board:
            yield board


def _write_gateway(project: SopsProject, up: FakeUpstream) -> None:
    write_provider(project, "a", base_url=up.base_url, models=["fake-model"])
    write_provider(project, "b", base_url=closed_port_url(), models=["down-model"])
    write_routing(project, chat=["a", "b"])
    write_clients(
        project, {"app": (GATEWAY_TOKEN, ["completions"]), "reader": (READER_TOKEN, ["config:read"])}
    )


def _chat(model: str = "fake-model", **fields: object) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def _too_long() -> Any:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read after the head, past the limit
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        yield b"y" * 4096
        yield b'"}]}'

    return chunks()


_BEARER = {"Authorization": f"Bearer {GATEWAY_TOKEN}", "Content-Type": "application/json"}
_GZIP = _BEARER | {"Content-Encoding": "gzip", "Connection": "close"}  # one broken ends the connection
_CASES: list[tuple[str, str, dict[str, str], Any, int]] = [
    ("ok", "/v1/chat/completions", _BEARER, _chat, 200),
    ("ok, Messages", "/v1/messages", _BEARER, lambda: _chat(max_tokens=5), 200),
    ("no token", "/v1/chat/completions", {"Content-Type": "application/json"}, _chat, 401),
    ("no token, Messages", "/v1/messages", {"Content-Type": "application/json"}, _chat, 401),
    ("unknown token", "/v1/embeddings", _BEARER | {"Authorization": "Bearer sb_nobody"}, _chat, 401),
    ("no scope", "/v1/rerank", _BEARER | {"Authorization": f"Bearer {READER_TOKEN}"}, _chat, 403),
    ("not JSON", "/v1/chat/completions", _BEARER | {"Content-Type": "text/plain"}, _chat, 415),
    ("Content-Length past the limit", "/v1/chat/completions", _BEARER, lambda: b" " * 4096 + _chat(), 413),
    ("inflated past the limit", "/v1/responses", _GZIP, lambda: gzip.compress(b" " * 4096 + _chat()), 413),
    ("read past the limit", "/v1/chat/completions", _BEARER, _too_long, 413),
    ("gzip that is not", "/v1/chat/completions", _GZIP, lambda: b"\x1f\x8b not gzip at all", 400),
    ("gzip that is not, Messages", "/v1/messages", _GZIP, lambda: b"\x1f\x8b not gzip", 400),
    ("not JSON text", "/v1/chat/completions", _BEARER, lambda: b"{not json", 400),
    ("an array", "/v1/completions", _BEARER, lambda: b"[1, 2]", 400),
    ("model not a string", "/v1/chat/completions", _BEARER, lambda: b'{"model": 1}', 400),
    ("names differing in case", "/v1/embeddings", _BEARER, lambda: b'{"model": "m", "MODEL": "n"}', 400),
    ("no messages, Messages", "/v1/messages", _BEARER, lambda: b'{"model": "fake-model"}', 400),
    ("no prompt", "/v1/completions", _BEARER, lambda: b'{"model": "fake-model"}', 400),
    ("no such model", "/v1/chat/completions", _BEARER, lambda: _chat("nothing"), 404),
    ("no such model, Messages", "/v1/messages", _BEARER, lambda: _chat("nothing", max_tokens=5), 404),
    ("every upstream down", "/v1/chat/completions", _BEARER, lambda: _chat("down-model"), 502),
]


@pytest.mark.parametrize(("case", "path", "headers", "body", "status"), _CASES, ids=[c[0] for c in _CASES])
async def test_a_gateway_route_answers_as_the_router_and_middleware_would(
    gateway: Switchboard,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    path: str,
    headers: dict[str, str],
    body: Any,
    status: int,
) -> None:
    """A gateway route run as one coroutine (`gateway.Gateway` with an `Endpoint`) answers every
    kind of request as the router's way does (`Expect: 100-continue` takes it, through the
    `answer_errors` middleware, `answering`, `scoped` and the relaying handler): the same status, body
    and headers, the gateway's `x-request-id`, provider and attempts headers where that way has
    them, `nosniff`, and the same metrics."""
    resolved = _counting_resolves(gateway.app, monkeypatch)
    answers = []
    for extra in ({}, {"Expect": "100-continue"}):
        async with gateway.http.post(gateway.url + path, data=body(), headers=headers | extra) as response:
            answers.append((response.status, response.headers.copy(), await response.read()))
    assert resolved == [f"POST {path}"]  # only the one with `Expect` went through the router
    (fast, fast_headers, fast_body), (usual, usual_headers, usual_body) = answers
    assert (fast, fast_body) == (usual, usual_body) and fast == status, (fast, fast_body)

    def kept(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
        # what changes from one request to the next: the date, the request id, the upstream's count
        changing = ("x-request-id", "date", "x-ratelimit-")
        return sorted((k, v) for k, v in headers.items() if not k.lower().startswith(changing))

    assert kept(fast_headers) == kept(usual_headers)
    assert fast_headers.getall("X-Content-Type-Options") == ["nosniff"]
    assert len(fast_headers.getall("X-Request-ID", [])) == len(usual_headers.getall("X-Request-ID", []))
    assert fast_headers["X-Request-ID"] and fast_headers["x-switchboard-provider"]
    text = await gateway.metrics()
    route = 'switchboard_http_requests_total{method="POST",route="%s",status="%d"} 2.0'
    assert route % (path, status) in text


_COULD_NOT_READ = "the body could not be read: ContentEncodingError"
_UNREADABLE = [
    ("/v1/chat/completions", {"error": {"type": "bad_request", "message": _COULD_NOT_READ}}),
    ("/v1/responses", {"error": {"type": "bad_request", "message": _COULD_NOT_READ}}),
    ("/v1/embeddings", {"error": {"type": "bad_request", "message": _COULD_NOT_READ}}),
    (
        "/v1/messages",
        {"type": "error", "error": {"type": "invalid_request_error", "message": _COULD_NOT_READ}},
    ),
    (
        "/v1/messages/count_tokens",
        {"type": "error", "error": {"type": "invalid_request_error", "message": _COULD_NOT_READ}},
    ),
]


@pytest.mark.parametrize(("path", "error"), _UNREADABLE, ids=[p for p, _ in _UNREADABLE])
async def test_a_body_that_cannot_be_decoded_is_a_gateway_error_in_the_protocols_shape(
    gateway: Switchboard, path: str, error: dict[str, Any]
) -> None:
    """Gzip that is not (the server cannot decode the body) on a gateway route is the gateway's
    400 as every other refusal of it is (docs/reference.md §6.4, §13.3): in the protocol's shape
    (Anthropic's on `/v1/messages`), with `x-request-id`, `x-switchboard-provider: none` and
    `x-switchboard-attempts: 0`; on the gateway's own way as on the router's (`Expect`)."""
    for extra in ({}, {"Expect": "100-continue"}):
        async with gateway.http.post(
            gateway.url + path, data=b"\x1f\x8b not gzip at all", headers=_GZIP | extra
        ) as response:
            assert response.status == 400, extra
            assert await response.json() == error, extra
            headers = response.headers
            assert headers["x-switchboard-provider"] == "none" and headers["x-switchboard-attempts"] == "0"
            assert len(headers["X-Request-ID"]) == 32
            assert headers.getall("X-Content-Type-Options") == ["nosniff"]


_INTERNAL = "internal error; see the service log"


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/v1/chat/completions", {"error": {"type": "internal_error", "message": _INTERNAL}}),
        ("/v1/messages", {"type": "error", "error": {"type": "api_error", "message": _INTERNAL}}),
    ],
)
async def test_a_bug_on_a_gateway_route_is_the_gateways_500(
    gateway: Switchboard,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    error: dict[str, Any],
) -> None:
    """An exception no handler meant (a bug) is logged with its traceback and answered 500
    `internal_error` with no detail, as every error of the gateway is (docs/reference.md §6.4,
    §13.3): in the protocol's shape, with `x-request-id` and the provider/attempts headers; on the
    gateway's own way as on the router's (`Expect`)."""

    def broken(*args: object) -> NoReturn:
        raise RuntimeError("a bug, with sk-secret in it")

    monkeypatch.setattr(gateway.app[RELAY], "relay", broken)
    answers = []
    for extra in ({}, {"Expect": "100-continue"}):
        async with gateway.http.post(
            gateway.url + path, data=_chat(max_tokens=5), headers=_BEARER | extra
        ) as response:
            answers.append((response.status, response.headers.copy(), await response.read()))
    (fast, fast_headers, fast_body), (usual, usual_headers, usual_body) = answers
    assert fast == usual == 500 and fast_body == usual_body
    assert json.loads(fast_body) == error and b"sk-secret" not in fast_body
    assert sorted(fast_headers.keys()) == sorted(usual_headers.keys())
    for headers in (fast_headers, usual_headers):
        assert headers["x-switchboard-provider"] == "none" and headers["x-switchboard-attempts"] == "0"
        assert len(headers["X-Request-ID"]) == 32
        assert headers.getall("X-Content-Type-Options") == ["nosniff"]
    logged = [r for r in caplog.records if r.getMessage() == f"unhandled error on POST {path}"]
    assert len(logged) == 2 and all(r.exc_info is not None for r in logged)
    route = 'switchboard_http_requests_total{method="POST",route="%s",status="500"} 2.0'
    assert route % path in await gateway.metrics()


def _counting_resolves(app: web.Application, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The requests `app`'s router resolves from now on (`METHOD /path`), as they come."""
    router = app.router
    resolved: list[str] = []
    resolve = router.resolve

    async def counting(request: web.Request) -> AbstractMatchInfo:
        resolved.append(f"{request.method} {request.path}")
        return await resolve(request)

    monkeypatch.setattr(router, "resolve", counting)
    return resolved


async def test_a_gateway_answer_carries_nosniff_without_the_prepare_signal(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While `nosniff` is the only receiver of `on_response_prepare`, an endpoint's answers (whole,
    streamed, refused) are not sent through it: each has `nosniff` already, once. Any other answer
    is (`/healthz`, `/v1/models`, a gateway route taken by the router). Fails on an aiohttp that
    finds the signals to send other than through the match's apps: the signal would be sent."""
    sent: list[str] = []

    async def counted(request: web.Request, response: web.StreamResponse) -> None:
        sent.append(f"{request.method} {request.path}")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")

    monkeypatch.setattr(app_module, "nosniff", counted)  # the receiver the app is given
    monkeypatch.setattr(gateway_module, "nosniff", counted)  # the one `Gateway` looks for
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    async with FakeUpstream(name="a") as up:
        _write_gateway(sops_project, up)
        async with running(sops_project) as board:
            sent.clear()  # /readyz, asked while the service started
            answers = []
            for path, body, extra in [
                ("/v1/chat/completions", chat, {}),
                ("/v1/chat/completions", chat | {"stream": True}, {}),
                ("/v1/messages", chat | {"max_tokens": 5}, {}),
                ("/v1/chat/completions", chat | {"model": "down-model"}, {}),  # 502
                ("/v1/embeddings", chat, {"Authorization": f"Bearer {READER_TOKEN}"}),  # 403
                ("/v1/chat/completions", chat, {"Expect": "100-continue"}),  # the router's way
            ]:
                headers = _BEARER | extra
                async with board.http.post(board.url + path, json=body, headers=headers) as response:
                    await response.read()
                    answers.append((response.status, response.headers.getall("X-Content-Type-Options")))
            async with board.http.get(board.url + "/healthz") as response:
                assert response.headers.getall("X-Content-Type-Options") == ["nosniff"]
            async with board.http.get(board.url + "/v1/models", headers=_BEARER) as response:
                assert response.headers.getall("X-Content-Type-Options") == ["nosniff"]
    assert answers == [(s, ["nosniff"]) for s in (200, 200, 200, 502, 403, 200)]
    assert sent == ["POST /v1/chat/completions", "GET /healthz", "GET /v1/models"]


async def test_another_prepare_receiver_is_sent_the_gateways_answers_too(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app given a receiver of `on_response_prepare` besides `nosniff` (before it starts) sends
    it every answer, those of the gateway's own way included."""
    seen: list[tuple[str, int]] = []

    async def receiver(request: web.Request, response: web.StreamResponse) -> None:
        seen.append((request.path, response.status))

    def created(*args: Any, **kwargs: Any) -> web.Application:
        app = create_app(*args, **kwargs)
        app.on_response_prepare.append(receiver)
        return app

    monkeypatch.setattr(conftest, "create_app", created)
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    async with FakeUpstream(name="a") as up:
        _write_gateway(sops_project, up)
        async with running(sops_project) as board:
            seen.clear()  # /readyz, asked while the service started
            for body in (chat, chat | {"stream": True}, chat | {"model": "nothing"}):
                async with board.http.post(
                    board.url + "/v1/chat/completions", json=body, headers=_BEARER
                ) as r:
                    await r.read()
                    assert r.headers.getall("X-Content-Type-Options") == ["nosniff"]
    assert seen == [
        ("/v1/chat/completions", 200),
        ("/v1/chat/completions", 200),
        ("/v1/chat/completions", 404),
    ]

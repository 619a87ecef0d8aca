"""No upstream request follows a redirect (docs/reference.md §7): not the gateway's, not the checks', not the
models lists', not litellm's. An upstream answering 3xx to another host must never bring the
provider's key (`Authorization`, `x-api-key`, `x-goog-api-key`) or the client's prompt there."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from service.gateway.transports.base import open_session
from service.gateway.transports.guard import RedirectRefused
from service.http.context import HEALTH
from tests.conftest import SopsProject, eventually
from tests.support.gateway import CANARY, running, write_provider, write_routing
from tests.support.upstreams import FakeUpstream, serving

# litellm's own types warn about pydantic internals while it works; warnings are errors here.
pytestmark = pytest.mark.filterwarnings(r"ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")

REDIRECTS = (301, 302, 303, 307, 308)


def _redirecting(to: str, status: int) -> web.Application:
    """An upstream that answers every request with `status` to the same path on `to`."""

    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, headers={"Location": to + request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


@contextlib.asynccontextmanager
async def _redirect_to_other_host(status: int = 302) -> AsyncIterator[tuple[str, FakeUpstream]]:
    """(the redirecting upstream's root URL, the host it sends clients to, recording)."""
    async with FakeUpstream(name="elsewhere") as elsewhere:
        # `localhost` is another origin than 127.0.0.1: aiohttp keeps x-api-key across that hop
        other = f"http://localhost:{elsewhere.port}"
        async with serving(_redirecting(other, status)) as url:
            yield url, elsewhere


def _never_reached(elsewhere: FakeUpstream) -> None:
    assert not elsewhere.requests, [(r.method, r.path, sorted(r.headers)) for r in elsewhere.requests]


# -- the gateway ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", REDIRECTS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_redirect_from_an_upstream_is_a_failure_never_followed(
    sops_project: SopsProject, status: int, stream: bool
) -> None:
    async with _redirect_to_other_host(status) as (url, elsewhere), FakeUpstream(name="backup") as backup:
        write_provider(sops_project, "moved", base_url=f"{url}/v1", api_key=CANARY, provider="openai")
        write_provider(sops_project, "backup", base_url=backup.base_url)
        write_routing(sops_project, chat={"primary": "moved", "fallbacks": ["backup"]})
        async with running(sops_project) as board:
            response = await board.chat("a secret prompt", stream=stream)
            text = await response.text()
            alone = await board.post(
                "/v1/chat/completions",
                {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": stream},
            )
    _never_reached(elsewhere)
    assert response.status == 200, text
    assert response.headers["x-switchboard-provider"] == "backup"
    assert response.headers["x-switchboard-attempts"] == "2"
    assert alone.status == 200


async def test_a_redirect_with_no_fallback_is_a_502_naming_it(sops_project: SopsProject) -> None:
    async with _redirect_to_other_host(307) as (url, elsewhere):
        write_provider(sops_project, "moved", base_url=f"{url}/v1", api_key=CANARY, provider="openai")
        write_routing(sops_project, chat="moved")
        async with running(sops_project) as board:
            response = await board.chat("hi")
            body = await response.json()
    _never_reached(elsewhere)
    assert response.status == 502
    assert body["error"]["attempts"] == [
        {"provider": "moved", "status": 307, "reason": "HTTP 307: a redirect, not followed"}
    ]


async def test_a_tei_rerank_is_not_redirected(sops_project: SopsProject) -> None:
    async with _redirect_to_other_host(307) as (url, elsewhere):
        write_provider(sops_project, "tei", server_type="tei", base_url=url, purposes=["reranking"])
        write_routing(sops_project, reranking="tei")
        async with running(sops_project) as board:
            response = await board.post("/v1/rerank", {"model": "m", "query": "q", "documents": ["a"]})
    _never_reached(elsewhere)
    assert response.status == 502


# -- health checks and models lists ----------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["anthropic", "gemini", "openai"])
async def test_a_models_check_is_not_redirected_and_fails(sops_project: SopsProject, vendor: str) -> None:
    """The periodic check of an Anthropic or Gemini provider sent `x-api-key` / `x-goog-api-key`
    to the host a 302 named, every interval, and took its answer for the provider's health."""
    async with _redirect_to_other_host(302) as (url, elsewhere):
        write_provider(sops_project, "keyed", provider=vendor, base_url=url, api_key=CANARY)
        write_routing(sops_project, chat="keyed")
        async with running(sops_project, health_interval_s=0.05) as board:

            def checked() -> None:
                assert board.app[HEALTH].get("keyed").status == "unhealthy"

            await eventually(checked)
            test = await board.post("/api/v1/llm-config/providers/keyed/test", {})
            result = await test.json()
    _never_reached(elsewhere)
    assert result["ok"] is False
    assert result["message"] == "HTTP 302: a redirect, not followed"


async def test_a_servers_models_list_is_not_redirected(sops_project: SopsProject) -> None:
    async with _redirect_to_other_host(301) as (url, elsewhere):
        write_provider(sops_project, "gpu", base_url=f"{url}/v1", api_key=CANARY)
        async with running(sops_project) as board:
            response = await board.get("/api/v1/llm-config/servers/gpu/models")
            body = await response.json()
    _never_reached(elsewhere)
    assert response.status == 502
    assert body["error"]["attempts"][0]["reason"] == "HTTP 301: a redirect, not followed"


async def test_the_session_stops_a_redirect_a_call_forgot_to_refuse() -> None:
    """The net under every call: a request made without `allow_redirects=False` still does not
    follow (`RedirectRefused`), and nothing reaches the other host."""
    async with _redirect_to_other_host(307) as (url, elsewhere), open_session() as session:
        with pytest.raises(RedirectRefused, match="307"):
            await session.post(f"{url}/v1/chat/completions", data=b"{}", headers={"x-api-key": CANARY})
    _never_reached(elsewhere)


# -- the litellm path ----------------------------------------------------------------------------------

LITELLM_CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("anthropic", "chat", "/v1/chat/completions", {"max_tokens": 10}),
    ("anthropic", "chat", "/v1/chat/completions", {"max_tokens": 10, "stream": True}),
    ("gemini", "chat", "/v1/chat/completions", {}),
    ("gemini", "chat", "/v1/chat/completions", {"stream": True}),
    ("gemini", "embeddings", "/v1/embeddings", {"input": "a secret text"}),
    ("cohere", "chat", "/v1/chat/completions", {}),
    ("cohere", "embeddings", "/v1/embeddings", {"input": ["a secret text"]}),
    ("cohere", "reranking", "/v1/rerank", {"query": "q", "documents": ["a"]}),
]


@pytest.mark.parametrize(("vendor", "purpose", "path", "body"), LITELLM_CASES)
async def test_litellm_follows_no_redirect(
    sops_project: SopsProject, vendor: str, purpose: str, path: str, body: dict[str, Any]
) -> None:
    async with _redirect_to_other_host(307) as (url, elsewhere):
        write_provider(
            sops_project, "vendor", provider=vendor, base_url=url, api_key=CANARY, purposes=[purpose]
        )
        write_routing(sops_project, **{purpose: "vendor"})
        async with running(sops_project) as board:
            if purpose == "chat":
                body = {"messages": [{"role": "user", "content": "a secret prompt"}], **body}
            response = await board.post(path, {"model": "m1", **body})
            text = await response.text()
    _never_reached(elsewhere)
    assert response.status == 502, text
    assert CANARY not in text


async def test_a_redirect_aiohttp_would_follow_keeps_the_key_without_the_guard() -> None:
    """Why it matters: aiohttp drops `Authorization` across origins, but not `x-api-key`."""
    async with (
        _redirect_to_other_host(302) as (url, elsewhere),
        aiohttp.ClientSession() as plain,
        plain.get(f"{url}/v1/models", headers={"x-api-key": CANARY}) as response,
    ):
        await response.read()
    assert elsewhere.requests and elsewhere.requests[0].headers["x-api-key"] == CANARY


PROTOCOL_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("anthropic", "/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "a secret"}]}),
    (
        "anthropic",
        "/v1/messages",
        {"max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]},
    ),
    ("openai", "/v1/responses", {"input": "a secret prompt"}),
    ("openai", "/v1/responses", {"input": "a secret prompt", "stream": True}),
    ("openai", "/v1/completions", {"prompt": "a secret prompt"}),
]


@pytest.mark.parametrize(("vendor", "path", "body"), PROTOCOL_CASES)
async def test_a_native_protocol_request_follows_no_redirect(
    sops_project: SopsProject, vendor: str, path: str, body: dict[str, Any]
) -> None:
    """Messages, Responses and legacy completions sent as they are keep reference §7's rule."""
    async with _redirect_to_other_host(307) as (url, elsewhere):
        base = url if vendor == "anthropic" else f"{url}/v1"
        write_provider(sops_project, "native", provider=vendor, base_url=base, api_key=CANARY)
        write_routing(sops_project, chat="native")
        async with running(sops_project) as board:
            response = await board.post(path, {"model": "m1", **body})
            text = await response.text()
    _never_reached(elsewhere)
    assert response.status == 502, text
    assert CANARY not in text

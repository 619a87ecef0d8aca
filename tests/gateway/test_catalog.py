"""Listing a provider's models: in its vendor's protocol, read within limits, never raising."""

from __future__ import annotations

from aiohttp import web

from service.config.models import AiServer
from service.config.secret import Secret
from service.gateway.catalog import MAX_MODELS_BYTES, list_models
from service.gateway.transports.base import open_session
from tests.conftest import SopsProject
from tests.support.gateway import CANARY, running, write_provider
from tests.support.upstreams import FakeUpstream, serving


def _server(url: str) -> AiServer:
    return AiServer(kind="ai_server", id="s", server_type="vllm", base_url=url)


def _answering(body: bytes, *, chunked: bool = False) -> web.Application:
    async def models(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for at in range(0, len(body), 1 << 20):
            await response.write(body[at : at + (1 << 20)])
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    return app


async def test_models_are_listed() -> None:
    async with FakeUpstream(models=("m1", "m2")) as up, open_session() as session:
        listed = await list_models(_server(up.base_url), session)
    assert listed.models == ["m1", "m2"]


async def test_a_model_id_that_reflects_the_key_is_not_listed() -> None:
    """A models list is shown to clients (`/v1/models`, `…/servers/{id}/models`): an id holding
    the provider's key (an upstream that reflects the request's headers) is left out
    (docs/reference.md §2.4)."""

    async def models(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        return web.json_response({"data": [{"id": "m1"}, {"id": key}, {"id": f"ft:{key}:x"}, {"id": "m2"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    async with serving(app) as url, open_session() as session:
        server = AiServer(
            kind="ai_server", id="s", server_type="vllm", base_url=f"{url}/v1", api_key=Secret(CANARY)
        )
        listed = await list_models(server, session)
    assert listed.models == ["m1", "m2"]


async def test_a_list_nested_too_deep_is_not_json() -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    async with serving(_answering(nested)) as url, open_session() as session:
        listed = await list_models(_server(f"{url}/v1"), session)
    assert (listed.models, listed.reason) == (None, "the models endpoint did not answer JSON")


async def test_a_list_over_the_limit_is_not_read() -> None:
    big = b'{"data": [' + b'{"id": "m"},' * (MAX_MODELS_BYTES // 12) + b'{"id": "m"}]}'
    async with open_session() as session:
        for chunked in (False, True):  # with a Content-Length, and without one
            async with serving(_answering(big, chunked=chunked)) as url:
                listed = await list_models(_server(f"{url}/v1"), session)
            assert listed.models is None
            assert listed.reason == f"models list answer over {MAX_MODELS_BYTES} bytes"


async def test_a_hostile_models_list_is_a_failed_check_not_a_500(sops_project: SopsProject) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    async with serving(_answering(nested)) as url:
        write_provider(sops_project, "hostile", base_url=f"{url}/v1")
        async with running(sops_project) as board:
            tested = await board.post("/api/v1/llm-config/providers/hostile/test", {})
            result = await tested.json()
            models = await board.get("/api/v1/llm-config/servers/hostile/models")
    assert tested.status == 200 and result["ok"] is False
    assert result["message"] == "the models endpoint did not answer JSON"
    assert models.status == 502

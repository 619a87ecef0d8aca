"""A placeholder key (under 8 characters) is not looked for in what the upstream sends
back (c3a82f7, docs/reference.md §2.4): through litellm, a refusal keeps its words too."""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.conftest import SopsProject
from tests.support.gateway import running, write_provider, write_routing
from tests.support.upstreams import serving

pytestmark = pytest.mark.filterwarnings(r"ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")

PLACEHOLDER = "none"


async def test_a_refusal_through_litellm_keeps_a_placeholder_keys_word(sops_project: SopsProject) -> None:
    async def messages(request: web.Request) -> web.Response:
        await request.read()
        error = {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "tool_choice none is not allowed with tools=[]",
            },
        }
        return web.json_response(error, status=400)

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    async with serving(app) as url:
        write_provider(sops_project, "claude", provider="anthropic", base_url=url, api_key=PLACEHOLDER)
        write_routing(sops_project, chat="claude")
        async with running(sops_project) as board:
            response = await board.chat("hi", max_tokens=10)
            body = await response.text()
    assert response.status == 400, body
    assert "tool_choice none is not allowed" in body, body

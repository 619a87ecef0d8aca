"""The allowed upstreams, held at connect time (docs/reference.md §7): by the gateway, the health checks, the
models lists and litellm alike. A refused connection fails at once, naming the setting; what
a name resolves to is checked when the connection is made, so re-pointing it gains nothing."""

from __future__ import annotations

import time

import pytest

from service.config.models import AiServer
from service.config.upstreams import SETTING, AllowedUpstreams
from service.gateway.catalog import list_models
from service.gateway.transports.base import open_session
from service.http.context import HEALTH
from tests.conftest import SopsProject, eventually
from tests.support.dns import Dns
from tests.support.gateway import CANARY, running, write_provider, write_routing
from tests.support.upstreams import FakeUpstream

# litellm's own types warn about pydantic internals while it works; warnings are errors here.
pytestmark = pytest.mark.filterwarnings(r"ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")


@pytest.mark.parametrize(
    "base_url",
    [
        "http://169.254.169.254/v1",
        "http://[fe80::1]:8000/v1",
        "http://[::ffff:169.254.169.254]/v1",
        "http://[::ffff:a9fe:a9fe]/v1",
        "http://2852039166/v1",  # 169.254.169.254, spelled as one number
        "http://0251.0376.0251.0376/v1",  # in octal
        "http://metadata.test/v1",  # a name that resolves there
        "http://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/v1",  # fullwidth
        "http://169\u3002254\u3002169\u3002254/v1",  # ideographic full stops
    ],
)
async def test_unset_the_metadata_service_is_never_reached(sops_project: SopsProject, base_url: str) -> None:
    """Cloud metadata hands out the machine's credentials to whoever asks from it: a provider
    file (or a write) naming it must not make the gateway ask, with its key or the prompt."""
    dns = Dns({"metadata.test": ["169.254.169.254"]})
    write_provider(
        sops_project, "meta", base_url=base_url, api_key=CANARY, provider="openai", connect_timeout_s=30
    )
    write_routing(sops_project, chat="meta")
    async with running(sops_project, lookup=dns) as board:
        started = time.monotonic()
        response = await board.chat("hi")
        took = time.monotonic() - started
        body = await response.json()
    assert response.status == 502
    [attempt] = body["error"]["attempts"]
    assert SETTING in attempt["reason"], attempt
    assert took < 5  # at once: not a connection left to time out


async def test_a_list_of_names_refuses_an_address_and_allows_the_name(sops_project: SopsProject) -> None:
    """`localhost` listed: the same server is refused as 127.0.0.1 and served as localhost."""
    async with FakeUpstream(name="by-address") as by_address, FakeUpstream(name="by-name") as by_name:
        write_provider(sops_project, "address", base_url=by_address.base_url)
        write_provider(sops_project, "name", base_url=f"http://localhost:{by_name.port}/v1")
        write_routing(sops_project, chat={"primary": "address", "fallbacks": ["name"]})
        async with running(sops_project, allowed_upstreams="localhost") as board:
            response = await board.chat("hi")
            metrics = await board.metrics()
    assert response.status == 200 and response.headers["x-switchboard-provider"] == "name"
    assert not by_address.requests and len(by_name.requests) == 1
    assert CANARY not in metrics


async def test_a_listed_network_is_reached_and_others_are_not(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="gpu") as up:
        dns = Dns({"gpu.test": ["10.9.9.9", "127.0.0.1"]})  # the first address is not listed
        write_provider(sops_project, "gpu", base_url=f"http://gpu.test:{up.port}/v1")
        write_provider(sops_project, "zero", base_url=f"http://0.0.0.0:{up.port}/v1")
        write_routing(sops_project, chat={"primary": "zero", "fallbacks": ["gpu"]})
        async with running(sops_project, lookup=dns, allowed_upstreams="127.0.0.0/8") as board:
            response = await board.chat("hi")
            text = await response.text()
    assert response.status == 200, text
    assert response.headers["x-switchboard-provider"] == "gpu"  # 0.0.0.0 is not 127.0.0.0/8
    assert len(up.requests) == 1


async def test_checks_and_models_lists_are_refused_with_the_reason(sops_project: SopsProject) -> None:
    async with FakeUpstream(name="gpu") as up:
        write_provider(sops_project, "gpu", base_url=up.base_url, api_key=CANARY)
        write_provider(sops_project, "claude", provider="anthropic", base_url=up.url, api_key=CANARY)
        write_routing(sops_project, chat={"primary": "gpu", "fallbacks": ["claude"]})
        async with running(sops_project, allowed_upstreams="10.0.0.0/8", health_interval_s=0.05) as board:

            def checked() -> None:
                assert board.app[HEALTH].get("gpu").status == "unhealthy"
                assert board.app[HEALTH].get("claude").status == "unhealthy"

            await eventually(checked)
            models = await board.get("/api/v1/llm-config/servers/gpu/models")
            listed = await models.json()
            test = await board.post("/api/v1/llm-config/providers/claude/test", {})
            tested = await test.json()
    assert not up.requests  # neither the checks nor the list reached it
    assert models.status == 502 and SETTING in listed["error"]["attempts"][0]["reason"]
    assert tested["ok"] is False and SETTING in tested["message"]


async def test_a_request_after_a_refused_check_is_a_503_that_names_the_setting(
    sops_project: SopsProject,
) -> None:
    """With health checks on (as `serve` runs), the first check is refused and opens the
    circuit, so a request finds no candidate to try: its 503 still says why (docs/reference.md
    §7: a request refused by the rule fails at once, its reason naming the setting), each
    provider skipped with its reason."""
    async with FakeUpstream(name="gpu") as up:
        write_provider(sops_project, "gpu", base_url=up.base_url, models=["m"])
        write_routing(sops_project, chat="gpu")
        async with running(sops_project, allowed_upstreams="10.0.0.0/8", health_interval_s=30) as board:
            await eventually(lambda: board.app[HEALTH].get("gpu").status == "unhealthy")
            response = await board.chat("hi", model="m")
            error = (await response.json())["error"]
    assert not up.requests
    assert response.status == 503 and error["type"] == "no_candidate"
    refused = f"refused by {SETTING}: the upstream's address is not listed"
    assert error["skipped"] == [{"provider": "gpu", "reason": "circuit_open", "health": refused}]
    assert SETTING in error["message"]
    assert "127.0.0.1" not in str(error)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_requests_directly_and_through_litellm_are_refused_with_the_reason(
    sops_project: SopsProject, stream: bool
) -> None:
    async with FakeUpstream(name="gpu") as up, FakeUpstream(protocol="anthropic", name="claude") as claude:
        write_provider(sops_project, "gpu", base_url=up.base_url, api_key=CANARY)
        write_provider(sops_project, "claude", provider="anthropic", base_url=claude.url, api_key=CANARY)
        write_routing(sops_project, chat={"primary": "gpu", "fallbacks": ["claude"]})
        async with running(sops_project, allowed_upstreams="10.0.0.0/8, api.example.com") as board:
            chat = await board.chat("hi", max_tokens=5, stream=stream)
            answered = await chat.json()
    assert not up.requests and not claude.requests
    assert chat.status == 502
    reasons = {a["provider"]: a["reason"] for a in answered["error"]["attempts"]}
    refused = f"refused by {SETTING}: the upstream's address is not listed"
    assert reasons == {"gpu": refused, "claude": refused}  # claude's through litellm
    assert "127.0.0.1" not in str(answered)  # the provider's address is not the client's to learn


async def test_list_models_is_refused_outside_the_list() -> None:
    async with FakeUpstream() as up, open_session(AllowedUpstreams.parse("localhost")) as session:
        server = AiServer(kind="ai_server", id="s", server_type="vllm", base_url=up.base_url)
        listed = await list_models(server, session)
    assert listed.models is None and SETTING in listed.reason
    assert not up.requests

"""Without authentication the service serves only this machine's programs (docs/reference.md §6): no DNS
rebinding (421 for a Host that is not a loopback name) and no forged form (JSON media type)."""

from __future__ import annotations

import pytest

from tests.conftest import Service, SopsProject, serve, write_server
from tests.support.gateway import write_clients

API = "/api/v1/llm-config"


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:8080", "app.localhost", "127.9.9.9"]
)
async def test_loopback_names_are_served(running_service: Service, host: str) -> None:
    async with running_service.http.get(
        running_service.url + API + "/active", headers={"Host": host}
    ) as response:
        assert response.status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "10.0.0.1", "localhost.evil.example"])
async def test_another_host_is_421_whatever_resolves_to_here(running_service: Service, host: str) -> None:
    async with running_service.http.get(
        running_service.url + API + "/active", headers={"Host": host}
    ) as response:
        assert response.status == 421
        assert (await response.json())["error"]["type"] == "misdirected_request"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/ui/"),
        ("HEAD", "/"),
        ("GET", "/no-such-path"),
        ("POST", f"{API}/hooks/git"),
    ],
)
async def test_without_authentication_no_endpoint_answers_another_host(
    running_service: Service, method: str, path: str
) -> None:
    """The public endpoints too (docs/reference.md §6): a page that rebinds its name to 127.0.0.1
    reads nothing, not the provider ids `/metrics` names nor the readiness `/readyz` tells."""
    url = running_service.url + path
    async with running_service.http.request(method, url, headers={"Host": "evil.example"}) as response:
        assert response.status == 421
        if method != "HEAD":
            assert (await response.json())["error"]["type"] == "misdirected_request"
    async with running_service.http.request(method, url, headers={"Host": "localhost"}) as response:
        assert response.status not in (421, 500)


async def test_with_authentication_probes_answer_any_host(sops_project: SopsProject) -> None:
    write_server(sops_project, "gpu")
    write_clients(sops_project, {"ops": ("sb_probe-token-0123456789", ["config:read"])})
    async with serve(sops_project) as service:
        for path in ("/readyz", "/healthz", "/metrics"):
            async with service.http.get(service.url + path, headers={"Host": "lb.internal"}) as response:
                assert response.status == 200, path


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_a_state_changing_request_a_page_could_forge_is_refused(
    running_service: Service, content_type: str
) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    for path in ("/v1/chat/completions", f"{API}/providers/gpu/test"):
        async with running_service.http.post(
            running_service.url + path, data=body, headers={"Content-Type": content_type}
        ) as response:
            assert response.status == 415, path
            error = (await response.json())["error"]
            assert error["type"] == "unsupported_media_type"
            assert "JSON media type" in error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"{API}/providers/gpu/test"),
        ("DELETE", f"{API}/servers/gpu"),
        ("PUT", f"{API}/active/chat"),
        ("PATCH", f"{API}/servers/gpu"),
        ("POST", "/v1/chat/completions"),
    ],
)
async def test_without_authentication_a_write_without_a_json_media_type_is_415_body_or_not(
    running_service: Service, method: str, path: str
) -> None:
    async with running_service.http.request(method, running_service.url + path) as response:
        assert response.status == 415, await response.text()
        assert (await response.json())["error"]["type"] == "unsupported_media_type"
    # The same request with the media type gets past the check (to whatever it is answered then).
    headers = {"Content-Type": "application/json"}
    async with running_service.http.request(method, running_service.url + path, headers=headers) as response:
        assert response.status != 415

"""Bearer tokens and scopes against a real served app (SPEC 2.3, 6): who may call, and what."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from service.http.auth import is_loopback
from service.http.context import PREFIX
from tests.conftest import Service, SopsProject, eventually, serve, write_routing, write_server
from tests.support.gateway import write_clients

READER, ADMIN = "tok-reader-0123456789", "tok-admin-9876543210"
PROVIDERS = f"{PREFIX}/providers"
AUDIT = f"{PREFIX}/audit"


async def call(service: Service, path: str, authorization: str | None = None) -> tuple[int, Any]:
    """GET `path` with this exact Authorization header (none when None)."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with service.http.get(service.url + path, headers=headers) as response:
        return response.status, await response.json()


def error(status: int, kind: str, message: str) -> tuple[int, Any]:
    return status, {"error": {"type": kind, "message": message}}


@pytest.fixture
def project(sops_project: SopsProject) -> SopsProject:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    return sops_project


def with_clients(project: SopsProject) -> SopsProject:
    write_clients(project, {"reader": (READER, ["config:read"]), "auditor": (ADMIN, ["admin"])})
    return project


async def test_without_a_clients_file_loopback_needs_no_token(project: SopsProject) -> None:
    async with serve(project) as service:
        assert (await call(service, PROVIDERS))[0] == 200
        assert (await call(service, AUDIT))[0] == 200
        assert (await call(service, PROVIDERS, "Bearer anything-at-all"))[0] == 200


async def test_a_missing_or_malformed_authorization_is_401(project: SopsProject) -> None:
    missing = error(401, "unauthorized", "missing bearer token (Authorization: Bearer TOKEN)")
    async with serve(with_clients(project)) as service:
        for header in (None, "", READER, f"Basic {READER}", "Bearer", "Bearer    "):
            assert await call(service, PROVIDERS, header) == missing, header


async def test_an_unknown_token_is_401_and_a_known_one_passes(project: SopsProject) -> None:
    async with serve(with_clients(project)) as service:
        assert await call(service, PROVIDERS, "Bearer tok-wrong") == error(
            401, "unauthorized", "unknown token"
        )
        assert (await call(service, PROVIDERS, f"Bearer {READER}"))[0] == 200
        assert (await call(service, PROVIDERS, f"bearer  {READER} "))[0] == 200  # scheme case, spaces


async def test_a_token_is_found_by_its_hash_and_the_hash_is_no_token(project: SopsProject) -> None:
    text = with_clients(project).providers.joinpath("clients.yaml").read_text()
    stored = hashlib.sha256(READER.encode()).hexdigest()
    assert stored in text and READER not in text
    async with serve(project) as service:
        assert (await call(service, PROVIDERS, f"Bearer {READER}"))[0] == 200
        assert await call(service, PROVIDERS, f"Bearer {stored}") == error(
            401, "unauthorized", "unknown token"
        )


async def test_a_token_without_the_scope_is_403_naming_the_client_and_scope(project: SopsProject) -> None:
    async with serve(with_clients(project)) as service:
        assert await call(service, AUDIT, f"Bearer {READER}") == error(
            403, "forbidden", "client 'reader' lacks the scope 'admin'"
        )
        assert await call(service, PROVIDERS, f"Bearer {ADMIN}") == error(
            403, "forbidden", "client 'auditor' lacks the scope 'config:read'"
        )
        assert (await call(service, AUDIT, f"Bearer {ADMIN}"))[0] == 200


async def test_a_clients_file_added_while_running_turns_authentication_on(project: SopsProject) -> None:
    async with serve(project) as service:
        assert (await call(service, PROVIDERS))[0] == 200
        with_clients(project)

        async def guarded() -> None:
            assert (await call(service, PROVIDERS))[0] == 401

        await eventually(guarded)
        assert (await call(service, PROVIDERS, f"Bearer {READER}"))[0] == 200


async def test_a_clients_file_that_never_loaded_fails_closed(project: SopsProject) -> None:
    (project.providers / "clients.yaml").write_text("kind: clients\nclients:\n  - name: ops\n")
    async with serve(project) as service:
        assert await call(service, PROVIDERS) == error(
            401, "unauthorized", "authentication is required but no valid clients file is loaded"
        )
        assert (await service.text("/healthz"))[0] == 200  # probes stay open


async def test_off_loopback_without_a_clients_file_every_scoped_request_is_refused(
    project: SopsProject,
) -> None:
    async with serve(project, host="0.0.0.0") as service:  # noqa: S104 - the setting, not the bind
        assert await call(service, PROVIDERS) == error(
            401, "unauthorized", "authentication is required but no valid clients file is loaded"
        )
        assert (await service.text("/readyz"))[0] == 200


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback

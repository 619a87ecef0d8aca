"""Bearer tokens and scopes against a real served app (docs/reference.md §2.3, §6): who may call, and what."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from service.cli.serve import has_clients_file
from service.http import auth
from service.http.auth import is_loopback
from service.http.context import PREFIX
from tests.conftest import (
    Service,
    SopsProject,
    eventually,
    serve,
    write_atomically,
    write_routing,
    write_server,
)
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


async def test_a_401_carries_the_bearer_challenge_on_every_path(project: SopsProject) -> None:
    """RFC 9110 asks a challenge of every 401; RFC 6750 says which, and `invalid_token` when a
    token was given and is not known: the configuration API, the gateway (on its own fast path)
    and Anthropic's Messages (`x-api-key`) alike."""
    plain = 'Bearer realm="switchboard"'
    invalid = 'Bearer realm="switchboard", error="invalid_token"'
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with serve(with_clients(project)) as service:
        for method, path, headers, challenge in [
            ("GET", PROVIDERS, {}, plain),
            ("GET", PROVIDERS, {"Authorization": "Bearer tok-wrong"}, invalid),
            ("POST", "/v1/chat/completions", {}, plain),
            ("POST", "/v1/chat/completions", {"Authorization": "Bearer tok-wrong"}, invalid),
            ("POST", "/v1/messages", {"x-api-key": "tok-wrong"}, invalid),
        ]:
            body = chat if method == "POST" else None
            async with service.http.request(method, service.url + path, headers=headers, json=body) as answer:
                assert answer.status == 401, (path, headers)
                assert answer.headers.getall("WWW-Authenticate") == [challenge], (path, headers)
        async with service.http.get(
            service.url + PROVIDERS, headers={"Authorization": f"Bearer {READER}"}
        ) as ok:
            assert ok.status == 200 and "WWW-Authenticate" not in ok.headers


@pytest.mark.parametrize(
    "header", [b"Authorization: Bearer \xff\xfe-token", b"Authorization: Bearer tok-\xc0", b"x-api-key: \xff"]
)
async def test_a_token_that_is_no_utf8_is_an_unknown_token_not_a_500(
    project: SopsProject, header: bytes
) -> None:
    """Header bytes that are no UTF-8 reach the handler as lone surrogates, which hashing the
    token could not encode: "No input makes the service answer 500" (docs/reference.md §6)."""
    async with serve(with_clients(project)) as service:
        host, port = service.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET {PROVIDERS} HTTP/1.1\r\nHost: {host}\r\n".encode() + header + b"\r\n")
            writer.write(b"Connection: close\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), answer
    assert json.loads(body) == {"error": {"type": "unauthorized", "message": "unknown token"}}


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


async def test_a_token_revoked_or_rescoped_in_the_clients_file_is_refused_at_once(
    project: SopsProject,
) -> None:
    """A token is hashed once per clients file: the next file, once loaded, is the one asked."""
    async with serve(with_clients(project)) as service:
        for _ in range(2):  # the second is found without hashing the token again
            assert (await call(service, PROVIDERS, f"Bearer {READER}"))[0] == 200
            assert (await call(service, AUDIT, f"Bearer {ADMIN}"))[0] == 200
        write_clients(
            project, {"auditor": (ADMIN, ["config:read"]), "new": ("tok-new-0123456789", ["admin"])}
        )

        async def loaded() -> None:
            assert (await call(service, AUDIT, "Bearer tok-new-0123456789"))[0] == 200

        await eventually(loaded)
        assert await call(service, PROVIDERS, f"Bearer {READER}") == error(
            401, "unauthorized", "unknown token"
        )
        assert await call(service, AUDIT, f"Bearer {ADMIN}") == error(
            403, "forbidden", "client 'auditor' lacks the scope 'admin'"
        )
        assert (await call(service, PROVIDERS, f"Bearer {ADMIN}"))[0] == 200


async def test_unknown_tokens_leave_nothing_behind(project: SopsProject) -> None:
    """What is remembered of tokens holds at most one per client: a caller sending token after
    token grows nothing (the memo is looked at directly: nothing else shows it)."""
    async with serve(with_clients(project)) as service:
        assert (await call(service, PROVIDERS, f"Bearer {READER}"))[0] == 200
        for n in range(50):
            assert (await call(service, PROVIDERS, f"Bearer tok-random-{n}"))[0] == 401
        assert (await call(service, AUDIT, f"Bearer {ADMIN}"))[0] == 200
        clients, known = service.app[auth.KNOWN_TOKENS]._last
        assert clients is service.registry.snapshot.clients
        assert {client.name for client in known.values()} == {"reader", "auditor"}
        assert len(known) == 2


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
            503, "not_ready", "authentication is required but no valid clients file is loaded (see /readyz)"
        )
        assert (await service.text("/healthz"))[0] == 200  # probes stay open


async def test_off_loopback_without_a_clients_file_every_scoped_request_is_refused(
    project: SopsProject,
) -> None:
    async with serve(project, host="0.0.0.0") as service:  # noqa: S104 - the setting, not the bind
        assert await call(service, PROVIDERS) == error(
            503, "not_ready", "authentication is required but no valid clients file is loaded (see /readyz)"
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


# -- it is the kind that counts, and it fails closed --

API = "/api/v1/llm-config"
TOKEN = "sb_test-token-0123456789"


def clients_yaml(*scopes: str) -> str:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    entry = f"  - name: ops\n    token_sha256: {digest}\n    scopes: [{', '.join(scopes)}]\n"
    return f"kind: clients\nclients:\n{entry}"


BAD_SCOPE = clients_yaml("root")  # fails its schema
BROKEN_YAML = "kind: clients\nclients: [\n"  # fails to parse at all


async def status(service: Service, token: str | None = None) -> int:
    return (await service.get(f"{API}/providers", token))[0]


async def readyz(service: Service) -> dict[str, object]:
    code, body = await service.get("/readyz")
    assert code == 200
    return dict(body)


async def test_a_clients_file_of_any_name_refused_at_the_first_load_keeps_every_endpoint_closed(
    sops_project: SopsProject,
) -> None:
    write_server(sops_project, "gpu")
    write_atomically(sops_project.providers / "team-tokens.yaml", BAD_SCOPE)
    async with serve(sops_project) as service:
        assert await status(service) == 503
        assert await status(service, TOKEN) == 503
        body = await readyz(service)
        assert body["degraded"] is True
        assert [r["file"] for r in body["refused"]] == ["providers.d/team-tokens.yaml"]  # type: ignore[attr-defined]
        assert (await service.text("/healthz"))[0] == 200

        write_atomically(sops_project.providers / "team-tokens.yaml", clients_yaml("config:read"))

        async def good() -> None:
            assert await status(service, TOKEN) == 200

        await eventually(good)
        assert await status(service) == 401
        assert (await readyz(service))["degraded"] is False


async def test_a_clients_file_whose_yaml_is_broken_counts_by_the_kind_its_text_declares(
    sops_project: SopsProject,
) -> None:
    write_server(sops_project, "gpu")
    write_atomically(sops_project.providers / "auth.yml", BROKEN_YAML)
    async with serve(sops_project) as service:
        assert await status(service) == 503


async def test_a_clients_file_broken_or_removed_later_keeps_the_last_good_clients(
    sops_project: SopsProject,
) -> None:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project) as service:
        assert await status(service) == 200  # no clients file: loopback, no authentication
        path = write_atomically(sops_project.providers / "access.yaml", clients_yaml("config:read"))

        async def closed() -> None:
            assert await status(service) == 401

        await eventually(closed)
        write_atomically(path, BAD_SCOPE)
        await eventually(lambda: service.registry.refused.get("providers.d/access.yaml"))
        assert (await status(service), await status(service, TOKEN)) == (401, 200)

        path.unlink()

        async def removed() -> None:
            assert "removed" in (service.registry.refused.get("providers.d/access.yaml") or "")

        await eventually(removed)
        assert (await status(service), await status(service, TOKEN)) == (401, 200)
        assert (await readyz(service))["degraded"] is True


async def test_a_clients_file_refused_before_any_good_one_keeps_authentication_on_after_it_goes(
    running_service: Service,
) -> None:
    service = running_service
    path = write_atomically(service.project.providers / "late.yaml", BAD_SCOPE)

    async def unavailable() -> None:
        assert await status(service) == 503

    await eventually(unavailable)
    path.unlink()
    await eventually(lambda: service.registry.refused == {})
    assert await status(service) == 503  # the mode was set once a clients file was seen


def test_serve_on_a_folder_it_cannot_list_starts_failing_closed_not_with_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve` on a public address looks for a clients file first: a folder that cannot be
    listed (mode 300) ended it with `Permission denied`, so a replica restarted in a loop
    instead of starting not ready until the folder can be listed (docs/reference.md §4). It
    counts as holding one, as a file that cannot be read does: the service fails closed. As
    root, whom no mode stops, listing it fails as the OS fails it for another user."""
    folder = tmp_path / "providers.d"
    folder.mkdir()
    real_listdir = os.listdir

    def listdir(path: Any = ".") -> list[str]:
        if os.fspath(path) == os.fspath(folder):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_listdir(path)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "listdir", listdir)
    folder.chmod(0o300)
    try:
        assert has_clients_file(folder)
    finally:
        folder.chmod(0o755)


def test_serve_finds_the_clients_file_by_its_kind_not_its_name(tmp_path: Path) -> None:
    folder = tmp_path / "providers.d"
    folder.mkdir()
    (folder / "clients.yaml").write_text("kind: routing\npurposes: {}\n")
    assert not has_clients_file(folder)
    (folder / "tokens.yml").write_text(clients_yaml("admin"))
    assert has_clients_file(folder)
    (folder / "tokens.yml").unlink()
    (folder / "broken.yaml").write_text(BROKEN_YAML)
    assert has_clients_file(folder)
    (folder / "broken.yaml").write_text("kind: ai_server\nid: [\n")
    assert not has_clients_file(folder)

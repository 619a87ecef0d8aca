"""Authentication goes by the clients file's kind, fails closed, and is never turned off once on."""

from __future__ import annotations

import hashlib
from pathlib import Path

from service.cli.serve import has_clients_file
from tests.conftest import (
    Service,
    SopsProject,
    eventually,
    serve,
    write_atomically,
    write_routing,
    write_server,
)

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

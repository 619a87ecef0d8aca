"""A second routing or clients file, on a running service and at the first load (docs/reference.md
§2.2, §2.3, §4): the file applied stays, the newcomer is refused and said so; before one is
applied, none is taken over the others."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import (
    Service,
    SopsProject,
    eventually,
    serve,
    write_atomically,
    write_routing,
    write_server,
)
from tests.support.gateway import clients_text

TOKEN, OTHER = "sb_one-of-a-kind-0123456789", "sb_the-newcomer-9876543210"
PROVIDERS = "/api/v1/llm-config/providers"


def clients_yaml(name: str, token: str) -> str:
    return clients_text({name: (token, ["config:read"])})


def routing_yaml(*primary: str) -> str:
    return f"kind: routing\npurposes:\n  chat:\n    primary: [{', '.join(primary)}]\n"


# The newcomer's name sorts before the applied file's: it was the applied file that was refused.
FILES = {
    "routing": ("routing.yaml", "routing-two.yaml"),
    "clients": ("clients.yaml", "aaa.yaml"),
}


def rejected(service: Service) -> list[tuple[str | None, str]]:
    return [(e.file, e.reason or "") for e in service.events() if e.type == "config.rejected"]


async def refused(service: Service) -> dict[str, str]:
    status, body = await service.get("/readyz", TOKEN)
    assert status == 200
    return {r["file"]: r["reason"] for r in body["refused"]}


@pytest.mark.parametrize("kind", list(FILES))
async def test_a_second_file_is_refused_and_the_one_applied_stays(
    sops_project: SopsProject, kind: str
) -> None:
    applied, newcomer = (f"providers.d/{name}" for name in FILES[kind])
    write_server(sops_project, "gpu")
    write_server(sops_project, "spare")
    write_routing(sops_project, ["gpu"])
    write_atomically(sops_project.providers / "clients.yaml", clients_yaml("ops", TOKEN))
    async with serve(sops_project) as service:
        before = service.registry.snapshot
        second: dict[str, Any] = {
            "routing": routing_yaml("spare"),
            "clients": clients_yaml("intruder", OTHER),
        }
        write_atomically(sops_project.root / newcomer, second[kind])

        async def listed() -> None:
            assert list(await refused(service)) == [newcomer]

        await eventually(listed)
        reason = (await refused(service))[newcomer]
        assert f"more than one {kind} file: {applied} is the {kind} file applied, and stays" in reason
        assert rejected(service) == [(newcomer, reason)]  # the newcomer named, once
        snapshot = service.registry.snapshot
        assert snapshot.file_of_kind(kind) == applied
        assert snapshot.routing == before.routing and snapshot.clients == before.clients
        assert (await service.get(PROVIDERS, OTHER))[0] == 401  # the newcomer's token is nobody's

        # The rest of the configuration is not held back by it: a change beside it applies.
        write_server(sops_project, "third")
        await eventually(lambda: "third" in service.registry.snapshot.providers)
        assert list(await refused(service)) == [newcomer]
        assert len(rejected(service)) == 1

        # Removing it clears the refusal; removing the applied one instead makes it the one.
        (sops_project.root / newcomer).unlink()
        await eventually(lambda: service.registry.refused == {})
        assert (await service.get("/readyz"))[1]["degraded"] is False


async def test_the_applied_routing_file_removed_leaves_the_newcomer_applied(
    sops_project: SopsProject,
) -> None:
    write_server(sops_project, "gpu")
    write_server(sops_project, "spare")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project) as service:
        write_atomically(sops_project.providers / "routing-two.yaml", routing_yaml("spare"))
        await eventually(lambda: list(service.registry.refused) == ["providers.d/routing-two.yaml"])
        (sops_project.providers / "routing.yaml").unlink()

        def moved() -> None:
            routing = service.registry.snapshot.routing
            assert routing is not None and routing.purposes["chat"].primary == ["spare"]

        await eventually(moved)
        assert service.registry.refused == {}
        assert service.registry.snapshot.file_of_kind("routing") == "providers.d/routing-two.yaml"


async def test_two_routing_files_at_the_first_load_are_both_refused(sops_project: SopsProject) -> None:
    """Which one is meant cannot be told: taking the first by name could send a purpose's
    requests where nobody decided; none routes until one is left, and /readyz says why."""
    write_server(sops_project, "gpu")
    write_server(sops_project, "spare")
    write_routing(sops_project, ["gpu"])
    write_atomically(sops_project.providers / "routing-two.yaml", routing_yaml("spare"))
    async with serve(sops_project) as service:
        found = await refused(service)
        assert sorted(found) == ["providers.d/routing-two.yaml", "providers.d/routing.yaml"]
        one, two = "providers.d/routing.yaml", "providers.d/routing-two.yaml"
        assert f"{one} also defines `kind: routing`" in found[two]
        assert f"{two} also defines `kind: routing`" in found[one]
        assert sorted(f for f, _ in rejected(service)) == sorted(found)
        assert service.registry.snapshot.routing is None
        assert set(service.registry.snapshot.providers) == {"gpu", "spare"}  # the rest applies

        (sops_project.providers / "routing-two.yaml").unlink()

        def routed() -> None:
            routing = service.registry.snapshot.routing
            assert routing is not None and routing.purposes["chat"].primary == ["gpu"]

        await eventually(routed)
        assert service.registry.refused == {}


async def test_two_clients_files_at_the_first_load_keep_every_protected_endpoint_closed(
    sops_project: SopsProject,
) -> None:
    write_server(sops_project, "gpu")
    write_atomically(sops_project.providers / "clients.yaml", clients_yaml("ops", TOKEN))
    write_atomically(sops_project.providers / "aaa.yaml", clients_yaml("intruder", OTHER))
    async with serve(sops_project) as service:
        assert (await service.get(PROVIDERS, TOKEN))[0] == 503  # fails closed, for both tokens
        assert (await service.get(PROVIDERS, OTHER))[0] == 503
        assert sorted(await refused(service)) == ["providers.d/aaa.yaml", "providers.d/clients.yaml"]

        (sops_project.providers / "aaa.yaml").unlink()

        async def opened() -> None:
            assert (await service.get(PROVIDERS, TOKEN))[0] == 200

        await eventually(opened)
        assert (await service.get(PROVIDERS, OTHER))[0] == 401


@pytest.mark.parametrize("kind", list(FILES))
async def test_a_restart_keeps_the_file_the_log_says_was_applied(
    sops_project: SopsProject, kind: str
) -> None:
    """The newcomer left in place must not turn a restart into an outage (no route, every
    protected endpoint closed): the event log says which file was applied, and it stays."""
    applied, newcomer = (f"providers.d/{name}" for name in FILES[kind])
    write_server(sops_project, "gpu")
    write_server(sops_project, "spare")
    write_routing(sops_project, ["gpu"])
    write_atomically(sops_project.providers / "clients.yaml", clients_yaml("ops", TOKEN))
    async with serve(sops_project) as service:
        second = {"routing": routing_yaml("spare"), "clients": clients_yaml("intruder", OTHER)}
        write_atomically(sops_project.root / newcomer, second[kind])
        await eventually(lambda: list(service.registry.refused) == [newcomer])
        before = service.registry.snapshot
    async with serve(sops_project) as service:  # the same folder and the same log
        assert list(await refused(service)) == [newcomer]
        snapshot = service.registry.snapshot
        assert snapshot.file_of_kind(kind) == applied
        assert (snapshot.routing, snapshot.clients) == (before.routing, before.clients)
        assert (await service.get(PROVIDERS, TOKEN))[0] == 200
        assert (await service.get(PROVIDERS, OTHER))[0] == 401

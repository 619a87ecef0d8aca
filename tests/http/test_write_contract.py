"""Writes over HTTP against docs/reference.md §8, promise by promise: the commit each verb makes
(message, author, trailer, reason), the answers (201 and `Location`, 200, 202, 412, 422), the
event the write leaves, and the branch a review mode names."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import Service, SopsProject, git, git_init, serve, write_routing, write_server
from tests.http.test_write_api import CANARY, blob, call, commit_all, head


@pytest.fixture
def repo(sops_project: SopsProject) -> SopsProject:
    """A git repository with servers `gpu` (routed for chat) and `spare`, committed."""
    git_init(sops_project.root)
    (sops_project.root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "gpu")
    write_server(sops_project, "spare")
    write_routing(sops_project, ["gpu"])
    commit_all(sops_project.root)
    return sops_project


@pytest.fixture
async def service(repo: SopsProject) -> AsyncIterator[Service]:
    async with serve(repo) as running:
        yield running


def commit_text(root: SopsProject, field: str) -> str:
    return git(root.root, "log", "-1", f"--format={field}")


async def test_a_created_key_answers_201_with_its_location_and_masked_key(
    repo: SopsProject, service: Service
) -> None:
    body = {"id": "vendor", "provider": "openai", "api_key": CANARY}
    status, answer, headers = await call(service, "POST", "/api-keys", body)
    assert status == 201, answer
    assert headers["Location"] == "/api/v1/llm-config/api-keys/vendor"
    assert answer["api_key"] == "****" + CANARY[-4:] and answer["kind"] == "api_key"
    assert answer["commit"] == head(repo.root) and headers["ETag"]
    assert commit_text(repo, "%s") == "create api_key vendor"


async def test_a_kind_other_than_the_routes_is_422_and_writes_nothing(
    repo: SopsProject, service: Service
) -> None:
    before = head(repo.root)
    body = {"kind": "ai_server", "id": "vendor", "provider": "openai", "api_key": CANARY}
    status, answer, _ = await call(service, "POST", "/api-keys", body)
    assert status == 422 and answer["error"]["type"] == "invalid"
    assert [p["path"] for p in answer["error"]["problems"]] == ["kind"]
    status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"kind": "api_key"})
    assert status == 422 and [p["path"] for p in answer["error"]["problems"]] == ["kind"]
    status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"id": "other"})
    assert status == 422 and [p["path"] for p in answer["error"]["problems"]] == ["id"]
    assert head(repo.root) == before and not (repo.providers / "vendor.yaml").exists()


async def test_a_delete_is_one_commit_with_the_reason_and_trailer_and_a_removal_event(
    repo: SopsProject, service: Service
) -> None:
    headers = {"X-Switchboard-Reason": "retired"}
    status, answer, _ = await call(service, "DELETE", "/servers/spare", headers=headers)
    assert status == 200, answer
    assert (answer["id"], answer["commit"]) == ("spare", head(repo.root))
    assert commit_text(repo, "%s") == "delete ai_server spare"
    assert commit_text(repo, "%b").strip() == "retired\n\nSwitchboard-Client: anonymous"
    assert commit_text(repo, "%an <%ae>") == "anonymous <anonymous@clients.switchboard.invalid>"
    assert commit_text(repo, "%cn <%ce>") == "Switchboard <switchboard@localhost>"
    removed = [e for e in service.events() if e.type == "provider.removed"]
    assert [(e.subject, e.commit, e.author) for e in removed] == [
        ("spare", head(repo.root), "anonymous <anonymous@clients.switchboard.invalid>")
    ]


async def test_a_route_write_is_committed_as_update_routing_purpose(
    repo: SopsProject, service: Service
) -> None:
    route = {"primary": ["gpu"], "fallbacks": ["spare"]}
    status, answer, _ = await call(service, "PUT", "/active/chat", route)
    assert status == 200, answer
    assert [p["id"] for p in answer["fallbacks"]] == ["spare"] and answer["commit"] == head(repo.root)
    assert commit_text(repo, "%s") == "update routing chat"
    assert "Switchboard-Client: anonymous" in commit_text(repo, "%b")


async def test_if_match_takes_a_star_or_a_list_holding_the_current_blob(
    repo: SopsProject, service: Service
) -> None:
    current = blob((repo.providers / "spare.yaml").read_bytes())
    status, answer, _ = await call(
        service, "PATCH", "/servers/spare", {"name": "one"}, headers={"If-Match": "*"}
    )
    assert status == 200, answer
    current = blob((repo.providers / "spare.yaml").read_bytes())
    listed = f'"{"0" * 40}", W/"{current}"'
    status, answer, _ = await call(
        service, "PATCH", "/servers/spare", {"name": "two"}, headers={"If-Match": listed}
    )
    assert status == 200, answer
    status, answer, _ = await call(
        service, "PATCH", "/servers/spare", {"name": "three"}, headers={"If-Match": listed}
    )
    assert status == 412 and answer["error"]["type"] == "precondition_failed"
    assert service.registry.snapshot.providers["spare"].name == "two"


async def test_branch_mode_answers_202_and_names_a_route_branch_by_its_purpose(repo: SopsProject) -> None:
    async with serve(repo, write_mode="branch") as service:
        before = head(repo.root)
        status, answer, _ = await call(service, "PUT", "/active/chat", {"primary": "spare"})
        assert status == 202, answer
        assert answer["branch"] == "switchboard/update-chat-1"
        status, created, _ = await call(
            service,
            "POST",
            "/servers",
            {"id": "new", "server_type": "vllm", "base_url": "http://127.0.0.1:9/v1"},
        )
        assert status == 202 and created["branch"] == "switchboard/create-new-1"
    assert head(repo.root) == before
    assert git(repo.root, "log", "-1", "--format=%s", answer["branch"]) == "update routing chat"
    assert git(repo.root, "rev-parse", created["branch"]) == created["commit"]

"""Promises of docs/reference.md §6 and §7 held to the letter, each as an outside client meets
them: the answers of the provider tests by kind, the models list of a server under conditional
GETs, and the gateway's 404 for a purpose without a route."""

from __future__ import annotations

import pytest

from tests.conftest import SopsProject
from tests.support.gateway import running, write_provider, write_routing
from tests.support.upstreams import FakeUpstream

API = "/api/v1/llm-config"


async def test_a_test_by_kind_answers_as_the_providers_test_and_only_for_its_kind(
    sops_project: SopsProject,
) -> None:
    """`POST …/api-keys/{id}/test` and `…/servers/{id}/test` are "the same as
    `providers/{id}/test`": `{"ok", "latency_ms", "message"}`; an id of the other kind is no
    such provider there (404)."""
    async with FakeUpstream(name="gpu", models=("m1",)) as up:
        write_provider(sops_project, "gpu", base_url=up.base_url)
        async with running(sops_project) as board:
            by_kind = await board.post(f"{API}/servers/gpu/test", {})
            tested = await by_kind.json()
            through_providers = await (await board.post(f"{API}/providers/gpu/test", {})).json()
            wrong_kind = await board.post(f"{API}/api-keys/gpu/test", {})
            error = (await wrong_kind.json())["error"]
    assert by_kind.status == 200
    assert set(tested) == set(through_providers) == {"ok", "latency_ms", "message"}
    assert tested["ok"] is True and isinstance(tested["latency_ms"], int | float)
    assert wrong_kind.status == 404 and error["type"] == "not_found"


async def test_a_servers_models_list_has_a_weak_tag_and_answers_304_while_it_holds(
    sops_project: SopsProject,
) -> None:
    """Every `GET` under `/api/v1/llm-config/` but the event stream and the `secrets:read`
    endpoint carries an `ETag` (weak) and answers `If-None-Match` with 304 and no body: the
    models a server reports too."""
    async with FakeUpstream(name="gpu", models=("m1", "m2")) as up:
        write_provider(sops_project, "gpu", base_url=up.base_url)
        async with running(sops_project) as board:
            first = await board.get(f"{API}/servers/gpu/models")
            tag = first.headers["ETag"]
            async with board.http.get(
                f"{board.url}{API}/servers/gpu/models", headers={"If-None-Match": tag}
            ) as again:
                body = await again.read()
    assert first.status == 200 and (await first.json()) == {"id": "gpu", "models": ["m1", "m2"]}
    assert tag.startswith('W/"') and tag.endswith('"')
    assert again.status == 304 and again.headers["ETag"] == tag and body == b""


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": "m", "input": "hello"}),
        ("/v1/rerank", {"model": "m", "query": "q", "documents": ["a", "b"], "top_n": 1}),
    ],
    ids=["embeddings", "rerank"],
)
async def test_a_purpose_without_a_route_is_404_model_not_found(
    sops_project: SopsProject, path: str, body: dict[str, object]
) -> None:
    """ "When no enabled provider in the purpose's route serves the model …, or the purpose has
    no route, the answer is 404 with `type` and `code` `model_not_found`", with the gateway's
    headers and nothing sent upstream."""
    async with FakeUpstream(name="gpu") as up:
        purposes = ["chat", "embeddings", "reranking"]
        write_provider(sops_project, "gpu", base_url=up.base_url, purposes=purposes)
        write_routing(sops_project, chat="gpu")  # embeddings and reranking have no route
        async with running(sops_project) as board:
            response = await board.post(path, body)
            error = (await response.json())["error"]
    assert response.status == 404
    assert error["type"] == error["code"] == "model_not_found"
    assert response.headers["x-switchboard-provider"] == "none"
    assert response.headers["x-switchboard-attempts"] == "0"
    assert len(response.headers["x-request-id"]) == 32
    assert not [r for r in up.requests if r.method == "POST"]

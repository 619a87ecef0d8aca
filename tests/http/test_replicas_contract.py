"""Many replicas (docs/reference.md §9 and §12), as an outside test reads them: the replica
each answer names, `GET …/replicas` as a conditional and blocking GET like any other, and the
settings §3 and §12 name, with their defaults.

A real service on a free port; a bare repository as the remote where a pull is involved.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings
from tests.conftest import SopsProject, serve, write_routing, write_server
from tests.support.replicas import Checkout, clone

API = "/api/v1/llm-config"
REPLICA = "X-Switchboard-Replica"
INDEX = "X-Switchboard-Index"


@pytest.mark.parametrize(
    "path", ["/active", "/active/chat", "/providers", "/servers/gpu", "/replicas", "/whoami"]
)
async def test_every_answer_a_consumer_may_hold_names_the_replica_that_gave_it(
    sops_project: SopsProject, path: str
) -> None:
    """§9: "An index means something only on the replica that gave it: answers also carry
    `X-Switchboard-Replica`" — the 200, the 304 and the held query's answer alike, and its value
    is `SWITCHBOARD_REPLICA`."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project, replica="eu-west-1") as service:
        async with service.http.get(service.url + API + path) as first:
            assert first.status == 200
            assert first.headers[REPLICA] == "eu-west-1" and first.headers[INDEX].isdigit()
            tag, index = first.headers["ETag"], first.headers[INDEX]
        async with service.http.get(service.url + API + path, headers={"If-None-Match": tag}) as again:
            assert again.status == 304 and again.headers[REPLICA] == "eu-west-1"
            assert again.headers["ETag"] == tag and await again.read() == b""
        async with service.http.get(service.url + API + path + f"?index={index}&wait=100ms") as held:
            assert held.status == 200 and held.headers[REPLICA] == "eu-west-1"
            assert held.headers[INDEX] == index


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/providers/nobody", 404), ("GET", "/active/nothing", 404), ("PUT", "/active", 405)],
)
async def test_an_error_under_the_configuration_names_its_replica_too(
    sops_project: SopsProject, method: str, path: str, status: int
) -> None:
    """A consumer that gets a 404 from one replica behind a balancer and a 200 from another
    can tell them apart: every answer under the prefix says which replica gave it."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with (
        serve(sops_project, replica="eu-west-1") as service,
        service.http.request(method, service.url + API + path) as answer,
    ):
        assert answer.status == status and answer.headers[REPLICA] == "eu-west-1"


async def test_the_event_stream_names_its_replica_too(sops_project: SopsProject) -> None:
    """The stream's `id:` is a `seq` of this replica's own log (§5, §12: each replica keeps its own
    event log), so the stream says whose it is."""
    write_server(sops_project, "gpu")
    async with (
        serve(sops_project, replica="eu-west-1") as service,
        service.http.get(service.url + API + "/events?after=0") as stream,
    ):
        assert stream.status == 200 and stream.headers[REPLICA] == "eu-west-1"
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert "ETag" not in stream.headers


async def test_the_replicas_answer_without_redis_is_this_replica_alone_under_its_name(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """§12: `{"replicas": [{"replica", "commit", "generation", "ready", "seen_at"}], "shared"}`;
    without Redis, "this replica alone, `"shared": false`", serving the commit `/readyz` names."""
    bare, _ = remote
    mine = clone(bare, tmp_path / "replica")
    settings = {"root": mine.root, "providers": mine.providers, "events": mine.root / "var" / "e.jsonl"}
    async with serve(sops_project, replica="solo-1", **settings) as service:
        _, ready = await service.get("/readyz")
        status, body = await service.get(API + "/replicas")
    assert status == 200 and body["shared"] is False
    [own] = body["replicas"]
    assert set(own) == {"replica", "commit", "generation", "ready", "seen_at"}
    assert own["replica"] == ready["replica"] == "solo-1"
    assert own["commit"] == ready["last_applied_commit"] == mine.head()
    assert own["generation"] == ready["generation"] and own["ready"] is True


def test_the_replica_settings_are_read_from_their_variables_with_their_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§3 and §12 name the variables: `SWITCHBOARD_REPLICA`, `_GIT_PULL`, `_GIT_PULL_INTERVAL_S`
    (default 30), `_WEBHOOK_SECRET`, `_REDIS_URL`, `_GIT_PUSH`."""
    assert Settings().git_pull_interval_s == 30
    assert Settings().git_pull is None and Settings().redis_url is None and Settings().webhook_secret is None
    for name, value in {
        "REPLICA": "pod-7",
        "GIT_PULL": "origin/main",
        "GIT_PULL_INTERVAL_S": "2.5",
        "WEBHOOK_SECRET": "whsec-x",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "GIT_PUSH": "origin",
    }.items():
        monkeypatch.setenv(f"SWITCHBOARD_{name}", value)
    settings = Settings()
    assert (settings.replica, settings.git_pull, settings.git_pull_interval_s) == (
        "pod-7",
        "origin/main",
        2.5,
    )
    assert settings.webhook_secret is not None and settings.webhook_secret.get_secret_value() == "whsec-x"
    assert settings.redis_url is not None and settings.redis_url.get_secret_value().startswith("redis://")
    assert settings.git_push == "origin"

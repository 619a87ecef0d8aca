"""A hostile review of the event log under a running service (docs/reference.md §5, §6.4): the
file truncated, replaced, removed or turned into a folder while the service holds it. Every
endpoint that reads it says so (503 `not_ready`), `/readyz` too, nothing is appended to a file
that is not the one written, and the service goes on once the file is back."""

from __future__ import annotations

import json
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from service.http.context import EVENTS
from service.journal.reader import read_events, verify
from tests.conftest import Service, SopsProject, eventually, git, serve, write_routing, write_server
from tests.http.test_write_api import call
from tests.http.test_write_api import repo as repo  # a fixture
from tests.support.replicas import Replica, free_port, replica_env, replicas

pytestmark = pytest.mark.timeout(60)

API = "/api/v1/llm-config"

READERS = (
    "/api/v1/llm-config/audit",
    "/api/v1/llm-config/state?at=2100-01-01T00:00:00Z",
    "/api/v1/llm-config/active/chat/litellm?model=m",  # audited: no key leaves unrecorded
)


def _truncate(path: Path) -> None:
    path.write_bytes(b"")


def _replace(path: Path) -> None:
    copy = path.with_name("copy.jsonl")
    shutil.copyfile(path, copy)
    copy.replace(path)


def _remove(path: Path) -> None:
    path.unlink()


def _a_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


async def _refused(service: Service, path: str, fault: str, **headers: str) -> None:
    async with service.http.get(service.url + path, headers=headers) as response:
        body = await response.json()
    assert response.status == 503, (path, body)
    assert body["error"]["type"] == "not_ready"
    assert fault in body["error"]["message"]


@pytest.mark.parametrize(
    ("tamper", "fault"),
    [(_truncate, "truncated"), (_replace, "replaced"), (_remove, "removed"), (_a_folder, "replaced")],
)
async def test_a_log_broken_under_the_service_is_a_clear_503_never_a_500(
    sops_project: SopsProject, tamper: Callable[[Path], None], fault: str
) -> None:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project) as service:
        tamper(service.events_file)
        for path in READERS:
            await _refused(service, path, fault)
        await _refused(service, "/api/v1/llm-config/events", fault, **{"Last-Event-ID": "0"})
        status, ready = await service.get("/readyz")
        assert status == 200 and ready["degraded"] is True
        assert ready["event_log"]["status"] == "failed" and fault in ready["event_log"]["reason"]


async def test_a_change_waits_while_the_log_is_away_and_is_recorded_once_it_is_back(
    sops_project: SopsProject,
) -> None:
    """A change that cannot be recorded is not applied (the last good configuration is served),
    and the file moved back under the service is appended to again: one chain, no fork."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    async with serve(sops_project, rescan_s=0.2) as service:
        events, log = service.events_file, service.app[EVENTS]
        aside = events.with_name("aside.jsonl")
        events.rename(aside)
        write_server(sops_project, "gpu", base_url="http://127.0.0.1:10/v1")
        await eventually(lambda: log.fault is not None and "moved away" in log.fault, 5)
        _, ready = await service.get("/readyz")
        assert ready["generation"] == 1 and ready["event_log"]["status"] == "failed"

        aside.rename(events)

        async def applied() -> None:
            _, ready = await service.get("/readyz")
            assert ready["generation"] == 2, ready
            assert ready["event_log"] == {"status": "ok", "reason": None}

        await eventually(applied, 5)
        status, provider = await service.get("/api/v1/llm-config/providers/gpu")
        assert status == 200 and provider["base_url"] == "http://127.0.0.1:10/v1"
        status, audit = await service.get("/api/v1/llm-config/audit?type=provider.updated")
        assert status == 200 and audit["count"] == 1
    assert verify(events) == len(read_events(events))


async def test_a_write_while_the_log_is_away_is_a_409_that_leaves_git_as_it_was(repo: SopsProject) -> None:
    async with serve(repo) as service:
        before = git(repo.root, "rev-parse", "HEAD")
        service.events_file.unlink()
        status, body, _ = await call(
            service,
            "POST",
            "/servers",
            {"id": "new", "server_type": "vllm", "base_url": "http://127.0.0.1:9/v1"},
        )
        assert status == 409, body
        assert "removed or moved away" in body["error"]["message"]
    assert git(repo.root, "rev-parse", "HEAD") == before
    assert git(repo.root, "status", "--porcelain") == ""
    assert not (repo.providers / "new.yaml").exists()


async def test_a_log_that_cannot_grow_refuses_appends_and_keeps_its_chain(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    """A real `switchboard serve` whose files may not grow (the kernel's file size limit, lowered
    on the running process: every write past it fails, as on a full disk): a `secret.read` that
    cannot be recorded gives no key (503 `not_ready`, not 500), `/readyz` says why, nothing torn
    is left, and appends go on once the file may grow."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    env = replica_env(sops_project.identity.key_file, usage_db="off")
    member = Replica("full", sops_project.root, sops_project.providers, free_port(), env, tmp_path)
    path = f"{API}/active/chat/litellm?model=m"
    async with replicas(member):
        assert member.process is not None
        pid, events = member.process.pid, member.events_file
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (events.stat().st_size + 100, hard))
        status, body = await member.get(path)
        assert status == 503, body
        assert body["error"]["type"] == "not_ready" and "cannot append" in body["error"]["message"]
        assert "api_key" not in json.dumps(body)
        status, ready = await member.get("/readyz")
        assert ready["degraded"] is True and ready["event_log"]["status"] == "failed"
        assert verify(events) == len(read_events(events))  # cut back to its last whole line

        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
        status, body = await member.get(path)
        assert status == 200, body
        status, ready = await member.get("/readyz")
        assert ready["event_log"] == {"status": "ok", "reason": None}
    assert [e.type for e in read_events(events)][-1] == "secret.read"
    assert verify(events) == len(read_events(events))

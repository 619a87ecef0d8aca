"""The whole service, end to end: files on disk -> watcher -> registry -> event log -> HTTP.

Real server on port 0, real watcher, real sops, real git; files are changed as editors and
git change them, and every expectation is polled with a bound, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from service.cli.main import cli
from service.config.secret import Secret
from service.crypto.sops import Sops
from service.http.app import create_app
from service.http.context import EVENTS, REGISTRY
from service.journal.events import Event
from service.journal.reader import read_events
from service.journal.replay import replay
from service.runtime.messages import Beat, parse_beat
from service.runtime.registry import Outcome, Registry
from service.settings import Settings
from tests.conftest import (
    KEY_YAML,
    AgeIdentity,
    Service,
    SopsProject,
    _write_sops_yaml,
    eventually,
    git,
    git_init,
    serve,
    write_atomically,
    write_key,
    write_routing,
    write_server,
)

API = "/api/v1/llm-config"
AUTHOR = "Switchboard Tests <tests@switchboard.invalid>"
CANARY = "sk-canary-7f3e9b2c4d5a6e8f1a2b3c4d"
CANARY_ROTATED = "sk-canary-0a1b2c3d4e5f6a7b8c9d0e1f"


def since(service: Service, seq: int) -> list[Event]:
    """The events appended after `seq`."""
    return [e for e in service.app[EVENTS].events() if e.seq > seq]


def kinds(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.type, e.subject) for e in events]


async def served(service: Service, path: str, expected_status: int = 200) -> Any:
    """Poll `path` until it answers `expected_status`; its JSON body."""

    async def check() -> Any:
        status, body = await service.get(path)
        assert status == expected_status, body
        return body

    return await eventually(check)


def commit_then_write(root: Path, path: Path, text: str, message: str) -> str:
    """Commit new content first, then put it on disk: what a `git pull` does to the watcher."""
    rel = path.relative_to(root).as_posix()
    blob = git(root, "hash-object", "-w", "--stdin", "--path", rel, input_text=text)
    git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},{rel}")
    git(root, "commit", "-q", "-m", message)
    write_atomically(path, text)
    return git(root, "rev-parse", "HEAD")


# -- add, edit, rename, delete ---------------------------------------------------------------


async def test_adding_editing_renaming_and_deleting_providers_show_in_answers_and_events(
    sops_project: SopsProject,
) -> None:
    root = sops_project.root
    git_init(root)
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    head = git(root, "rev-parse", "HEAD")
    async with serve(sops_project) as service:
        body = await served(service, f"{API}/active/chat")
        assert (body["commit"], body["primary"][0]["commit"]) == (head, head)
        started = [e for e in service.events() if e.type == "provider.added"]
        assert [(e.subject, e.commit, e.author, e.uncommitted) for e in started] == [
            ("gpu", head, AUTHOR, False)
        ]

        # add (never committed)
        seq = service.app[EVENTS].last_seq
        write_server(sops_project, "tei", purposes="embeddings")
        body = await served(service, f"{API}/servers/tei")
        assert (body["purposes"], body["commit"]) == (["embeddings"], None)
        (added,) = since(service, seq)
        assert (added.type, added.subject, added.file) == ("provider.added", "tei", "providers.d/tei.yaml")
        assert (added.commit, added.author, added.uncommitted) == (None, None, True)
        assert added.changes["base_url"] == {"old": None, "new": "http://127.0.0.1:9/v1"}
        assert added.changes["server_type"] == {"old": None, "new": "vllm"}

        # edit, arriving committed (as a pull does)
        seq = service.app[EVENTS].last_seq
        gpu = sops_project.providers / "gpu.yaml"
        new_head = commit_then_write(root, gpu, gpu.read_text().replace(":9/v1", ":8000/v1"), "move gpu")

        async def moved() -> None:
            _, body = await service.get(f"{API}/providers/gpu")
            assert body["base_url"] == "http://127.0.0.1:8000/v1"
            assert body["commit"] == new_head

        await eventually(moved)
        (updated,) = since(service, seq)
        assert (updated.type, updated.subject, updated.file) == (
            "provider.updated",
            "gpu",
            "providers.d/gpu.yaml",
        )
        assert updated.changes == {
            "base_url": {"old": "http://127.0.0.1:9/v1", "new": "http://127.0.0.1:8000/v1"}
        }
        assert (updated.commit, updated.author, updated.uncommitted) == (new_head, AUTHOR, False)

        # rename: a new file under the new id, the old one gone
        seq = service.app[EVENTS].last_seq
        write_server(sops_project, "embedder", purposes="embeddings")
        (sops_project.providers / "tei.yaml").unlink()
        await served(service, f"{API}/servers/tei", 404)
        await served(service, f"{API}/servers/embedder")
        assert kinds(since(service, seq)) == [("provider.added", "embedder"), ("provider.removed", "tei")]
        removed = since(service, seq)[1]
        assert removed.changes["id"] == {"old": "tei", "new": None}
        assert removed.file == "providers.d/tei.yaml"

        # a plain `mv` keeps the old id inside: the file is refused, its provider is gone
        seq = service.app[EVENTS].last_seq
        (sops_project.providers / "embedder.yaml").rename(sops_project.providers / "tei2.yaml")
        await served(service, f"{API}/servers/embedder", 404)

        async def refused() -> None:
            assert kinds(since(service, seq)) == [
                ("config.rejected", "tei2"),
                ("provider.removed", "embedder"),
            ]

        await eventually(refused)
        rejected = since(service, seq)[0]
        assert rejected.file == "providers.d/tei2.yaml"
        assert "`id` is 'embedder' but the file is named 'tei2'" in getattr(rejected, "reason", "")

        # delete
        seq = service.app[EVENTS].last_seq
        (sops_project.providers / "tei2.yaml").unlink()
        await eventually(lambda: service.registry.refused == {})
        body = await served(service, "/readyz")
        assert body["refused"] == []
        assert since(service, seq) == []  # the refused file never defined a provider


async def test_an_editor_style_save_is_one_update(running_service: Service) -> None:
    service, providers = running_service, running_service.project.providers
    seq = service.app[EVENTS].last_seq
    gpu = providers / "gpu.yaml"
    text = gpu.read_text().replace(":9/v1", ":8001/v1")
    # vim without backupcopy: swap file, original moved to a backup, new file written, backup removed
    (providers / ".gpu.yaml.swp").write_text("swap")
    gpu.rename(providers / "gpu.yaml~")
    gpu.write_text(text)
    (providers / "gpu.yaml~").unlink()
    (providers / ".gpu.yaml.swp").unlink()
    body = await eventually(lambda: service.registry.snapshot.providers["gpu"].endpoint.endswith(":8001/v1"))
    assert body is True
    assert kinds(since(service, seq)) == [("provider.updated", "gpu")]


# -- refusals --------------------------------------------------------------------------------


async def test_an_invalid_edit_is_rejected_and_the_last_good_version_is_served(
    running_service: Service,
) -> None:
    service = running_service
    seq = service.app[EVENTS].last_seq
    gpu = service.project.providers / "gpu.yaml"
    good = gpu.read_text()
    write_atomically(gpu, good.replace("http://127.0.0.1:9/v1", "not-a-url"))

    async def rejected() -> None:
        _, body = await service.get("/readyz")
        assert [r["file"] for r in body["refused"]] == ["providers.d/gpu.yaml"]

    await eventually(rejected)
    (event,) = since(service, seq)
    assert (event.type, event.subject, event.file) == ("config.rejected", "gpu", "providers.d/gpu.yaml")
    assert (
        getattr(event, "reason", "") == "line 4: `base_url`: must be an http:// or https:// URL with a host"
    )
    status, body = await service.get("/readyz")
    assert body["refused"] == [{"file": "providers.d/gpu.yaml", "reason": getattr(event, "reason", "")}]
    status, body = await service.get(f"{API}/providers/gpu")
    assert (status, body["base_url"]) == (200, "http://127.0.0.1:9/v1")

    write_atomically(gpu, good.replace(":9/v1", ":9000/v1"))
    await eventually(lambda: service.registry.refused == {})
    assert kinds(since(service, seq)) == [("config.rejected", "gpu"), ("provider.updated", "gpu")]


async def test_routing_that_names_a_missing_provider_is_refused_whole(running_service: Service) -> None:
    service, project = running_service, running_service.project
    seq = service.app[EVENTS].last_seq
    write_server(project, "second")
    write_routing(project, ["gpu", "second", "ghost"])

    async def refused() -> None:
        _, body = await service.get("/readyz")
        assert body["refused"] == [
            {
                "file": "providers.d/routing.yaml",
                "reason": "line 4: routing for `chat` names `ghost`, which does not exist",
            }
        ]

    await eventually(refused)
    _, body = await service.get(f"{API}/active/chat")
    assert [p["id"] for p in body["primary"]] == ["gpu"]
    assert ("config.rejected", "routing") in kinds(since(service, seq))

    # a provider removed while routing still names it: refused whole too, gpu still served
    write_routing(project, ["gpu", "second"])
    await served(service, f"{API}/servers/second")
    await eventually(lambda: service.registry.refused == {})
    (project.providers / "gpu.yaml").unlink()

    async def kept() -> None:
        _, body = await service.get("/readyz")
        assert [r["file"] for r in body["refused"]] == ["providers.d/routing.yaml"]
        assert "names `gpu`, which does not exist" in body["refused"][0]["reason"]

    await eventually(kept)
    _, body = await service.get(f"{API}/active/chat")
    assert [p["id"] for p in body["primary"]] == ["gpu", "second"]


async def test_readyz_carries_no_url_with_credentials_a_refused_file_quotes(
    sops_project: SopsProject,
) -> None:
    """ "No public answer (`/readyz` included) carries a URL with credentials" (docs/reference.md §6):
    a refusal that quotes what the file says (an `id`, a field's name, a routed id) masks them."""
    server = (
        "kind: ai_server\nid: {id}\nserver_type: vllm\nbase_url: http://127.0.0.1:9/v1\npurposes: [chat]\n"
    )
    providers = sops_project.providers
    (providers / "named.yaml").write_text(server.format(id="'http://gina:hunter8@h.example/'"))
    (providers / "keyed.yaml").write_text(server.format(id="keyed") + "http://kay:hunter9@h.example/: 1\n")
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu", "'https://rita:hunter7@h.example'"])
    async with serve(sops_project) as service:
        text = (await service.text("/readyz"))[1]
        reasons = {r["file"]: r["reason"] for r in json.loads(text)["refused"]}
    assert set(reasons) == {"providers.d/named.yaml", "providers.d/keyed.yaml", "providers.d/routing.yaml"}
    assert "hunter" not in text
    assert "http://****@h.example/" in reasons["providers.d/named.yaml"]
    assert "http://****@h.example/" in reasons["providers.d/keyed.yaml"]


def _encrypt_for(identity: AgeIdentity, tmp_path: Path, provider_id: str, key: str) -> str:
    """An api_key file encrypted for another identity than the service's."""
    other = tmp_path / "other-project"
    (other / "providers.d").mkdir(parents=True)
    _write_sops_yaml(other, identity.recipient)
    sops = Sops(age_key_file=identity.key_file, project_root=other)
    path = other / "providers.d" / f"{provider_id}.yaml"
    return sops.encrypt(KEY_YAML.format(id=provider_id, key=key).encode(), str(path)).decode()


async def test_files_encrypted_to_another_key_or_tampered_are_refused_with_their_reasons(
    sops_project: SopsProject, other_age_identity: AgeIdentity, tmp_path: Path
) -> None:
    write_server(sops_project, "gpu")
    good = write_key(sops_project, "tampered", CANARY).read_text()
    write_key(sops_project, "edited", CANARY)
    async with serve(sops_project) as service:
        await served(service, f"{API}/api-keys/tampered")
        providers = sops_project.providers
        write_atomically(
            providers / "foreign.yaml", _encrypt_for(other_age_identity, tmp_path, "foreign", CANARY)
        )
        value = re.search(r"api_key: ENC\[AES256_GCM,data:([^,]+),", good)
        assert value is not None
        flipped = ("A" if value.group(1)[0] != "A" else "B") + value.group(1)[1:]
        write_atomically(providers / "tampered.yaml", good.replace(value.group(1), flipped))
        edited = (providers / "edited.yaml").read_text()
        assert "provider: openrouter" in edited
        write_atomically(
            providers / "edited.yaml", edited.replace("provider: openrouter", "provider: openai")
        )

        async def refused() -> dict[str, str]:
            _, body = await service.get("/readyz")
            reasons = {r["file"]: r["reason"] for r in body["refused"]}
            assert len(reasons) == 3, reasons
            return reasons

        reasons = await eventually(refused)
        assert "no age identity here matches the file's recipients" in reasons["providers.d/foreign.yaml"]
        assert "an encrypted value was tampered with" in reasons["providers.d/tampered.yaml"]
        assert "MAC mismatch" in reasons["providers.d/edited.yaml"]
        # the last good versions stay; the foreign file never had one
        assert (await service.get(f"{API}/api-keys/tampered"))[0] == 200
        assert (await service.get(f"{API}/api-keys/edited"))[1]["provider"] == "openrouter"
        assert (await service.get(f"{API}/api-keys/foreign"))[0] == 404
        assert (await service.get(f"{API}/servers/gpu"))[0] == 200


async def test_a_fallback_that_cannot_be_decrypted_here_leaves_its_purpose_routed(
    sops_project: SopsProject, other_age_identity: AgeIdentity, tmp_path: Path
) -> None:
    write_server(sops_project, "gpu")
    foreign = _encrypt_for(other_age_identity, tmp_path, "backup", CANARY)
    write_atomically(sops_project.providers / "backup.yaml", foreign)
    write_routing(sops_project, ["gpu"], fallbacks=["backup"])
    async with serve(sops_project) as service:
        status, route = await service.get(f"{API}/active/chat")
        _, everything = await service.get(f"{API}/active")
        _, ready = await service.get("/readyz")
    assert status == 200, route
    assert [p["id"] for p in route["primary"]] == ["gpu"]
    assert (route["fallbacks"], route["unavailable"]) == ([], ["backup"])
    assert everything["purposes"]["chat"] == route
    assert ready["degraded"] is True
    assert [r["file"] for r in ready["refused"]] == ["providers.d/backup.yaml"]
    assert "no age identity here" in ready["refused"][0]["reason"]


# -- the event log across restarts -----------------------------------------------------------


async def test_a_torn_last_line_is_set_aside_and_reported_at_start(running_service: Service) -> None:
    project, path = running_service.project, running_service.events_file
    await running_service.stop()
    torn = b'{"seq": 4, "ts": "2026-11-27T05:33'
    with path.open("ab") as f:
        f.write(torn)
    async with serve(project) as service:
        started = [e for e in service.events() if e.type == "service.started"]
        assert len(started) == 2
        recovered = getattr(started[-1], "recovered", None)
        assert recovered is not None and ".broken" in recovered and f"{len(torn)} bytes" in recovered
        assert path.with_name(path.name + ".broken").read_bytes() == torn + b"\n"
        assert cli("audit", "verify", "--events", str(path)) == 0


async def test_a_tampered_middle_line_is_named_by_audit_verify(
    running_service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    path = running_service.events_file
    await running_service.stop()
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 3
    lines[1] = lines[1].replace(b'"gpu"', b'"gpx"', 1)
    path.write_bytes(b"".join(lines))
    assert cli("audit", "verify", "--events", str(path)) == 1
    err = capsys.readouterr().err
    assert "seq 2" in err and "hash does not match" in err


async def test_changes_made_while_the_service_was_down_are_recorded_at_restart(
    running_service: Service,
) -> None:
    project = running_service.project
    await running_service.stop()
    before = read_events(running_service.events_file)
    gpu = project.providers / "gpu.yaml"
    write_atomically(gpu, gpu.read_text().replace(":9/v1", ":7000/v1"))
    write_server(project, "tei", purposes="embeddings")
    async with serve(project) as service:
        after = service.events()[len(before) :]
        assert kinds(after) == [
            ("service.started", None),
            ("provider.added", "tei"),
            ("provider.updated", "gpu"),
        ]
        assert after[2].changes == {
            "base_url": {"old": "http://127.0.0.1:9/v1", "new": "http://127.0.0.1:7000/v1"}
        }
        assert replay(service.events()) == service.registry.snapshot.view()


async def test_state_at_a_time_before_and_after_a_change(
    running_service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    service = running_service
    before = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    gpu = service.project.providers / "gpu.yaml"
    write_atomically(gpu, gpu.read_text().replace(":9/v1", ":7001/v1"))
    await eventually(lambda: service.registry.snapshot.providers["gpu"].endpoint.endswith(":7001/v1"))
    after = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    old, new = "http://127.0.0.1:9/v1", "http://127.0.0.1:7001/v1"
    status, body = await service.get(f"{API}/state?at={before}")
    assert (status, body["at"], body["config"]["providers"]["gpu"]["base_url"]) == (200, before, old)
    status, body = await service.get(f"{API}/state?at={after}")
    assert body["config"]["providers"]["gpu"]["base_url"] == new
    assert body["config"] == service.registry.snapshot.view()
    assert body["seq"] == service.app[EVENTS].last_seq

    events = str(service.events_file)
    for at, url in ((before, old), (after, new)):
        assert cli("state", "--at", at, "--events", events) == 0
        assert json.loads(capsys.readouterr().out)["providers"]["gpu"]["base_url"] == url


# -- the canary and the replay invariant -----------------------------------------------------


async def test_a_canary_key_appears_in_no_answer_log_line_event_or_metric(
    sops_project: SopsProject, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    project = sops_project
    assert (
        cli(
            "token", "create", "ops", "--scope", "config:read", "admin", "--providers", str(project.providers)
        )
        == 0
    )
    token = capsys.readouterr().out.strip()
    write_key(project, "canary", CANARY)
    write_server(project, "gpu")
    write_routing(project, ["canary"], fallbacks=["gpu"])
    seen: list[str] = []
    async with serve(project) as service:
        paths = [
            "/healthz",
            "/readyz",
            f"{API}/active",
            f"{API}/active/chat",
            f"{API}/active/embeddings",
            f"{API}/providers",
            f"{API}/providers/canary",
            f"{API}/api-keys",
            f"{API}/api-keys/canary",
            f"{API}/servers",
            f"{API}/servers/canary",
            f"{API}/audit",
            f"{API}/audit?subject=canary",
            f"{API}/state",
            f"{API}/state?at=1h",
            f"{API}/nowhere",
        ]

        async def everything() -> None:
            for path in paths:
                for auth in (token, None, "wrong"):
                    seen.append((await service.text(path, auth))[1])

        await everything()
        _, body = await service.get(f"{API}/api-keys/canary", token)
        assert body["api_key"] == "****" + CANARY[-4:]

        # rotate the key, then break the file: both go through events, logs and answers
        write_key(project, "canary", CANARY_ROTATED)
        await eventually(
            lambda: service.registry.snapshot.providers["canary"].api_key == Secret(CANARY_ROTATED)
        )
        path = project.providers / "canary.yaml"
        write_atomically(path, path.read_text().replace("provider: openrouter", "provider: openai"))
        await eventually(lambda: "providers.d/canary.yaml" in service.registry.refused)
        await everything()
        seen.append((await service.text("/metrics"))[1])
    for command in (("audit", "show", "--format", "json"), ("state",), ("audit", "verify")):
        cli(*command, "--events", str(service.events_file))
        out, err = capsys.readouterr()
        seen += [out, err]
    seen += [service.events_file.read_text(), caplog.text]
    seen += [r.getMessage() for r in caplog.records]
    everything_seen = "\n".join(seen)
    assert "****" + CANARY[-4:] in everything_seen  # the mask is there...
    for secret in (CANARY, CANARY_ROTATED):
        assert secret not in everything_seen  # ...the key is not
        assert secret[:-4] not in everything_seen
        assert secret[3:20] not in everything_seen


async def test_replaying_the_log_gives_the_registry_after_random_edits(running_service: Service) -> None:
    service, project = running_service, running_service.project
    rng = random.Random(7)
    ids = [f"s{i}" for i in range(5)]
    for _step in range(30):
        pid = rng.choice(ids)
        path = project.providers / f"{pid}.yaml"
        action = rng.random()
        if action < 0.5:
            write_server(project, pid, f"http://127.0.0.1:{rng.randint(1000, 1005)}/v1")
        elif action < 0.7:
            path.unlink(missing_ok=True)
        elif action < 0.8:
            write_atomically(path, "kind: ai_server\nid: [broken\n")
        else:
            present = sorted(p.stem for p in project.providers.glob("s*.yaml"))
            write_routing(project, ["gpu"], fallbacks=rng.sample(present, min(len(present), 2)))
        if rng.random() < 0.3:
            await asyncio.sleep(rng.uniform(0.01, 0.05))  # let a batch land now and then
    for path in project.providers.glob("s*.yaml"):  # end on a valid configuration
        if "[broken" in path.read_text():
            path.unlink()
    write_routing(project, ["gpu"])

    def on_disk() -> dict[str, str]:
        return {f"providers.d/{p.name}": p.read_text() for p in project.providers.glob("*.yaml")}

    def caught_up() -> None:
        files = service.registry.snapshot.files
        assert {f: x.data.decode() for f, x in files.items()} == on_disk()
        assert service.registry.refused == {}

    await eventually(caught_up)
    assert replay(read_events(service.events_file)) == service.registry.snapshot.view()


async def test_a_providers_folder_outside_the_root_is_named_from_its_parent_and_attributed(
    sops_project: SopsProject, tmp_path: Path
) -> None:
    git_init(sops_project.root)
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    git(sops_project.root, "add", "-A")
    git(sops_project.root, "commit", "-qm", "add gpu")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with serve(sops_project, root=elsewhere, events=elsewhere / "events.jsonl") as service:
        (added,) = [e for e in service.events() if e.type == "provider.added"]
        assert added.file == "providers.d/gpu.yaml"
        assert added.commit == git(sops_project.root, "rev-parse", "HEAD")
        assert added.author == AUTHOR


async def test_readyz_is_503_until_the_first_load_is_complete(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/reference.md §4: `/readyz` answers 503 until the first load is complete, then 200
    with its fields."""
    write_server(sops_project, "gpu")
    settings = Settings(
        root=sops_project.root,
        providers=sops_project.providers,
        events=sops_project.root / "var" / "events.jsonl",
        debounce_ms=10,
        health_interval_s=0,
    )
    apply, started, release = Registry.apply, threading.Event(), threading.Event()

    def held_apply(self: Registry, *args: Any, **kwargs: Any) -> Outcome:  # held in its worker thread
        started.set()
        release.wait(10)
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(Registry, "apply", held_apply)
    runner = web.AppRunner(create_app(settings, sops=sops_project.sops), shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/readyz"
        async with aiohttp.ClientSession() as http:
            await eventually(started.is_set)
            async with http.get(url) as response:
                assert response.status == 503
                assert (await response.json())["error"]["type"] == "not_ready"
            release.set()

            async def ready() -> dict[str, Any]:
                async with http.get(url) as response:
                    assert response.status == 200
                    body: dict[str, Any] = await response.json()
                    return body

            body = await eventually(ready)
        assert body["status"] == "ready"
        assert {"generation", "last_applied_commit", "last_attempted_commit", "refused", "degraded"} <= set(
            body
        )
        assert (body["refused"], body["degraded"]) == ([], False)
    finally:
        release.set()
        await runner.cleanup()


# -- shutdown ----------------------------------------------------------------------------------


async def test_stopping_during_the_first_load_waits_for_its_apply_before_closing_the_log(
    sops_project: SopsProject, caplog: pytest.LogCaptureFixture
) -> None:
    write_server(sops_project, "gpu")
    settings = Settings(
        root=sops_project.root,
        providers=sops_project.providers,
        events=sops_project.root / "var" / "events.jsonl",
        debounce_ms=10,
        health_interval_s=0,
    )
    runner = web.AppRunner(create_app(settings, sops=sops_project.sops), shutdown_timeout=0.5)
    await runner.setup()
    registry = runner.app[REGISTRY]
    apply, started, results = registry.apply, threading.Event(), []

    def slow_apply(*args: Any, **kwargs: Any) -> Any:  # the first load, caught in its worker thread
        started.set()
        time.sleep(0.5)
        try:
            outcome = apply(*args, **kwargs)
        except Exception as exc:
            results.append(repr(exc))
            raise
        results.append("applied")
        return outcome

    registry.apply = slow_apply  # type: ignore[method-assign]
    await eventually(started.is_set)
    await runner.cleanup()  # cancels the reload under way

    assert results == ["applied"]  # before the log closed, not after
    assert [e.type for e in read_events(settings.events_file)] == ["service.started", "provider.added"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- replica identity (docs/reference.md §12) ----------------------------------------------------------------


async def test_the_replica_is_named_in_service_started_readyz_and_metrics(sops_project: SopsProject) -> None:
    write_server(sops_project, "gpu")
    async with serve(sops_project, replica="eu-west-2") as service:
        _, ready = await service.get("/readyz")
        assert ready["replica"] == "eu-west-2"
        started = [e for e in service.events() if e.type == "service.started"]
        assert [getattr(e, "replica", None) for e in started] == ["eu-west-2"]
        _, metrics = await service.text("/metrics")
        info = r'^switchboard_info\{litellm="[^"]+",replica="eu-west-2",version="[^"]+"\} 1\.0$'
        assert re.search(info, metrics, re.M)


def test_the_replica_defaults_to_the_host_name() -> None:
    assert Settings().replica == socket.gethostname()


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_replica_variable_is_the_host_name(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SWITCHBOARD_REPLICA", value)
    assert Settings().replica == socket.gethostname()


@pytest.mark.parametrize("name", ["eu west 1", "a\nb", "-x", "x" * 254, "réplica", "a/b"])
def test_a_replica_name_the_other_replicas_could_not_list_is_refused_at_start(name: str) -> None:
    """Its heartbeats were dropped by every other replica (`GET …/replicas` never listed it),
    and a control character in it made every answer's `X-Switchboard-Replica` header fail."""
    with pytest.raises(ValidationError, match="SWITCHBOARD_REPLICA"):
        Settings(replica=name)


@pytest.mark.parametrize("name", ["eu-west-2", "pod-7.switchboard.svc", "a:b@c_d", "x" * 253])
def test_every_replica_name_allowed_is_heard_by_the_others(name: str) -> None:
    beat = {"replica": Settings(replica=name).replica, "instance": "i", "commit": None, "generation": 1}
    assert parse_beat(json.dumps(beat | {"ready": True})) == (Beat(name, None, 1, True), "i")


def test_a_heartbeat_whose_name_ends_in_a_line_break_is_not_heard() -> None:
    """A name is matched whole: `$` would let a final line break through (`re` matches it before
    one), and a replica named so could not be one of the names `SWITCHBOARD_REPLICA` allows."""
    beat = {"replica": "eu-west-1\n", "instance": "i", "commit": None, "generation": 1, "ready": True}
    assert parse_beat(json.dumps(beat)) is None

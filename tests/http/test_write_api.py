"""Writes over HTTP that become commits (docs/reference.md §8), end to end: real sops, real git,
a real server.

Every write is checked where it lands: the answer, the file on disk, the commit (author,
committer, message, reason, trailer), the event log, and what the service then serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from service.config.secret import Secret
from service.config.upstreams import SETTING
from service.http.context import WRITER
from tests.conftest import (
    AgeIdentity,
    Service,
    SopsProject,
    _write_sops_yaml,
    eventually,
    git,
    git_init,
    serve,
    write_routing,
    write_server,
)
from tests.support.dns import Dns

API = "/api/v1/llm-config"
CANARY = "sk-canary-write-3c1d9e7f5a2b4c6d8e0f"
OTHER_KEY = "sk-another-key-7a8b9c0d1e2f3a4b"
GIT_ENV_MARKER = "SWITCHBOARD_TEST_GIT_ENV"


def commit_all(root: Path, message: str = "setup") -> str:
    git(root, "add", "-A")
    git(root, "commit", "-qm", message)
    return git(root, "rev-parse", "HEAD")


@pytest.fixture
def repo(sops_project: SopsProject) -> SopsProject:
    """A git repository with a server `gpu` routed for chat, committed; var/ ignored."""
    root = sops_project.root
    git_init(root)
    (root / ".gitignore").write_text("var/\n")
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    commit_all(root)
    return sops_project


@pytest.fixture
async def service(repo: SopsProject) -> AsyncIterator[Service]:
    async with serve(repo) as running:
        yield running


async def call(
    service: Service,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    # Every write says it is JSON, body or not, as the console does: without authentication
    # a write without a JSON media type is 415 (docs/reference.md §6).
    sent["Content-Type"] = content_type
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with service.http.request(method, service.url + API + path, data=data, headers=sent) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text else None), response.headers


def blob(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()


def head(root: Path) -> str:
    return git(root, "rev-parse", "HEAD")


def vendor(**fields: Any) -> dict[str, Any]:
    return {"id": "vendor", "provider": "openai", "api_key": CANARY, "purposes": ["chat"], **fields}


# -- create ---------------------------------------------------------------------------------------


async def test_a_created_key_is_one_commit_encrypted_applied_and_recorded(
    repo: SopsProject, service: Service
) -> None:
    before = head(repo.root)
    status, body, headers = await call(
        service, "POST", "/api-keys", vendor(name="Vendor"), headers={"X-Switchboard-Reason": "new vendor"}
    )
    assert status == 201, body
    path = repo.providers / "vendor.yaml"
    data = path.read_bytes()
    assert headers["Location"] == f"{API}/api-keys/vendor"
    assert headers["ETag"].startswith(f'W/"{blob(data)}.{body["commit"]}.')  # as GET gives it
    assert body["id"] == "vendor" and body["api_key"] == "****" + CANARY[-4:]
    assert body["commit"] == head(repo.root) != before
    assert body["generation"] == service.registry.snapshot.generation
    assert CANARY.encode() not in data and b"ENC[AES256_GCM" in data and b"sops:" in data
    assert data.startswith(b"# yaml-language-server: $schema=../schemas/api_key.schema.json\n")
    assert git(repo.root, "rev-list", "--count", f"{before}..HEAD") == "1"
    log = git(repo.root, "log", "-1", "--format=%an <%ae>%n%cn <%ce>%n%B")
    assert log.splitlines()[:2] == [
        "anonymous <anonymous@clients.switchboard.invalid>",
        "Switchboard <switchboard@localhost>",
    ]
    assert "create api_key vendor\n\nnew vendor\n\nSwitchboard-Client: anonymous" in log
    assert git(repo.root, "status", "--porcelain") == ""
    (added,) = [e for e in service.events() if e.type == "provider.added" and e.subject == "vendor"]
    assert added.commit == body["commit"]
    assert added.author == "anonymous <anonymous@clients.switchboard.invalid>"
    assert service.registry.snapshot.providers["vendor"].api_key == Secret(CANARY)


async def test_a_server_is_created_without_sops(repo: SopsProject, service: Service) -> None:
    body = {"id": "tei", "server_type": "tei", "base_url": "http://127.0.0.1:8081", "purposes": ["reranking"]}
    status, answer, _ = await call(service, "POST", "/servers", body)
    assert status == 201, answer
    assert b"sops:" not in (repo.providers / "tei.yaml").read_bytes()
    assert answer["server_type"] == "tei" and answer["api_key"] is None


async def test_an_existing_id_cannot_be_created_again(service: Service) -> None:
    status, body, _ = await call(
        service, "POST", "/servers", {"id": "gpu", "server_type": "vllm", "base_url": "http://h"}
    )
    assert status == 409 and "exists" in body["error"]["message"]


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"id": "bad", "server_type": "vllm", "base_url": "ftp://host"}, "base_url"),
        ({"id": "bad", "server_type": "vllm", "base_url": "http://h", "timeout": 3}, "timeout"),
        ({"id": "bad", "server_type": "gpu-box", "base_url": "http://h"}, "server_type"),
        ({"id": "Bad Name", "server_type": "vllm", "base_url": "http://h"}, "id"),
        ({"id": "../../escape", "server_type": "vllm", "base_url": "http://h"}, "id"),
        ({"id": "bad", "kind": "api_key", "server_type": "vllm", "base_url": "http://h"}, "kind"),
        ({"id": "bad", "server_type": "vllm", "base_url": "http://h", "api_key": {"a": 1}}, "api_key"),
        ({"id": "bad", "server_type": "vllm", "base_url": "http://h", "sops": {}}, "sops"),
    ],
)
async def test_a_refused_write_is_422_with_its_problems_and_writes_nothing(
    repo: SopsProject, service: Service, body: dict[str, Any], path: str
) -> None:
    before = head(repo.root)
    status, answer, _ = await call(service, "POST", "/servers", body)
    assert status == 422, answer
    assert answer["error"]["type"] == "invalid"
    assert path in [p["path"] for p in answer["error"]["problems"]]
    assert head(repo.root) == before and git(repo.root, "status", "--porcelain") == ""
    assert sorted(p.name for p in repo.providers.iterdir()) == ["gpu.yaml", "routing.yaml"]


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("method", "path", "body", "field", "file"),
    [
        ("POST", "/servers", {"id": "new", "kind": "api_key", "server_type": "vllm"}, "kind", "new.yaml"),
        ("POST", "/servers", {"id": "new", "server_type": "vllm", "sops": {}}, "sops", "new.yaml"),
        ("POST", "/servers", {"id": "new", "server_type": "vllm", "api_key": 5}, "api_key", "new.yaml"),
        (
            "POST",
            "/api-keys",
            {"id": "new", "provider": "openai", "api_key": "****abcd"},
            "api_key",
            "new.yaml",
        ),
        ("POST", "/servers", {"server_type": "vllm", "base_url": "http://h"}, "id", ""),
        ("POST", "/servers", {"id": "../x", "server_type": "vllm", "base_url": "http://h"}, "id", ""),
        (
            "PUT",
            "/servers/gpu",
            {"id": "other", "server_type": "vllm", "base_url": "http://h"},
            "id",
            "gpu.yaml",
        ),
        ("PUT", "/servers/gpu", {"kind": "api_key", "server_type": "vllm"}, "kind", "gpu.yaml"),
        (
            "PUT",
            "/servers/gpu",
            {"server_type": "vllm", "base_url": "http://h", "api_key": []},
            "api_key",
            "gpu.yaml",
        ),
        ("PATCH", "/servers/gpu", {"kind": "api_key"}, "kind", "gpu.yaml"),
        ("PATCH", "/servers/gpu", {"id": "other"}, "id", "gpu.yaml"),
        ("PATCH", "/servers/gpu", {"api_key": 5}, "api_key", "gpu.yaml"),
        ("PATCH", "/servers/gpu", {"sops": {"mac": "x"}}, "sops", "gpu.yaml"),
        ("PATCH", "/servers/gpu", {"api_key": "sk-a\nb"}, "api_key", "gpu.yaml"),
        ("PATCH", "/servers/gpu", {"name": nested(40)}, "", "gpu.yaml"),
        ("PUT", "/active/chat", {"primary": "gpu", "weights": nested(40)}, "", "routing.yaml"),
        ("POST", "/active", {"purpose": "chat"}, "provider_id", "routing.yaml"),
        ("POST", "/active", {"purpose": "chat", "provider_id": "gpu", "x": 1}, "x", "routing.yaml"),
    ],
)
async def test_a_problem_in_the_body_names_the_file_the_write_changes(
    repo: SopsProject, service: Service, method: str, path: str, body: dict[str, Any], field: str, file: str
) -> None:
    """A 422's problems each name a file (docs/reference.md §8), those found in the body itself
    too: they said `"file": ""`. The file is the one the write changes, or makes; the folder for
    a body whose `id` names no file."""
    before = head(repo.root)
    status, answer, _ = await call(service, method, path, body)
    assert status == 422, answer
    problems = answer["error"]["problems"]
    assert field in [p["path"] for p in problems], problems
    assert {p["file"] for p in problems} == {f"providers.d/{file}".rstrip("/")}, problems
    assert head(repo.root) == before and git(repo.root, "status", "--porcelain") == ""


async def test_a_route_naming_a_missing_provider_is_refused_as_a_pull_request_would_be(
    repo: SopsProject, service: Service
) -> None:
    status, answer, _ = await call(service, "PUT", "/active/chat", {"primary": ["gpu", "ghost"]})
    assert status == 422
    (problem,) = answer["error"]["problems"]
    assert problem == {
        "file": "providers.d/routing.yaml",
        "path": "purposes.chat.primary.1",
        "message": "routing for `chat` names `ghost`, which does not exist",
    }


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[" * 100_000 + b"]" * 100_000, b'"just a string"'],
    ids=["invalid", "deeply-nested", "not-an-object"],
)
async def test_malformed_bodies_are_400_or_422_never_500(service: Service, payload: bytes) -> None:
    status, answer, _ = await call(service, "POST", "/servers", payload)
    assert status in (400, 422), answer


WRITES_WITH_A_BODY = [
    ("POST", "/api-keys"),
    ("POST", "/servers"),
    ("PUT", "/api-keys/vendor"),
    ("PUT", "/servers/gpu"),
    ("PATCH", "/api-keys/vendor"),
    ("PATCH", "/servers/gpu"),
    ("PUT", "/active/chat"),
    ("PUT", "/active/dreaming"),
    ("POST", "/active"),
]
NOT_OBJECTS = [
    b"[]",
    b"[1]",
    b'["gpu"]',
    b'"x"',
    b"5",
    b"-1.5",
    b"null",
    b"true",
    b"false",
    b'[{"primary": "gpu"}]',
]


async def test_every_write_refuses_a_body_that_is_not_an_object_alike(
    repo: SopsProject, service: Service
) -> None:
    """An array, a string, a number, `null` or a boolean is 400 on every write route, and writes
    nothing: `PUT …/active/{purpose}` took `[]` for a function of the current route (a 500)."""
    before = head(repo.root)
    for method, path in WRITES_WITH_A_BODY:
        for payload in NOT_OBJECTS:
            status, answer, _ = await call(service, method, path, payload)
            assert status == 400, (method, path, payload, answer)
            assert answer["error"]["type"] == "bad_request", (method, path, payload, answer)
            assert "must be a JSON object" in answer["error"]["message"], (method, path, payload, answer)
    assert head(repo.root) == before and git(repo.root, "status", "--porcelain") == ""
    status, _, _ = await call(service, "PUT", "/active/chat", {"primary": "gpu", "weights": {"gpu": 2}})
    assert status == 200  # and the writer still takes the next write


async def test_a_write_needs_a_json_media_type(service: Service) -> None:
    status, _, _ = await call(
        service,
        "POST",
        "/servers",
        {"id": "x", "server_type": "vllm", "base_url": "http://h"},
        content_type="text/plain",
    )
    assert status == 415


async def test_a_field_cannot_smuggle_yaml_into_the_file(repo: SopsProject, service: Service) -> None:
    name = "x\nkind: clients\nclients: []\n# <script>"
    status, answer, _ = await call(
        service,
        "POST",
        "/servers",
        {"id": "smug", "server_type": "vllm", "base_url": "http://h", "name": name},
    )
    assert status == 201, answer
    document = yaml.safe_load((repo.providers / "smug.yaml").read_text())
    assert document["kind"] == "ai_server" and document["name"] == name
    assert answer["name"] == name


async def test_a_value_is_served_exactly_as_written(repo: SopsProject, service: Service) -> None:
    """ruamel writes YAML 1.2, the service reads 1.1: unquoted, `yes` was read as true and the
    write refused (`name` must be a string), `1:20` as 80, a NEL as a space, `1e-05` as a string."""
    odd = ["yes", "on", "1:20", "No", "\x85", "a\u2028b"]
    patch = {"name": "yes", "models": odd, "model_map": {v: "m" for v in odd}, "timeout_s": 0.00001}
    status, answer, _ = await call(service, "PATCH", "/servers/gpu", patch)
    assert status == 200, answer
    served = service.registry.snapshot.providers["gpu"]
    assert (served.name, served.models, served.model_map) == ("yes", odd, {v: "m" for v in odd})
    assert served.timeout_s == 0.00001


# -- update and delete ----------------------------------------------------------------------------


async def test_put_without_a_key_keeps_the_key_and_patch_merges(repo: SopsProject, service: Service) -> None:
    assert (await call(service, "POST", "/api-keys", vendor()))[0] == 201
    status, body, _ = await call(service, "PUT", "/api-keys/vendor", {"provider": "openai", "models": ["m1"]})
    assert status == 200, body
    assert body["models"] == ["m1"] and body["api_key"] == "****" + CANARY[-4:]
    assert service.registry.snapshot.providers["vendor"].api_key == Secret(CANARY)
    assert "purposes" not in yaml.safe_load((repo.providers / "vendor.yaml").read_text())
    status, body, _ = await call(
        service,
        "PATCH",
        "/api-keys/vendor",
        {"name": "V", "models": None, "api_key": OTHER_KEY},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    assert body["name"] == "V" and body["models"] == [] and body["api_key"] == "****" + OTHER_KEY[-4:]
    assert service.registry.snapshot.providers["vendor"].api_key == Secret(OTHER_KEY)
    subjects = git(repo.root, "log", "--format=%s", "-3").splitlines()
    assert subjects == ["update api_key vendor", "update api_key vendor", "create api_key vendor"]


async def test_a_document_put_back_as_a_get_showed_it_keeps_its_key(
    repo: SopsProject, service: Service
) -> None:
    """A client that GETs a provider and PUTs (or PATCHes) the document back as it came gets the
    key kept, as when `api_key` is left out: the mask the API shows (`****` and the last four)
    was stored as the key, and the real key was gone. A mask that is not the current key's is
    refused (422), never stored."""
    assert (await call(service, "POST", "/api-keys", vendor()))[0] == 201
    status, shown, _ = await call(service, "GET", "/api-keys/vendor")
    assert status == 200 and shown["api_key"] == "****" + CANARY[-4:]
    document = {k: v for k, v in shown.items() if k in vendor() or k in ("kind", "name", "models")}
    for sent in (document, {**document, "models": ["m1"]}):
        status, body, _ = await call(service, "PUT", "/api-keys/vendor", sent)
        assert status == 200, body
        assert body["api_key"] == shown["api_key"]
        assert service.registry.snapshot.providers["vendor"].api_key == Secret(CANARY)
    status, body, _ = await call(
        service,
        "PATCH",
        "/api-keys/vendor",
        {"api_key": shown["api_key"], "name": "V"},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    assert service.registry.snapshot.providers["vendor"].api_key == Secret(CANARY)
    changed = head(repo.root)
    for method, path, sent in [
        ("PUT", "/api-keys/vendor", {**document, "api_key": "****abcd"}),
        ("PATCH", "/api-keys/vendor", {"api_key": "****"}),
        ("POST", "/api-keys", {**vendor(), "id": "other", "api_key": shown["api_key"]}),
    ]:
        status, body, _ = await call(service, method, path, sent)
        assert status == 422, (method, body)
        assert body["error"]["problems"][0]["path"] == "api_key" and "masked" in body["error"]["message"]
    assert head(repo.root) == changed
    assert service.registry.snapshot.providers["vendor"].api_key == Secret(CANARY)


async def test_an_edit_keeps_the_comments_people_wrote(repo: SopsProject, service: Service) -> None:
    path = repo.providers / "gpu.yaml"
    path.write_text("# Our GPU box: ask #infra before touching it\n" + path.read_text() + "# end\n")
    commit_all(repo.root, "comment")
    await asyncio.sleep(0)
    status, body, _ = await call(service, "PATCH", "/servers/gpu", {"name": "GPU"})
    assert status == 200, body
    text = path.read_text()
    assert text.startswith("# Our GPU box: ask #infra before touching it\n") and "name: GPU" in text


async def test_a_change_to_nothing_makes_no_commit(repo: SopsProject, service: Service) -> None:
    before = head(repo.root)
    status, body, _ = await call(service, "PATCH", "/servers/gpu", {"server_type": "vllm"})
    assert status == 200 and head(repo.root) == before and body["id"] == "gpu"


async def test_if_match_refuses_a_write_to_a_file_that_changed(repo: SopsProject, service: Service) -> None:
    etag = f'"{blob((repo.providers / "gpu.yaml").read_bytes())}"'
    status, _, headers = await call(
        service, "PATCH", "/servers/gpu", {"name": "one"}, headers={"If-Match": etag}
    )
    assert status == 200
    new_etag = headers["ETag"]
    status, answer, _ = await call(
        service, "PATCH", "/servers/gpu", {"name": "two"}, headers={"If-Match": etag}
    )
    assert status == 412 and answer["error"]["type"] == "precondition_failed"
    with_index = new_etag[:-1] + '.17"'  # a GET's tag carries the index after the blob: only the blob counts
    status, _, _ = await call(
        service, "PATCH", "/servers/gpu", {"name": "two"}, headers={"If-Match": with_index}
    )
    assert status == 200
    assert yaml.safe_load((repo.providers / "gpu.yaml").read_text())["name"] == "two"


async def test_delete_is_refused_while_routed_then_removes_the_file(
    repo: SopsProject, service: Service
) -> None:
    write_server(repo, "spare")
    commit_all(repo.root, "spare")
    await asyncio.sleep(0)
    status, answer, _ = await call(service, "DELETE", "/servers/gpu")
    assert status == 409 and "routing names `gpu`" in answer["error"]["message"]
    status, answer, _ = await call(service, "DELETE", "/servers/spare")
    assert status == 200, answer
    assert not (repo.providers / "spare.yaml").exists()
    assert "spare" not in service.registry.snapshot.providers
    assert git(repo.root, "log", "-1", "--format=%s") == "delete ai_server spare"


async def test_a_provider_file_git_holds_broken_does_not_refuse_writes_to_the_others(
    repo: SopsProject, service: Service
) -> None:
    """docs/reference.md §8: a write is checked as `validate` checks the folder after it. When
    git holds a provider file that does not load, and routing names that provider, `validate`
    reports that file alone (routing may name a provider whose file is refused, section 4); a
    write to another file was refused 422, "routing names `spare`, which does not exist"."""
    write_server(repo, "spare")
    write_routing(repo, ["gpu"], fallbacks=["spare"])
    commit_all(repo.root, "spare")
    (repo.providers / "spare.yaml").write_text("kind: ai_server\nid: spare\nserver_type: vllm\n")
    commit_all(repo.root, "spare broken")
    await eventually(lambda: any(f.endswith("spare.yaml") for f in service.registry.refused))
    status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "still writable"})
    assert status == 200, answer
    assert service.registry.snapshot.providers["gpu"].name == "still writable"
    status, answer, _ = await call(service, "PUT", "/active/chat", {"primary": "gpu", "fallbacks": ["spare"]})
    assert status == 200, answer


async def test_a_write_to_the_wrong_kind_or_id_is_404(service: Service) -> None:
    assert (await call(service, "PATCH", "/api-keys/gpu", {"name": "x"}))[0] == 404
    assert (await call(service, "PATCH", "/servers/nobody", {"name": "x"}))[0] == 404
    assert (await call(service, "DELETE", "/servers/nobody"))[0] == 404


# -- routes ------------------------------------------------------------------------------------------


async def test_a_route_is_set_and_the_old_form_still_works(repo: SopsProject, service: Service) -> None:
    write_server(repo, "spare")
    commit_all(repo.root, "spare")
    status, body, headers = await call(
        service, "PUT", "/active/chat", {"primary": ["gpu", "spare"], "weights": {"gpu": 3}}
    )
    assert status == 200, body
    assert [p["id"] for p in body["primary"]] == ["gpu", "spare"] and body["weights"] == {
        "gpu": 3,
        "spare": 1,
    }
    assert headers["ETag"].startswith(f'W/"{blob((repo.providers / "routing.yaml").read_bytes())}.')
    assert git(repo.root, "log", "-1", "--format=%s") == "update routing chat"
    status, body, _ = await call(
        service, "POST", "/active", {"purpose": "chat", "provider_id": "spare", "fallback_provider_id": "gpu"}
    )
    assert status == 200, body
    assert [p["id"] for p in body["primary"]] == ["spare"] and [p["id"] for p in body["fallbacks"]] == ["gpu"]
    status, body, _ = await call(service, "POST", "/active", {"purpose": "chat", "provider_id": "gpu"})
    assert [p["id"] for p in body["primary"]] == ["gpu"] and body["fallbacks"] == []
    assert (await call(service, "PUT", "/active/dreaming", {"primary": "gpu"}))[0] == 404
    assert (await call(service, "POST", "/active", {"purpose": "chat"}))[0] == 422


async def test_a_route_write_leaves_the_other_purposes_as_people_wrote_them(repo: SopsProject) -> None:
    """docs/reference.md §8: "A route write changes only what it names". A change anywhere under
    `purposes` wrote the whole mapping again: every other purpose lost its comments and style."""
    write_server(repo, "tei", purposes="embeddings")
    embeddings = "  embeddings:\n    # ask #infra before moving this\n    primary: [tei]  # the tei box\n"
    (repo.providers / "routing.yaml").write_text(
        "kind: routing\npurposes:\n  chat:\n    primary: [gpu]  # for now\n" + embeddings
    )
    commit_all(repo.root, "two purposes, commented")
    async with serve(repo) as service:
        status, body, _ = await call(
            service, "PUT", "/active/chat", {"primary": ["gpu"], "weights": {"gpu": 2}}
        )
        assert status == 200, body
    text = (repo.providers / "routing.yaml").read_text()
    assert text.endswith(embeddings) and "primary: [gpu]  # for now\n" in text, text


async def test_a_routes_etag_is_what_if_match_takes_to_change_it(repo: SopsProject, service: Service) -> None:
    """`GET …/active/{purpose}`'s tag starts with the routing file's blob: a read-modify-write
    (the console's route form) is refused when the routing changed in between."""
    async with service.http.get(service.url + API + "/active/chat") as response:
        tag = response.headers["ETag"]
    tagged = tag.removeprefix("W/").strip('"').split(".")[0]
    assert tagged == blob((repo.providers / "routing.yaml").read_bytes())
    headers = {"If-Match": tag}
    status, body, _ = await call(
        service, "PUT", "/active/chat", {"primary": ["gpu"], "weights": {"gpu": 2}}, headers=headers
    )
    assert status == 200, body
    status, body, _ = await call(service, "PUT", "/active/chat", {"primary": ["gpu"]}, headers=headers)
    assert status == 412, body
    async with service.http.get(
        service.url + API + "/active/chat", headers={"If-None-Match": tag}
    ) as response:
        assert response.status == 200  # the whole tag moved with the file
        fresh = response.headers["ETag"]
    async with service.http.get(
        service.url + API + "/active/chat", headers={"If-None-Match": fresh}
    ) as response:
        assert response.status == 304


async def test_if_match_on_a_route_whose_routing_file_was_removed_since_is_412(
    repo: SopsProject, service: Service
) -> None:
    """docs/reference.md §8: `If-Match` answers 412 "when the file changed since"; a routing file
    removed since is one. The write went on and made a new `routing.yaml`, as if none had been
    read."""
    async with service.http.get(service.url + API + "/active/chat") as response:
        tag = response.headers["ETag"]
    git(repo.root, "rm", "-q", str(repo.providers / "routing.yaml"))
    removed = commit_all(repo.root, "no routing")
    await eventually(lambda: service.registry.snapshot.commit == removed)
    for if_match in (tag, "*"):
        status, answer, _ = await call(
            service, "PUT", "/active/chat", {"primary": ["gpu"]}, headers={"If-Match": if_match}
        )
        assert status == 412 and answer["error"]["type"] == "precondition_failed", answer
    assert head(repo.root) == removed and not (repo.providers / "routing.yaml").exists()
    status, answer, _ = await call(service, "PUT", "/active/chat", {"primary": ["gpu"]})
    assert status == 200, answer  # without If-Match, the last write wins


# -- auth ----------------------------------------------------------------------------------------------


async def test_writes_need_config_write_and_name_the_client(repo: SopsProject) -> None:
    from tests.support.gateway import write_clients

    write_clients(repo, {"deployer": ("tok-w", ["config:write"]), "reader": ("tok-r", ["config:read"])})
    commit_all(repo.root, "clients")
    async with serve(repo) as service:
        body = {"id": "x", "server_type": "vllm", "base_url": "http://h"}
        assert (await call(service, "POST", "/servers", body))[0] == 401
        assert (await call(service, "POST", "/servers", body, token="tok-r"))[0] == 403
        status, answer, _ = await call(service, "POST", "/servers", body, token="tok-w")
        assert status == 201, answer
    log = git(repo.root, "log", "-1", "--format=%an <%ae>%n%B")
    assert log.startswith("deployer <deployer@clients.switchboard.invalid>\n")
    assert log.rstrip().endswith("Switchboard-Client: deployer")


async def test_the_committer_is_the_one_configured(
    repo: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/reference.md §8: "committer from `SWITCHBOARD_GIT_COMMITTER`"; the author stays the client."""
    monkeypatch.setenv("SWITCHBOARD_GIT_COMMITTER", "Config Bot <config-bot@example.org>")
    async with serve(repo) as service:
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "x"})
        assert status == 200, answer
    assert git(repo.root, "log", "-1", "--format=%cn <%ce>|%an <%ae>") == (
        "Config Bot <config-bot@example.org>|anonymous <anonymous@clients.switchboard.invalid>"
    )


# -- nothing half-done -------------------------------------------------------------------------------


async def test_a_file_with_local_edits_is_never_overwritten(repo: SopsProject, service: Service) -> None:
    path = repo.providers / "gpu.yaml"
    edited = path.read_text() + "name: mine\n"
    path.write_text(edited)
    before = head(repo.root)
    status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "theirs"})
    assert status == 409 and "local changes" in answer["error"]["message"]
    assert path.read_text() == edited and head(repo.root) == before


async def test_a_file_with_local_edits_is_409_with_the_tag_a_get_gave_of_it_too(
    repo: SopsProject, service: Service
) -> None:
    """docs/reference.md §8: a file with uncommitted local changes is 409, and 412 is for a file
    that "changed since". A client holding the tag of what is served (the local edit, which the
    watcher loaded) got 412 "changed since; read it again", and reading again gave it the same
    tag: it could never learn what was in the way. The local changes are the answer, whatever
    the tag."""
    path = repo.providers / "gpu.yaml"
    edited = path.read_text() + "name: mine\n"
    path.write_text(edited)
    await eventually(lambda: service.registry.snapshot.providers["gpu"].name == "mine")
    before = head(repo.root)
    async with service.http.get(service.url + API + "/servers/gpu") as response:
        tag = response.headers["ETag"]
    for if_match in (tag, f'"{blob(edited.encode())}"'):
        for method, body in (("PATCH", {"name": "theirs"}), ("DELETE", None)):
            status, answer, _ = await call(
                service, method, "/servers/gpu", body, headers={"If-Match": if_match}
            )
            assert status == 409 and "local changes" in answer["error"]["message"], (method, answer)
    assert path.read_text() == edited and head(repo.root) == before


async def test_a_provider_served_from_a_file_not_yet_committed_is_409_not_404(
    repo: SopsProject, service: Service
) -> None:
    """docs/reference.md §8: a file with uncommitted local changes is never overwritten (409).
    A file that git does not hold yet is such a change: the service serves it (a GET answers
    200), so a PUT, PATCH or DELETE of it answered 404 "no provider", as if it did not exist."""
    path = write_server(repo, "draft")
    await eventually(lambda: "draft" in service.registry.snapshot.providers)
    assert (await call(service, "GET", "/servers/draft"))[0] == 200
    before, text = head(repo.root), path.read_text()
    whole = {"id": "draft", "server_type": "vllm", "base_url": "http://127.0.0.1:9/v2"}
    for method, body in (("PUT", whole), ("PATCH", {"name": "theirs"}), ("DELETE", None)):
        status, answer, _ = await call(service, method, "/servers/draft", body)
        assert status == 409 and "local changes" in answer["error"]["message"], (method, answer)
    assert path.read_text() == text and head(repo.root) == before
    # a provider nobody has, committed or not, is still 404
    assert (await call(service, "PATCH", "/servers/nobody", {"name": "x"}))[0] == 404


async def test_git_refusing_the_commit_leaves_file_and_branch_as_they_were(
    repo: SopsProject, service: Service
) -> None:
    lock = repo.root / ".git" / "refs" / "heads" / "main.lock"
    lock.write_text("")
    before = head(repo.root)
    try:
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "locked"})
    finally:
        lock.unlink()
    assert status == 409 and "git refused" in answer["error"]["message"]
    assert head(repo.root) == before and git(repo.root, "status", "--porcelain") == ""
    assert "name" not in yaml.safe_load((repo.providers / "gpu.yaml").read_text())


async def test_no_hook_of_the_repository_runs_and_git_gets_no_identity_or_key(
    repo: SopsProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "hook-ran"
    hooks = repo.root / ".git" / "hooks"
    for name in (
        "pre-commit",
        "commit-msg",
        "post-commit",
        "reference-transaction",
        "post-checkout",
        "post-index-change",
        "pre-push",
        "post-rewrite",
    ):
        hook = hooks / name
        hook.write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    # A real git behind a shim that records the environment every git call gets.
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    seen = tmp_path / "git-env"
    real_git = subprocess.run(["which", "git"], capture_output=True, text=True, check=True).stdout.strip()
    shim = shim_dir / "git"
    shim.write_text(f'#!/bin/sh\nenv >> {seen}\necho ---- >> {seen}\nexec {real_git} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SOPS_AGE_KEY", "AGE-SECRET-KEY-1NOTAREALKEYBUTITMUSTNOTREACHGIT")
    monkeypatch.setenv("SWITCHBOARD_WEBHOOK_SECRET", "webhook-secret-must-not-reach-git")
    async with serve(repo) as service:
        status, answer, _ = await call(service, "POST", "/api-keys", vendor())
        assert status == 201, answer
        assert (await call(service, "PATCH", "/api-keys/vendor", {"name": "n"}))[0] == 200
    assert not marker.exists(), marker.read_text()
    environments = seen.read_text()
    assert environments.count("----") > 5
    for leaked in ("SOPS_AGE", "GIT_AUTHOR_", "GIT_COMMITTER_", "webhook-secret", "NOTAREALKEY", CANARY):
        assert leaked not in environments


# -- many writers ------------------------------------------------------------------------------------


async def test_twenty_concurrent_writes_are_twenty_commits_and_events_in_one_order(
    repo: SopsProject, service: Service
) -> None:
    before = head(repo.root)
    bodies = [
        {"id": f"s{i:02d}", "server_type": "vllm", "base_url": f"http://127.0.0.1:{9000 + i}/v1"}
        for i in range(20)
    ]
    results = await asyncio.gather(*(call(service, "POST", "/servers", b) for b in bodies))
    assert [r[0] for r in results] == [201] * 20
    commits = git(repo.root, "log", "--reverse", "--format=%H %s", f"{before}..HEAD").splitlines()
    assert len(commits) == 20
    order = [line.split()[-1] for line in commits]
    added = [e for e in service.events() if e.type == "provider.added" and e.subject in order]
    assert [e.subject for e in added] == order
    assert [e.commit for e in added] == [line.split()[0] for line in commits]
    assert sorted(r[1]["generation"] for r in results) == [
        r[1]["generation"] for r in sorted(results, key=lambda r: r[1]["generation"])
    ]
    assert git(repo.root, "status", "--porcelain") == ""


async def test_writes_waiting_beyond_the_bound_are_refused_busy(repo: SopsProject, service: Service) -> None:
    """Writes run one at a time; those waiting their turn are bounded (64; 3 here), so a
    client firing writes without waiting for answers cannot queue them without end. The
    refused ones are 503 with Retry-After and leave no commit; the rest land."""
    service.app[WRITER].max_waiting = 3
    before = head(repo.root)
    bodies = [
        {"id": f"q{i:02d}", "server_type": "vllm", "base_url": f"http://127.0.0.1:{9100 + i}/v1"}
        for i in range(10)
    ]
    results = await asyncio.gather(*(call(service, "POST", "/servers", b) for b in bodies))
    statuses = [r[0] for r in results]
    assert set(statuses) == {201, 503} and 1 + 3 <= statuses.count(201) < 10
    busy = [r for r in results if r[0] == 503]
    assert all(r[1]["error"]["type"] == "busy" and r[2]["Retry-After"] == "1" for r in busy)
    commits = git(repo.root, "log", "--format=%s", f"{before}..HEAD").splitlines()
    assert len(commits) == statuses.count(201)
    assert service.app[WRITER].waiting == 0
    again = await call(service, "POST", "/servers", bodies[statuses.index(503)])
    assert again[0] == 201


# -- modes -------------------------------------------------------------------------------------------


async def test_branch_mode_commits_to_a_new_branch_and_applies_nothing(repo: SopsProject) -> None:
    async with serve(repo, write_mode="branch") as service:
        before = head(repo.root)
        generation = service.registry.snapshot.generation
        status, body, _ = await call(service, "PATCH", "/servers/gpu", {"name": "reviewed"})
        assert status == 202, body
        assert body["branch"] == "switchboard/update-gpu-1"
        status, body2, _ = await call(service, "PATCH", "/servers/gpu", {"name": "again"})
        assert body2["branch"] == "switchboard/update-gpu-2"
        assert head(repo.root) == before and git(repo.root, "status", "--porcelain") == ""
        assert service.registry.snapshot.generation == generation
        assert git(repo.root, "rev-parse", "switchboard/update-gpu-1") == body["commit"]
        shown = git(repo.root, "show", f"{body['commit']}:providers.d/gpu.yaml")
        assert "name: reviewed" in shown


async def test_writes_outside_git_are_405(sops_project: SopsProject) -> None:
    write_server(sops_project, "gpu")
    async with serve(sops_project) as service:
        status, body, headers = await call(service, "PATCH", "/servers/gpu", {"name": "x"})
    assert status == 405 and "git" in body["error"]["message"]
    assert headers["Allow"] == "GET, HEAD"  # the path is still read


async def test_write_mode_off_is_405(repo: SopsProject) -> None:
    async with serve(repo, write_mode="off") as service:
        status, _, headers = await call(service, "PATCH", "/servers/gpu", {"name": "x"})
    assert status == 405 and headers["Allow"] == "GET, HEAD"


INVALID_WRITES = [
    ("POST", "/servers", {}),  # no id: 422 when writes are on
    ("POST", "/active", {"purpose": 5}),
    ("PUT", "/active/chat", []),
    ("PUT", "/servers/gpu", {"base_url": 5}),
    ("PATCH", "/servers/gpu", []),  # not a merge patch: 400 when writes are on
    ("DELETE", "/servers/nobody", None),  # 404 when writes are on
    ("POST", "/servers", "not json"),  # sent as its bytes: a body that is no JSON
]


@pytest.mark.parametrize(("method", "path", "body"), INVALID_WRITES)
async def test_writes_off_are_405_before_the_body_is_judged(
    sops_project: SopsProject, method: str, path: str, body: Any
) -> None:
    """docs/reference.md §8: a write that could never be made says so first, with `Allow: GET,
    HEAD`, not what its body lacks (422, 400) nor that its target is unknown (404)."""
    write_server(sops_project, "gpu")
    async with serve(sops_project) as service:  # outside git: writes are off
        status, answer, sent = await call(service, method, path, b"{not json" if body == "not json" else body)
    assert (status, sent["Allow"]) == (405, "GET, HEAD"), answer
    assert "writes over HTTP are off" in answer["error"]["message"]


# -- a remote --------------------------------------------------------------------------------------


@pytest.fixture
def remote(repo: SopsProject, tmp_path: Path) -> Path:
    """A bare repository standing in for GitHub, with `repo`'s main pushed to it as origin."""
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    git(repo.root, "remote", "add", "origin", str(bare))
    git(repo.root, "push", "-q", "origin", "main")
    return bare


def other_clone(remote: Path, tmp_path: Path, name: str = "colleague") -> Path:
    clone = tmp_path / name
    subprocess.run(["git", "clone", "-q", str(remote), str(clone)], check=True)
    return clone


async def test_a_write_is_pushed_and_rebased_over_a_colleagues_push(
    repo: SopsProject, remote: Path, tmp_path: Path
) -> None:
    clone = other_clone(remote, tmp_path)
    async with serve(repo, git_push="origin") as service:
        (clone / "providers.d" / "theirs.yaml").write_text(
            "kind: ai_server\nid: theirs\nserver_type: ollama\nbase_url: http://127.0.0.1:11434/v1\n"
        )
        commit_all(clone, "colleague adds theirs")
        git(clone, "push", "-q", "origin", "main")
        status, body, _ = await call(service, "PATCH", "/servers/gpu", {"name": "ours"})
        assert status == 200, body
        assert body["commit"] == git(remote, "rev-parse", "main") == head(repo.root)
        assert {"gpu", "theirs"} <= set(service.registry.snapshot.providers)
    assert git(repo.root, "status", "--porcelain") == ""
    assert git(remote, "log", "--format=%s", "-2", "main").splitlines() == [
        "update ai_server gpu",
        "colleague adds theirs",
    ]


async def test_branch_mode_pushes_a_branch_new_on_the_remote_too(
    repo: SopsProject, remote: Path, tmp_path: Path
) -> None:
    """docs/reference.md §8: in `branch` mode "the commit goes to a new branch", pushed with
    `SWITCHBOARD_GIT_PUSH`. The number followed this repository's branches only: a name another
    replica (or a colleague) had pushed refused the push, and every such write was a 409."""
    clone = other_clone(remote, tmp_path)
    git(clone, "checkout", "-q", "-b", "switchboard/update-gpu-1")
    git(clone, "commit", "-q", "--allow-empty", "-m", "another replica's review branch")
    git(clone, "push", "-q", "origin", "switchboard/update-gpu-1")
    theirs = git(remote, "rev-parse", "switchboard/update-gpu-1")
    async with serve(repo, write_mode="branch", git_push="origin") as service:
        status, body, _ = await call(service, "PATCH", "/servers/gpu", {"name": "reviewed"})
    assert status == 202, body
    assert body["branch"] == "switchboard/update-gpu-2"
    assert git(remote, "rev-parse", "switchboard/update-gpu-2") == body["commit"]
    assert git(remote, "rev-parse", "switchboard/update-gpu-1") == theirs  # theirs, untouched
    assert git(repo.root, "for-each-ref", "--format=%(refname:short)", "refs/heads/switchboard") == (
        "switchboard/update-gpu-2"
    )


async def test_a_push_refused_every_time_leaves_local_and_remote_as_they_were(
    repo: SopsProject, remote: Path
) -> None:
    hook = remote / "hooks" / "pre-receive"
    hook.write_text(
        "#!/bin/sh\necho 'main is protected: see https://bot:pw-9c1d@rules.example/' >&2\nexit 1\n"
    )
    hook.chmod(0o755)
    before, remote_before = head(repo.root), git(remote, "rev-parse", "main")
    async with serve(repo, git_push="origin") as service:
        status, body, _ = await call(service, "PATCH", "/servers/gpu", {"name": "ours"})
    assert status == 409 and "push" in body["error"]["message"]
    # the hook's reason, not only git's `failed to push some refs`, and no credential of a URL
    assert "remote: main is protected: see https://****@rules.example/" in body["error"]["message"], body
    assert "pw-9c1d" not in json.dumps(body)
    assert head(repo.root) == before and git(remote, "rev-parse", "main") == remote_before
    assert git(repo.root, "status", "--porcelain") == ""


async def test_a_conflicting_remote_change_is_validated_again(
    repo: SopsProject, remote: Path, tmp_path: Path
) -> None:
    """The colleague removed `spare` while we route to it: the rebuilt write is refused."""
    write_server(repo, "spare")
    commit_all(repo.root, "spare")
    git(repo.root, "push", "-q", "origin", "main")
    clone = other_clone(remote, tmp_path)
    (clone / "providers.d" / "spare.yaml").unlink()
    commit_all(clone, "colleague removes spare")
    git(clone, "push", "-q", "origin", "main")
    before = head(repo.root)
    async with serve(repo, git_push="origin") as service:
        status, body, _ = await call(service, "PUT", "/active/chat", {"primary": ["spare"]})
    assert status == 422, body
    assert head(repo.root) == before


# -- secrets -------------------------------------------------------------------------------------------


async def test_a_canary_key_written_over_http_is_in_no_file_commit_event_log_or_answer(
    repo: SopsProject, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    answers = []
    async with serve(repo) as service:
        for method, path, body in (
            ("POST", "/api-keys", vendor()),
            ("PATCH", "/api-keys/vendor", {"name": "renamed"}),
            ("PUT", "/api-keys/vendor", {"provider": "openai", "api_key": CANARY, "base_url": "ftp://bad"}),
            ("POST", "/api-keys", vendor(id="other", provider="nope")),
            ("PUT", "/active/chat", {"primary": ["gpu", "vendor"]}),
            ("GET", "/providers", None),
        ):
            _, answer, headers = await call(service, method, path, body)
            answers.append(json.dumps(answer) + json.dumps(dict(headers)))
        _, metrics = await service.text("/metrics")
    everything = "\n".join(answers) + metrics + caplog.text + service.events_file.read_text()
    everything += subprocess.run(
        ["git", "log", "--all", "-p", "--format=%B"],
        cwd=repo.root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for path in repo.root.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            everything += path.read_text(errors="replace")
    objects = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch"], cwd=repo.root, capture_output=True, check=True
    ).stdout
    assert CANARY not in everything and CANARY.encode() not in objects
    assert "****" + CANARY[-4:] in everything


async def test_a_key_with_a_line_break_is_refused_before_anything_is_written(
    repo: SopsProject, service: Service
) -> None:
    """Such a key could never be sent (no HTTP header carries a line break): it made every request 500."""
    before = head(repo.root)
    status, body, _ = await call(service, "POST", "/api-keys", vendor(api_key="sk-a\r\nInjected: yes"))
    assert (status, body["error"]["problems"][0]["path"]) == (422, "api_key"), body
    assert "Injected" not in json.dumps(body)
    assert head(repo.root) == before and not (repo.providers / "vendor.yaml").exists()


async def test_a_number_out_of_range_is_refused_and_later_writes_still_land(
    repo: SopsProject, service: Service
) -> None:
    """`1e400` is JSON for infinity: it was committed, and its event could not be logged (500s after)."""
    server = {"id": "tei", "server_type": "tei", "base_url": "http://127.0.0.1:8081"}
    raw = json.dumps(server | {"timeout_s": 0}).replace('"timeout_s": 0', '"timeout_s": 1e400').encode()
    status, body, _ = await call(service, "POST", "/servers", raw)
    assert (status, body["error"]["problems"][0]["path"]) == (422, "timeout_s"), body
    status, body, _ = await call(service, "POST", "/servers", server)
    assert status == 201, body


# -- a hostile client: config:write, and nothing else ----------------------------------------------


@pytest.fixture
async def hostile(repo: SopsProject) -> AsyncIterator[Service]:
    """The service with a keyed provider `vendor`, and clients `writer` (config:write only) and
    `keeper` (config:write and secrets:read)."""
    from tests.support.gateway import write_clients

    write_clients(
        repo,
        {"writer": ("tok-w", ["config:write"]), "keeper": ("tok-k", ["config:write", "secrets:read"])},
    )
    commit_all(repo.root, "clients")
    async with serve(repo) as running:
        status, answer, _ = await call(running, "POST", "/api-keys", vendor(), token="tok-w")
        assert status == 201, answer
        yield running


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("PATCH", {"base_url": "https://attacker.example/v1"}),
        ("PATCH", {"provider": "groq"}),
        ("PUT", {"provider": "openai", "base_url": "https://attacker.example/v1", "purposes": ["chat"]}),
        ("PATCH", {"base_url": "https://attacker.example/v1", "api_key": "****" + CANARY[-4:]}),
    ],
    ids=["patch-base-url", "patch-vendor", "put-without-the-key", "patch-with-the-keys-mask"],
)
async def test_a_client_that_cannot_read_a_key_cannot_send_it_to_another_host(
    repo: SopsProject, hostile: Service, method: str, body: dict[str, Any]
) -> None:
    """docs/reference.md §2.4: the MAC covers every value so that nobody can send a key they cannot read to a
    host of their choosing. The service holds the identity, so it must keep that promise itself."""
    path = repo.providers / "vendor.yaml"
    before, data = head(repo.root), path.read_bytes()
    status, answer, _ = await call(hostile, method, "/api-keys/vendor", body, token="tok-w")
    assert status == 403, answer
    assert answer["error"]["type"] == "forbidden" and "api_key" in answer["error"]["message"]
    assert head(repo.root) == before and path.read_bytes() == data
    assert hostile.registry.snapshot.providers["vendor"].endpoint == "https://api.openai.com/v1"


KEYED_SERVER = {"id": "keyed", "server_type": "vllm", "base_url": "http://127.0.0.1:9/v1", "api_key": CANARY}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/servers/keyed", {"server_type": "tei"}),
        ("PUT", "/servers/keyed", {"server_type": "tei", "base_url": "http://127.0.0.1:9/v1"}),
        ("PUT", "/api-keys/vendor", {"provider": "groq", "purposes": ["chat"]}),
        ("PATCH", "/api-keys/vendor", {"provider": "anthropic", "base_url": "https://api.openai.com/v1"}),
    ],
    ids=["patch-server-type", "put-server-type", "put-vendor", "patch-vendor"],
)
async def test_a_keyed_provider_cannot_change_its_protocol_without_its_key(
    repo: SopsProject, hostile: Service, method: str, path: str, body: dict[str, Any]
) -> None:
    """docs/reference.md §8: a write that changes `server_type` or `provider` of a file holding a key, without
    the key, needs secrets:read as well: the protocol decides the paths and headers the key goes
    in (a `tei` server gets `/rerank` and `/info` at its root), as `base_url` decides the host.
    A `server_type` change was answered 200."""
    status, answer, _ = await call(hostile, "POST", "/servers", KEYED_SERVER, token="tok-w")
    assert status == 201, answer
    file = repo.providers / f"{path.rsplit('/', 1)[1]}.yaml"
    before, data = head(repo.root), file.read_bytes()
    status, answer, _ = await call(hostile, method, path, body, token="tok-w")
    assert status == 403, answer
    assert answer["error"]["type"] == "forbidden" and "api_key" in answer["error"]["message"]
    assert head(repo.root) == before and file.read_bytes() == data
    status, answer, _ = await call(hostile, method, path, body, token="tok-k")  # it may read the key
    assert status == 200, answer


async def test_a_keyed_server_changes_its_protocol_with_its_key_sent_along(
    repo: SopsProject, hostile: Service
) -> None:
    status, answer, _ = await call(hostile, "POST", "/servers", KEYED_SERVER, token="tok-w")
    assert status == 201, answer
    status, answer, _ = await call(
        hostile, "PATCH", "/servers/keyed", {"server_type": "tei", "api_key": OTHER_KEY}, token="tok-w"
    )
    assert status == 200, answer
    assert hostile.registry.snapshot.providers["keyed"].label == "tei"
    status, answer, _ = await call(hostile, "PATCH", "/servers/keyed", {"name": "GPU"}, token="tok-w")
    assert status == 200, answer  # other fields stay the writer's to change


async def test_a_key_moves_with_the_key_sent_along_or_for_a_client_that_may_read_it(
    repo: SopsProject, hostile: Service
) -> None:
    status, answer, _ = await call(hostile, "PATCH", "/api-keys/vendor", {"name": "V"}, token="tok-w")
    assert status == 200, answer  # other fields stay the writer's to change
    moved = {"base_url": "https://a.example/v1", "api_key": OTHER_KEY}
    status, answer, _ = await call(hostile, "PATCH", "/api-keys/vendor", moved, token="tok-w")
    assert status == 200, answer  # its own key: it may send that anywhere
    assert hostile.registry.snapshot.providers["vendor"].api_key == Secret(OTHER_KEY)
    status, answer, _ = await call(
        hostile, "PATCH", "/api-keys/vendor", {"base_url": "https://b.example/v1"}, token="tok-k"
    )
    assert status == 200, answer
    assert hostile.registry.snapshot.providers["vendor"].endpoint == "https://b.example/v1"


@pytest.mark.parametrize(
    ("method", "path", "payload", "status"),
    [
        ("PATCH", "/servers/gpu", b'{"timeout_s": 1e999}', 422),
        ("PATCH", "/servers/gpu", b'{"first_byte_timeout_s": Infinity}', 400),
        ("PUT", "/active/chat", b'{"primary": "gpu", "weights": {"gpu": NaN}}', 400),
        ("PUT", "/active/chat", b'{"primary": "gpu", "weights": {"gpu": 1e400}}', 422),
    ],
    ids=["overflow", "infinity", "nan", "infinite-weight"],
)
async def test_a_number_json_cannot_hold_is_refused_and_never_wedges_the_service(
    repo: SopsProject, service: Service, method: str, path: str, payload: bytes, status: int
) -> None:
    """`.inf` in a file would be committed, then every reload (and every restart) fail writing
    an event the log cannot hold: the service would apply no change ever again."""
    before = head(repo.root)
    answer_status, answer, _ = await call(service, method, path, payload)
    assert answer_status == status, answer
    assert head(repo.root) == before and git(repo.root, "status", "--porcelain") == ""
    status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "still works"})
    assert status == 200, answer
    assert service.registry.snapshot.providers["gpu"].name == "still works"


async def test_a_write_the_service_does_not_apply_is_undone(repo: SopsProject) -> None:
    """Checked at HEAD, a delete is fine; but someone's uncommitted routing edit names the
    provider, so the reload refuses the batch. The answer must not say it was applied."""
    write_server(repo, "spare")
    commit_all(repo.root, "spare")
    async with serve(repo) as service:
        routing = repo.providers / "routing.yaml"
        routing.write_text("kind: routing\npurposes:\n  chat:\n    primary: [gpu, spare]\n")

        def edit_applied() -> None:
            routing = service.registry.snapshot.routing
            assert routing is not None and routing.purposes["chat"].primary == ["gpu", "spare"]

        await eventually(edit_applied)  # the watcher applied the local edit
        before = head(repo.root)
        status, answer, _ = await call(service, "DELETE", "/servers/spare")
        assert status == 409, answer
        assert "undone" in answer["error"]["message"]
        assert head(repo.root) == before and (repo.providers / "spare.yaml").exists()
        assert git(repo.root, "status", "--porcelain") == "M providers.d/routing.yaml"  # theirs, kept
        assert "spare" in service.registry.snapshot.providers


async def test_a_write_body_larger_than_a_file_may_be_is_refused_before_any_work(
    repo: SopsProject, service: Service
) -> None:
    """No file over 1 MiB is valid, so a larger body is 413 at once: rendering and encrypting
    16 MiB took ~20 s of CPU with the write lock held, every other write waiting."""
    body = json.dumps({"models": [f"model-{i:07d}" for i in range(100_000)]}).encode()
    assert len(body) > 1 << 20
    before = head(repo.root)
    url, headers = service.url + API + "/servers/gpu", {"Content-Type": "application/json"}
    async with service.http.patch(url, data=io.BytesIO(body), headers=headers) as response:
        assert response.status == 413, await response.text()
    assert head(repo.root) == before


async def test_branch_mode_names_a_branch_for_any_id_in_one_look(repo: SopsProject) -> None:
    """`a..b` is a valid id but not a valid ref name: each of 10,000 numbers was tried, one git
    call each (15 s, the write lock held), and the write refused. Numbers follow the highest."""
    for n in (1, 2, 7):
        git(repo.root, "update-ref", f"refs/heads/switchboard/update-gpu-{n}", "HEAD")
    async with serve(repo, write_mode="branch") as service:
        body = {"id": "a..b", "server_type": "vllm", "base_url": "http://127.0.0.1:9/v1"}
        status, answer, _ = await call(service, "POST", "/servers", body)
        assert status == 202, answer
        assert answer["branch"] == "switchboard/create-a.b-1"
        assert git(repo.root, "show", f"{answer['branch']}:providers.d/a..b.yaml").startswith("# yaml")
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "n"})
        assert status == 202 and answer["branch"] == "switchboard/update-gpu-8", answer


async def test_sending_the_current_key_is_not_told_apart_from_a_wrong_guess(
    repo: SopsProject, hostile: Service
) -> None:
    """ "No change, no commit" compared the decrypted key: a right guess answered 200 without a
    commit, a wrong one made a commit (in branch mode: a harmless branch), an oracle for keys."""
    for guess in (CANARY, "sk-wrong-guess-0000000000"):
        before = head(repo.root)
        status, answer, _ = await call(
            hostile, "PATCH", "/api-keys/vendor", {"api_key": guess}, token="tok-w"
        )
        assert status == 200, answer
        assert answer["commit"] == head(repo.root) != before


async def test_a_kept_key_is_not_re_encrypted_for_a_recipient_it_never_had(
    repo: SopsProject, hostile: Service, other_age_identity: AgeIdentity
) -> None:
    """A recipient added to `.sops.yaml` reads only files encrypted (or rotated) since. Any
    edit re-encrypted the kept key for `.sops.yaml`, so `config:write` could hand every key
    to a recipient it holds, one harmless-looking PATCH each, without anyone's rotation."""
    _write_sops_yaml(repo.root, repo.identity.recipient, other_age_identity.recipient)
    commit_all(repo.root, "a new recipient, for new files")
    path = repo.providers / "vendor.yaml"
    data = path.read_bytes()
    status, answer, _ = await call(hostile, "PATCH", "/api-keys/vendor", {"name": "innocent"}, token="tok-w")
    assert status == 409 and "rotate" in answer["error"]["message"], answer
    assert path.read_bytes() == data and other_age_identity.recipient.encode() not in data
    status, answer, _ = await call(hostile, "PATCH", "/api-keys/vendor", {"name": "k"}, token="tok-k")
    assert status == 200, answer  # a client that may read the key could send it along anyway


@pytest.mark.parametrize("how", ["edited", "staged", "untracked"])
async def test_a_key_is_encrypted_only_for_the_committed_recipients(
    repo: SopsProject, other_age_identity: AgeIdentity, how: str
) -> None:
    """docs/reference.md §8: a key is encrypted for the recipients of the committed `.sops.yaml`. Writes read
    the working file: whoever could edit it (a shell on the host, a bad merge left uncommitted)
    had every new or changed key encrypted for a recipient of theirs, with nothing in git to see."""
    sops_yaml = repo.root / ".sops.yaml"
    committed = sops_yaml.read_bytes()
    if how == "untracked":
        git(repo.root, "rm", "-q", "--cached", ".sops.yaml")
        git(repo.root, "commit", "-qm", "sops rules not tracked")
    else:
        _write_sops_yaml(repo.root, repo.identity.recipient, other_age_identity.recipient)
        if how == "staged":
            git(repo.root, "add", ".sops.yaml")
            sops_yaml.write_bytes(committed)  # the working file as committed; the index is not
    before = head(repo.root)
    async with serve(repo) as running:
        status, answer, _ = await call(running, "POST", "/api-keys", vendor())
        plain, plain_answer, _ = await call(running, "PATCH", "/servers/gpu", {"name": "no key, no sops"})
    assert status == 409, answer
    assert ".sops.yaml" in answer["error"]["message"] and "commit" in answer["error"]["message"]
    assert not (repo.providers / "vendor.yaml").exists()
    assert plain == 200, plain_answer  # a file without a key needs no recipient
    assert git(repo.root, "rev-list", "--count", f"{before}..HEAD") == "1"


async def test_a_written_key_has_the_committed_recipients_and_no_other(
    repo: SopsProject, service: Service, other_age_identity: AgeIdentity
) -> None:
    status, answer, _ = await call(service, "POST", "/api-keys", vendor())
    assert status == 201, answer
    data = (repo.providers / "vendor.yaml").read_bytes()
    assert repo.identity.recipient.encode() in data
    assert other_age_identity.recipient.encode() not in data
    _write_sops_yaml(repo.root, repo.identity.recipient, other_age_identity.recipient)
    status, answer, _ = await call(service, "PATCH", "/api-keys/vendor", {"api_key": OTHER_KEY})
    assert status == 409, answer  # re-encrypting it would use the edited working file
    git(repo.root, "checkout", "--", ".sops.yaml")
    status, answer, _ = await call(service, "PATCH", "/api-keys/vendor", {"api_key": OTHER_KEY})
    assert status == 200, answer


async def test_a_detached_head_takes_no_commit(repo: SopsProject) -> None:
    """docs/reference.md §8: the commit goes on the current branch. On a detached HEAD (a git-sync checkout)
    it was applied and answered 200, then lost at the next checkout."""
    git(repo.root, "checkout", "-q", "--detach")
    before = head(repo.root)
    async with serve(repo) as service:
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "lost"})
        assert status == 409 and "detached" in answer["error"]["message"], answer
        assert head(repo.root) == before and git(repo.root, "status", "--porcelain") == ""
    async with serve(repo, write_mode="branch") as service:  # a branch for review needs none
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "reviewed"})
        assert status == 202, answer


@pytest.mark.parametrize("name", ["routing.yaml", "routes.yml"])
async def test_a_route_is_not_written_over_a_routing_file_that_does_not_load(
    repo: SopsProject, name: str
) -> None:
    """The service serves the last good routing while git's is broken; a route written then
    replaced it (or went beside it) with one purpose, and the other purposes lost their route."""
    write_server(repo, "tei", purposes="embeddings")
    (repo.providers / "routing.yaml").unlink()
    good = "kind: routing\npurposes:\n  chat:\n    primary: [gpu]\n  embeddings:\n    primary: [tei]\n"
    (repo.providers / name).write_text(good)
    commit_all(repo.root, "two purposes")
    async with serve(repo) as service:
        (repo.providers / name).write_text(good.replace("[gpu]\n", "[gpu]\n    typo: 1\n"))
        commit_all(repo.root, "a typo")
        await eventually(lambda: f"providers.d/{name}" in service.registry.refused)  # the typo, refused
        before = head(repo.root)
        status, answer, _ = await call(service, "PUT", "/active/chat", {"primary": ["gpu"]})
        assert status == 409 and name in answer["error"]["message"], answer
        assert head(repo.root) == before
        routing = service.registry.snapshot.routing
        assert routing is not None and sorted(routing.purposes) == ["chat", "embeddings"]


async def test_a_reason_that_is_not_utf8_is_kept_as_text_not_a_500(
    repo: SopsProject, service: Service
) -> None:
    """HTTP header bytes are not always UTF-8; the reason went into the commit as lone
    surrogates, and building the commit failed (500)."""
    host, port = service.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"name": "reasoned"}'
    writer.write(
        f"PATCH {API}/servers/gpu HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n".encode()
        + b"X-Switchboard-Reason: caf\xc3\xa9 \xff\xfe\r\n\r\n"
        + body
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert git(repo.root, "log", "-1", "--format=%b").splitlines()[0] == "caf\u00e9 \ufffd\ufffd"


@pytest.mark.parametrize("key", ["sk-abc\r\nX-Injected: 1", "sk-\x00abc", "sk-a\tbc"])
async def test_a_key_no_http_header_can_carry_is_refused(
    repo: SopsProject, service: Service, key: str
) -> None:
    """It was encrypted and committed, then every request routed to the provider answered 500
    (aiohttp refuses the header), with no fallback tried."""
    status, answer, _ = await call(service, "POST", "/api-keys", vendor(api_key=key))
    assert status == 422, answer
    assert [p["path"] for p in answer["error"]["problems"]] == ["api_key"]
    assert "abc" not in json.dumps(answer)
    assert not (repo.providers / "vendor.yaml").exists()


async def test_a_key_pasted_with_its_line_break_is_stored_without_it(
    repo: SopsProject, service: Service
) -> None:
    status, answer, _ = await call(service, "POST", "/api-keys", vendor(api_key=CANARY + "\n"))
    assert status == 201, answer
    assert service.registry.snapshot.providers["vendor"].api_key == Secret(CANARY)
    plaintext = repo.sops.decrypt((repo.providers / "vendor.yaml").read_bytes(), "providers.d/vendor.yaml")
    assert plaintext["api_key"] == CANARY


async def test_racing_writers_get_one_winner_each_time(repo: SopsProject, service: Service) -> None:
    """Held: writes are applied one at a time, so of concurrent creates of one id one wins, and
    of concurrent edits carrying the same If-Match one wins and the others are 412."""
    body = {"id": "race", "server_type": "vllm", "base_url": "http://127.0.0.1:9/v1"}
    creates = await asyncio.gather(*(call(service, "POST", "/servers", body) for _ in range(5)))
    assert sorted(r[0] for r in creates) == [201, 409, 409, 409, 409]
    etag = f'"{blob((repo.providers / "race.yaml").read_bytes())}"'
    edits = await asyncio.gather(
        *(
            call(service, "PATCH", "/servers/race", {"name": f"n{i}"}, headers={"If-Match": etag})
            for i in range(5)
        ),
        call(service, "DELETE", "/servers/race", headers={"If-Match": etag}),
    )
    assert sorted(r[0] for r in edits) == [200, 412, 412, 412, 412, 412]
    assert git(repo.root, "status", "--porcelain") == ""


async def test_an_index_lock_held_by_a_person_is_409_and_changes_nothing(
    repo: SopsProject, service: Service
) -> None:
    """Held: git refuses to write the index; branch, file and index are put back."""
    lock = repo.root / ".git" / "index.lock"
    lock.write_text("")
    before, data = head(repo.root), (repo.providers / "gpu.yaml").read_bytes()
    try:
        status, answer, _ = await call(service, "PATCH", "/servers/gpu", {"name": "locked"})
    finally:
        lock.unlink()
    assert status == 409 and "index.lock" in answer["error"]["message"], answer
    assert head(repo.root) == before and (repo.providers / "gpu.yaml").read_bytes() == data
    assert git(repo.root, "status", "--porcelain") == ""


# -- where a provider may send requests: SWITCHBOARD_ALLOWED_UPSTREAMS (reference §7) --------------------


@pytest.mark.parametrize(
    "base_url",
    [
        "http://169.254.169.254/latest",
        "http://[fe80::1]:8000/v1",
        "http://[::ffff:169.254.169.254]/v1",
        "http://2852039166/v1",
        "http://metadata.test/v1",
        "http://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/v1",  # fullwidth
        "http://169\u3002254\u3002169\u3002254/v1",  # ideographic full stops
    ],
)
async def test_unset_a_write_naming_the_metadata_service_is_refused(repo: SopsProject, base_url: str) -> None:
    dns = Dns({"metadata.test": ["169.254.169.254"]})
    before = head(repo.root)
    async with serve(repo, lookup=dns) as running:
        body = {"id": "meta", "server_type": "vllm", "base_url": base_url}
        status, answer, _ = await call(running, "POST", "/servers", body)
        patched, patch_answer, _ = await call(running, "PATCH", "/servers/gpu", {"base_url": base_url})
    assert status == patched == 422, (answer, patch_answer)
    for refused in (answer, patch_answer):
        [found] = refused["error"]["problems"]
        assert found["path"] == "base_url" and SETTING in found["message"], found
    assert head(repo.root) == before and not (repo.providers / "meta.yaml").exists()


async def test_a_write_outside_the_list_is_refused_and_inside_it_lands(repo: SopsProject) -> None:
    async with serve(repo, allowed_upstreams="10.0.0.0/8, *.example.com") as running:
        outside = {"id": "out", "server_type": "vllm", "base_url": "http://127.0.0.1:8000/v1"}
        refused, answer, _ = await call(running, "POST", "/servers", outside)
        inside = {"id": "in", "server_type": "vllm", "base_url": "http://10.0.0.12:8000/v1"}
        created, _, _ = await call(running, "POST", "/servers", inside)
        named = {"id": "named", "server_type": "vllm", "base_url": "https://gpu.example.com/v1"}
        by_name, _, _ = await call(running, "POST", "/servers", named)
        # a vendor's default URL is where its requests go: a name that is not listed
        vendor_default, vendor_answer, _ = await call(
            running, "POST", "/api-keys", vendor(provider="anthropic")
        )
    assert refused == 422 and answer["error"]["problems"][0]["path"] == "base_url"
    assert f"127.0.0.1 is refused by {SETTING}: it is not listed" in answer["error"]["message"]
    assert created == by_name == 201
    assert vendor_default == 201, vendor_answer  # api.anthropic.com does not resolve here: told at connect


async def test_a_names_only_list_refuses_a_vendors_default_host(repo: SopsProject) -> None:
    async with serve(repo, allowed_upstreams="api.openai.com") as running:
        refused, answer, _ = await call(running, "POST", "/api-keys", vendor(provider="anthropic"))
        allowed, _, _ = await call(running, "POST", "/api-keys", vendor(id="oai"))
    assert refused == 422 and "api.anthropic.com is refused by" in answer["error"]["message"]
    assert allowed == 201


async def test_a_name_re_pointed_after_its_write_was_checked_reaches_nothing(repo: SopsProject) -> None:
    """The write's check saw 127.0.0.1; the connection, made later, sees where the name leads then."""
    from tests.support.upstreams import FakeUpstream

    dns = Dns({"gpu.test": ["127.0.0.1"]})
    async with FakeUpstream(name="gpu") as up, serve(repo, lookup=dns) as running:
        server = {"id": "moving", "server_type": "vllm", "base_url": f"http://gpu.test:{up.port}/v1"}
        status, answer, _ = await call(running, "POST", "/servers", server)
        assert status == 201, answer
        status, answer, _ = await call(running, "PUT", "/active/chat", {"primary": "moving"})
        assert status == 200, answer
        dns.point("gpu.test", "169.254.169.254")
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with running.http.post(running.url + "/v1/chat/completions", json=payload) as response:
            body = await response.json()
    assert response.status == 502
    assert "link-local" in body["error"]["attempts"][0]["reason"]
    assert SETTING in body["error"]["attempts"][0]["reason"]
    assert not up.requests

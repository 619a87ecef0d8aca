"""`POST …/hooks/git` (docs/reference.md §12): a signed push notification pulls now; nothing
else pulls anything.

A real service with the built-in pull from a bare repository; pulls are counted from
`/metrics` (`switchboard_pulls_total`), so "pulls nothing" is what the service itself says.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from service.http.context import PULLER
from tests.conftest import Service, SopsProject, eventually, serve
from tests.support.gateway import write_clients
from tests.support.replicas import Checkout, clone, git, server_yaml

HOOK = "/api/v1/llm-config/hooks/git"
SECRET = "whsec-0123456789abcdef"
JSON = "application/json"
PAYLOAD = json.dumps({"ref": "refs/heads/main", "after": "0" * 40, "repository": {"name": "config"}}).encode()


def github(body: bytes, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "X-GitHub-Event": "push", "Content-Type": JSON}


@asynccontextmanager
async def pulling(project: SopsProject, checkout: Checkout, **settings: Any) -> AsyncIterator[Service]:
    values: dict[str, Any] = {
        "root": checkout.root,
        "providers": checkout.providers,
        "events": checkout.root / "var" / "events.jsonl",
        "git_pull": "origin/main",
        "git_pull_interval_s": 3600,  # only the start and the hooks pull
        "webhook_secret": SECRET,
    }
    async with serve(project, **(values | settings)) as service:
        await eventually(lambda: service.app[PULLER].status.remote_commit is not None)
        await eventually(lambda: pulls_now(service), timeout=5)
        yield service


async def pulls(service: Service) -> int:
    _, text = await service.text("/metrics")
    return sum(int(float(n)) for n in re.findall(r"^switchboard_pulls_total\{[^}]*\} (\S+)$", text, re.M))


async def pulls_now(service: Service) -> bool:
    return await pulls(service) >= 1


async def post(service: Service, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with service.http.post(service.url + HOOK, data=body, headers=headers) as response:
        return response.status, await response.json()


async def test_a_signed_github_push_pulls_now(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    async with pulling(sops_project, clone(bare, tmp_path / "replica")) as service:
        pushed = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        status, body = await post(service, PAYLOAD, github(PAYLOAD))
        assert status == 202 and body["status"] == "accepted"
        await eventually(lambda: service.registry.state.last_applied_commit == pushed, timeout=2)


async def test_a_gitlab_token_pulls_now(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    async with pulling(sops_project, clone(bare, tmp_path / "replica")) as service:
        pushed = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        headers = {"X-Gitlab-Token": SECRET, "X-Gitlab-Event": "Push Hook", "Content-Type": JSON}
        status, _ = await post(service, PAYLOAD, headers)
        assert status == 202
        await eventually(lambda: service.registry.state.last_applied_commit == pushed, timeout=2)


async def test_forged_notifications_are_401_and_pull_nothing(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    mine = clone(bare, tmp_path / "replica")
    async with pulling(sops_project, mine) as service:
        before = await pulls(service)
        author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        signed = github(PAYLOAD)
        forged: list[dict[str, str]] = [
            {"Content-Type": "application/json"},  # unsigned
            github(PAYLOAD, secret="not-the-secret"),
            github(PAYLOAD + b" "),  # another body's signature
            {**signed, "X-Hub-Signature-256": signed["X-Hub-Signature-256"].replace("sha256=", "sha1=")},
            {**signed, "X-Hub-Signature-256": signed["X-Hub-Signature-256"][:-1]},
            {**signed, "X-Hub-Signature-256": "sha256=" + "0" * 64},
            {"X-Hub-Signature-256": "", "Content-Type": "application/json"},
            {"X-Gitlab-Token": SECRET + "x"},
            {"X-Gitlab-Token": ""},
            {"X-Gitlab-Token": SECRET[:-1]},
            {**signed, "X-Gitlab-Token": "wrong"},  # every signature sent must hold
            {"X-Gitlab-Token": SECRET, "X-Hub-Signature-256": "sha256=" + "f" * 64},
            {"Authorization": f"Bearer {SECRET}"},
        ]
        for headers in forged:
            status, body = await post(service, PAYLOAD, headers)
            assert status == 401, (headers, body)
            assert body["error"]["type"] == "unauthorized" and SECRET not in json.dumps(body)
        await asyncio.sleep(0.3)
        assert await pulls(service) == before
        assert mine.head() != git(bare, "rev-parse", "main")
        _, metrics = await service.text("/metrics")
        assert f'switchboard_webhooks_total{{result="refused"}} {float(len(forged))}' in metrics


async def test_a_body_over_the_limit_is_413_and_pulls_nothing(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    async with pulling(sops_project, clone(bare, tmp_path / "replica"), max_body_bytes=1024) as service:
        before = await pulls(service)
        big = b"x" * 4096
        status, _ = await post(service, big, github(big))
        assert status == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(8):
                yield b"y" * 512

        headers = github(b"y" * 4096)
        async with service.http.post(service.url + HOOK, data=chunks(), headers=headers) as response:
            assert response.status == 413
        await asyncio.sleep(0.2)
        assert await pulls(service) == before


async def test_without_a_pull_configured_the_hook_is_404(sops_project: SopsProject) -> None:
    (sops_project.providers / "gpu.yaml").write_text(server_yaml("gpu", 9))
    async with serve(sops_project, webhook_secret=SECRET) as service:
        status, body = await post(service, PAYLOAD, github(PAYLOAD))
        assert status == 404 and "SWITCHBOARD_GIT_PULL" in body["error"]["message"]


@pytest.mark.parametrize("secret", [None, ""], ids=["unset", "empty"])
async def test_without_a_secret_nothing_can_be_verified_so_nothing_is_accepted(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path, secret: str | None
) -> None:
    bare, _ = remote
    async with pulling(sops_project, clone(bare, tmp_path / "replica"), webhook_secret=secret) as service:
        for headers in (github(PAYLOAD, secret=""), {"X-Gitlab-Token": ""}):  # what an empty key signs
            status, body = await post(service, PAYLOAD, headers)
            assert status == 401 and "SWITCHBOARD_WEBHOOK_SECRET" in body["error"]["message"]


async def test_the_hook_needs_no_token_when_clients_exist(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, _ = remote
    mine = clone(bare, tmp_path / "replica")
    write_clients(_as_project(sops_project, mine), {"ci": ("sb_ci_token_0123456789", ["admin"])})
    git(mine.root, "add", "-A")
    git(mine.root, "commit", "-qm", "clients")
    git(mine.root, "push", "-q", "origin", "HEAD:main")
    async with pulling(sops_project, mine) as service:
        status, _ = await service.get("/api/v1/llm-config/providers")
        assert status == 401
        status, _ = await post(service, PAYLOAD, github(PAYLOAD))
        assert status == 202


async def test_a_flood_of_notifications_is_one_pull_running_and_one_more(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    bare, author = remote
    async with pulling(sops_project, clone(bare, tmp_path / "replica")) as service:
        before = await pulls(service)
        pushed = author.commit({"gpu.yaml": server_yaml("gpu", 10)})
        author.push()
        async with service.app[PULLER].lock:  # as if a pull ran all through the flood
            statuses = await asyncio.gather(*(post(service, PAYLOAD, github(PAYLOAD)) for _ in range(100)))
        assert {s for s, _ in statuses} == {202}
        await eventually(lambda: service.registry.state.last_applied_commit == pushed, timeout=3)
        await asyncio.sleep(0.5)  # anything still queued would have run by now
        assert await pulls(service) - before <= 2  # the one waiting for the lock, and one more


def _as_project(project: SopsProject, checkout: Checkout) -> SopsProject:
    return SopsProject(checkout.root, checkout.providers, project.sops, project.identity)


async def test_a_body_that_cannot_be_decoded_is_400_not_500(
    sops_project: SopsProject, remote: tuple[Path, Checkout], tmp_path: Path
) -> None:
    """aiohttp inflates a `Content-Encoding: gzip` body as it is read, and one that is not gzip
    raised out of the handler: the unauthenticated webhook (and every endpoint reading a body)
    answered 500 to anyone."""
    bare, _ = remote
    # With a push, so the write below reads its body (without one it is 405 before reading it).
    async with pulling(sops_project, clone(bare, tmp_path / "replica"), git_push="origin") as service:
        before = await pulls(service)
        garbage = b"\x1f\x8b not gzip at all"
        for path, headers in (
            (HOOK, github(garbage)),
            ("/v1/chat/completions", {"Content-Type": JSON}),
            ("/api/v1/llm-config/servers", {"Content-Type": JSON}),
        ):
            for encoding in ("gzip", "deflate", "br"):
                sent = {**headers, "Content-Encoding": encoding, "Connection": "close"}  # it is broken
                async with service.http.post(service.url + path, data=garbage, headers=sent) as response:
                    text = await response.text()
                    assert response.status == 400, (path, encoding, text)
                    if encoding != "br":  # aiohttp refuses brotli itself, before any handler
                        assert json.loads(text)["error"]["type"] == "bad_request"
        await asyncio.sleep(0.2)
        assert await pulls(service) == before

"""A hostile review of shared health (docs/reference.md §12; issue 19): genuine notes replayed
on Redis, and signed notes about a provider a replica does not serve. Two services in this
process share Debian's real `redis-server` (the pair of tests/http/test_shared_health.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from service.gateway.health import CheckResult
from service.http.context import FANOUT, HEALTH
from service.runtime.messages import HealthNote
from service.vcs.gitrepo import blob_sha
from tests.conftest import SopsProject, eventually, serve, write_routing, write_server
from tests.http.test_shared_health import changes, forge, pair
from tests.support.replicas import RedisServer

pytestmark = pytest.mark.timeout(60)


async def test_a_replayed_note_moves_no_replica(sops_project: SopsProject, redis_server: RedisServer) -> None:
    """Anyone who can read Redis sees the replicas' signed notes and can publish them again:
    one older than what a replica confirmed since is ignored, and so is one from long ago
    (a replica that has confirmed nothing yet, as after a restart, would take it as news)."""
    async with pair(sops_project, redis_server.url) as (a, b):
        key = a.app[FANOUT].health_key
        assert key is not None
        blob = blob_sha((sops_project.providers / "gpu.yaml").read_bytes())
        # captured ten minutes ago: `gpu` was down then
        ancient = HealthNote("gpu", blob, "unhealthy", "HTTP 503 long ago", time.time() - 600)
        await forge(redis_server.url, ancient.signed("a", "a-instance", key))
        await asyncio.sleep(1.5)
        assert b.app[HEALTH].get("gpu").status == "unknown"
        # captured a moment ago, before the provider came back
        earlier = HealthNote("gpu", blob, "unhealthy", "HTTP 503 earlier", time.time() - 5)
        b.app[HEALTH].checked("gpu", CheckResult(True, 1.0, "ok"))  # confirmed since: healthy
        await forge(redis_server.url, earlier.signed("a", "a-instance", key))
        # and a right one, so the replays were heard before it
        right = HealthNote("gpu", blob, "unhealthy", "HTTP 502", time.time())
        await forge(redis_server.url, right.signed("a", "a-instance", key))
        await eventually(lambda: b.app[HEALTH].get("gpu").confirmed == ("unhealthy", "HTTP 502"), 5)
        reasons = [e.reason for e in await eventually(lambda: changes(b) or False, 5)]  # type: ignore[attr-defined]
    assert reasons == ["HTTP 502"]  # the right note alone: no replay


async def test_a_signed_note_about_a_provider_this_replica_does_not_serve_is_ignored(
    sops_project: SopsProject, redis_server: RedisServer
) -> None:
    async with pair(sops_project, redis_server.url) as (a, b):
        key = a.app[FANOUT].health_key
        blob = blob_sha((sops_project.providers / "gpu.yaml").read_bytes())
        note = HealthNote("other", blob, "unhealthy", "not served here", time.time())
        await forge(redis_server.url, note.signed("a", "a-instance", key))
        right = HealthNote("gpu", blob, "unhealthy", "HTTP 503", time.time())
        await forge(redis_server.url, right.signed("a", "a-instance", key))
        await eventually(lambda: b.app[HEALTH].get("gpu").status == "unhealthy", 5)
        assert b.app[HEALTH].get("other").status == "unknown"
        await eventually(lambda: changes(b) or False, 5)
        await asyncio.sleep(0.2)
        assert [e.subject for e in changes(b)] == ["gpu"]  # type: ignore[attr-defined]


async def test_without_an_age_identity_a_replica_warns_that_its_notes_are_unsigned(
    sops_project: SopsProject, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing to sign with: a note anyone publishes is taken as a replica's (by design, the
    key is the identity), so the replica says so at start."""
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    with caplog.at_level(logging.WARNING, logger="service.http.replicas"):
        async with serve(sops_project, redis_url=redis_server.url, age_key_file=None) as alone:
            assert alone.app[FANOUT].health_key is None
    assert any("no age identity to sign health notes" in r.getMessage() for r in caplog.records)

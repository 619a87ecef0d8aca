"""Many replicas (docs/reference.md §12): the git webhook, `GET …/replicas`, and the pull and
fan-out they drive.

    POST /api/v1/llm-config/hooks/git   signed by the git host     202: a pull now; 401; 404
    GET  /api/v1/llm-config/replicas    config:read                who serves which commit

The webhook needs no token: it is signed. GitHub's `X-Hub-Signature-256` is the HMAC-SHA256
of the raw body with `SWITCHBOARD_WEBHOOK_SECRET` (`sha256=<hex>`), computed as the body
streams in (it is never held, and never read past `SWITCHBOARD_MAX_BODY_BYTES`); GitLab's
`X-Gitlab-Token` is the secret itself. Both are compared in constant time (hashed first, so
not even the length shows). A notification asks for a pull and is answered at once: any
number of them make one pull running and at most one more (`Puller.request`).

The cleanup context starts the pull (with `SWITCHBOARD_GIT_PULL`) and the Redis fan-out
(with `SWITCHBOARD_REDIS_URL`): a replica that applied a new commit tells the others, and
one that hears of a commit it does not have pulls now.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from service.config.models import AiServer, ApiKey
from service.config.snapshot import PerSnapshot, Snapshot
from service.errors import GitError, NotFound, PayloadTooLarge, Unauthorized
from service.gateway.health import HealthState
from service.http.auth import scoped
from service.http.context import (
    EVENTS,
    FANOUT,
    HEALTH,
    METRICS,
    PREFIX,
    PULLER,
    REGISTRY,
    RELOADER,
    SETTINGS,
    WRITER,
    stop_task,
)
from service.http.push import body_tag, watched
from service.runtime.fanout import Fanout
from service.runtime.messages import Beat, HealthNote, answer
from service.runtime.registry import Outcome
from service.runtime.scan import link_folders
from service.runtime.sync import Puller, Result
from service.settings import Settings
from service.vcs.gitrepo import GitRepo, blob_sha

log = logging.getLogger(__name__)

HOOK = f"{PREFIX}/hooks/git"
REPLICAS = f"{PREFIX}/replicas"
GITHUB_HEADER = "X-Hub-Signature-256"
GITLAB_HEADER = "X-Gitlab-Token"
ADOPT_EVERY_S = 1.0
"""Another replica's health status is adopted at most this often per provider."""


def setup(app: web.Application) -> None:
    """Add the webhook and `…/replicas`, and run the pull and the fan-out with the service."""
    app.router.add_post(HOOK, _hook)
    app.router.add_get(REPLICAS, _replicas)
    app.cleanup_ctx.append(_replication)


# -- the webhook ----------------------------------------------------------------------------------


async def _hook(request: web.Request) -> web.StreamResponse:
    settings, metrics = request.app[SETTINGS], request.app[METRICS]
    puller = request.app.get(PULLER)
    if puller is None:
        raise NotFound("no pull is configured here (SWITCHBOARD_GIT_PULL): a notification has nothing to do")
    try:
        await _verify(request)
    except (Unauthorized, PayloadTooLarge):
        metrics.webhooks.labels("refused").inc()
        raise
    puller.request()
    metrics.webhooks.labels("accepted").inc()
    return web.json_response({"status": "accepted", "replica": settings.replica}, status=202)


async def _verify(request: web.Request) -> None:
    """Unauthorized unless the GitHub signature or the GitLab token (every one sent) is right."""
    secret = request.app[SETTINGS].webhook_secret
    github, gitlab = request.headers.get(GITHUB_HEADER), request.headers.get(GITLAB_HEADER)
    if secret is None or not secret.get_secret_value():  # an empty key signs anything
        raise Unauthorized("SWITCHBOARD_WEBHOOK_SECRET is not set here, so no notification can be verified")
    if github is None and gitlab is None:
        raise Unauthorized(f"a notification must be signed ({GITHUB_HEADER}, or {GITLAB_HEADER})")
    key = secret.get_secret_value().encode()
    if gitlab is not None and not _same(gitlab.encode("utf-8", "surrogateescape"), key):
        raise Unauthorized(f"wrong {GITLAB_HEADER}")
    if github is not None:
        expected = "sha256=" + await _body_hmac(request, key)
        if not _same(github.strip().lower().encode("utf-8", "surrogateescape"), expected.encode()):
            raise Unauthorized(f"wrong {GITHUB_HEADER} (the HMAC-SHA256 of the body, `sha256=<hex>`)")


async def _body_hmac(request: web.Request, key: bytes) -> str:
    """HMAC-SHA256 hex of the body, read as it streams in, never past the body limit."""
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge.over(limit)
    mac = hmac.new(key, digestmod=hashlib.sha256)
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge.over(limit)
        mac.update(chunk)
    return mac.hexdigest()


def _same(given: bytes, expected: bytes) -> bool:
    """Constant time, whatever the lengths: the digests of both are compared."""
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(expected).digest())


# -- who serves what ------------------------------------------------------------------------------


@scoped("config:read")
@watched
async def _replicas(request: web.Request) -> web.StreamResponse:
    """This replica, and every other heard from in the last 10 s (with Redis); never waits on it."""
    fanout = request.app.get(FANOUT)
    own = answer(_beat(request.app), datetime.now(UTC))
    others = [p.answer() for p in fanout.live()] if fanout is not None else []
    listed = sorted([own, *others], key=lambda r: str(r["replica"]))
    shared = fanout is not None and fanout.connected
    response = web.json_response({"replicas": listed, "shared": shared})
    # `seen_at` is a measurement, moving with every heartbeat: not in the tag
    meaning = [{k: v for k, v in r.items() if k != "seen_at"} for r in listed]
    response.headers["ETag"] = body_tag(json.dumps([meaning, shared]).encode())
    return response


def _beat(app: web.Application) -> Beat:
    state = app[REGISTRY].state
    return Beat(app[SETTINGS].replica, state.last_applied_commit, state.snapshot.generation, state.ready)


# -- the pull and the fan-out, run with the service -------------------------------------------------


async def _replication(app: web.Application) -> AsyncIterator[None]:
    settings, metrics, writer = app[SETTINGS], app[METRICS], app[WRITER]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    puller: Puller | None = None
    if settings.git_pull is not None and writer.committer is None:
        log.error(
            "SWITCHBOARD_GIT_PULL is set, but %s is not in a git repository: no pull", settings.providers
        )
    elif settings.git_pull is not None and await asyncio.to_thread(_synced, settings.providers_dir):
        log.error(
            "SWITCHBOARD_GIT_PULL is set, but %s is a git-sync checkout (a worktree on a detached HEAD "
            "behind a link): git-sync brings the commits, and a pull would move its worktree; no pull",
            settings.providers,
        )
    elif settings.git_pull is not None and writer.committer is not None:

        def counted(result: Result) -> None:
            metrics.pulls.labels(result).inc()
            if result == "failed":
                metrics.sync_failures.inc()

        puller = Puller(
            settings.git_pull,
            writer.committer,
            app[RELOADER],
            app[REGISTRY],
            app[EVENTS],
            lock=writer.lock,
            interval_s=settings.git_pull_interval_s,
            on_result=counted,
        )
        app[PULLER] = puller
        tasks.append(asyncio.create_task(puller.run(stop), name="switchboard-pull"))
    fanout: Fanout | None = None
    sharing: Callable[[], None] | None = None
    if settings.redis_url is not None:
        fanout = _fanout(app, settings.redis_url.get_secret_value(), puller, loop)
        sharing = _share_health(app, fanout, loop)
        app[FANOUT] = fanout
        fanout.start()
    try:
        yield
    finally:
        if sharing is not None:
            sharing()
        stop.set()
        if writer.committer is not None:
            writer.committer.abort()  # a fetch or push hanging on a dead remote goes now
        if fanout is not None:
            await asyncio.to_thread(fanout.stop)
        for task in tasks:
            await stop_task(task)


def _share_health(
    app: web.Application, fanout: Fanout, loop: asyncio.AbstractEventLoop
) -> Callable[[], None]:
    """Publish each health status this replica confirms, and adopt those the others publish
    (docs/reference.md §12); the function that stops it. Circuits are not shared.

    A note is adopted only for the version of the provider this replica serves (the blob of its
    file), and at most once a second per provider: the newest of those heard meanwhile is adopted
    when the second is over, so a flood of notes (whoever may publish on Redis) cannot flood the
    event log, and the last word is never lost. When a replica joins (`Fanout.on_joined`), every
    status shown is published again (at most once a second), dated when it was confirmed, so the
    newcomer shows what the others do rather than `unknown` until its own checks tell.
    """
    registry, health = app[REGISTRY], app[HEALTH]
    blobs = PerSnapshot(_provider_blobs)
    fanout.health_key = _health_key(app[SETTINGS])
    if fanout.health_key is None:
        log.warning(
            "shared health: no age identity to sign health notes with; anyone who can publish on "
            "Redis can change the health these replicas show (give them SOPS_AGE_KEY_FILE)"
        )
    last: dict[str, float] = {}
    waiting: dict[str, HealthNote] = {}

    def adopt(provider_id: str) -> None:
        note = waiting.pop(provider_id, None)
        if note is None or blobs.of(registry.snapshot).get(note.provider) != note.blob:
            return
        last[provider_id] = loop.time()
        if note.status in ("healthy", "unhealthy"):
            health.adopt(note.provider, note.status, note.reason, note.at, note.key)  # type: ignore[arg-type]

    def arrived(note: HealthNote) -> None:  # on the loop
        newest = waiting.get(note.provider)
        if newest is not None and newest.at >= note.at:
            return
        fresh = newest is None
        waiting[note.provider] = note
        if not fresh:
            return  # its adoption is scheduled already
        due = last.get(note.provider, -ADOPT_EVERY_S) + ADOPT_EVERY_S - loop.time()
        if len(last) > 10_000:
            last.clear()
        if due <= 0:
            adopt(note.provider)
        else:
            loop.call_later(due, adopt, note.provider)

    def heard(note: HealthNote) -> None:  # in the fan-out's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(arrived, note)

    def confirmed(provider_id: str, state: HealthState, at: float) -> None:
        blob, shown = blobs.of(registry.snapshot).get(provider_id), health.confirmed(provider_id)
        if blob is not None and state.status != "unknown":
            key = shown[2] if shown is not None else None
            fanout.tell_health(HealthNote(provider_id, blob, state.status, state.reason, at, key))

    told_at, due = -ADOPT_EVERY_S, False  # when every status was told last; whether a telling is due

    def tell_all() -> None:  # on the loop
        nonlocal told_at, due
        told_at, due = loop.time(), False
        for provider_id, blob in blobs.of(registry.snapshot).items():
            shown = health.confirmed(provider_id)
            if shown is not None:
                state, at, key = shown
                fanout.tell_health(HealthNote(provider_id, blob, state.status, state.reason, at, key))

    def newcomer() -> None:  # on the loop: at most once a second, however many join
        nonlocal due
        if not due:
            due = True
            loop.call_later(max(0.0, told_at + ADOPT_EVERY_S - loop.time()), tell_all)

    def joined() -> None:  # in the fan-out's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(newcomer)

    fanout.on_health = heard
    fanout.on_joined = joined
    health.on_confirmed.append(confirmed)

    def stop() -> None:
        fanout.on_health = None
        fanout.on_joined = None
        health.on_confirmed.remove(confirmed)

    return stop


def _provider_blobs(snapshot: Snapshot) -> dict[str, str]:
    return {
        loaded.document.id: blob_sha(loaded.data)
        for loaded in snapshot.files.values()
        if isinstance(loaded.document, AiServer | ApiKey)
    }


def _health_key(settings: Settings) -> bytes | None:
    """The key health notes are signed with: derived from the age identity, which every replica
    holds (to decrypt the files) and nobody who can only reach Redis does. None without one."""
    secret = settings.age_identity()
    if secret is None:
        return None
    return hmac.new(secret.strip().encode(), b"switchboard health notes v1", hashlib.sha256).digest()


def _synced(providers: Path) -> bool:
    """Whether `providers` is reached through a link to a checkout on a detached HEAD (git-sync's)."""
    if not link_folders(providers):
        return False
    repo = GitRepo.find(providers)
    if repo is None:
        return False
    try:
        return not repo.run("symbolic-ref", "-q", "HEAD", ok=(0, 1)).strip()
    except GitError:
        return False


def _fanout(app: web.Application, url: str, puller: Puller | None, loop: asyncio.AbstractEventLoop) -> Fanout:
    registry, writer, metrics = app[REGISTRY], app[WRITER], app[METRICS]

    def knows(commit: str) -> bool:
        if commit == registry.state.last_applied_commit:
            return True
        repo = registry.attributor.repo if registry.attributor is not None else writer.repo
        if repo is None:
            return True  # nothing to pull into
        try:
            repo.run("cat-file", "-e", f"{commit}^{{commit}}")
        except GitError:
            return False
        return True

    def on_new(commit: str) -> None:
        if puller is not None:
            loop.call_soon_threadsafe(puller.request)

    fanout = Fanout(
        url,
        lambda: _beat(app),
        knows=knows,
        on_new=on_new,
        on_state=lambda up: metrics.fanout_connected.set(1 if up else 0),
    )
    announced: list[tuple[str | None, bool]] = [(None, False)]

    def on_apply(outcome: Outcome) -> None:  # in the applying thread
        serving = (registry.state.last_applied_commit, registry.state.ready)
        if serving != announced[0]:  # a new commit, or ready at last: the others hear it now
            announced[0] = serving
            fanout.announce()

    registry.on_apply.append(on_apply)
    return fanout

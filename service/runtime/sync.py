"""The built-in pull (docs/reference.md §12): `SWITCHBOARD_GIT_PULL=REMOTE/BRANCH`, every
interval or on request.

One pull: fetch the remote's branch; when it is ahead of the local branch and the working tree
is clean, fast-forward the branch and its files (`Committer.advance`: an intent record, the
branch moved by compare-and-swap, each file written atomically) with the watcher held off,
then reload once, so the new commit is one generation: never a mix of two commits, never a
half-written tree. A branch that cannot fast-forward (commits the remote lacks, a remote
rewritten by a force-push, local edits) is left alone and reported: the replica goes on
serving what it has, `/readyz` says why (`sync`), the log gets one `sync.failed` per distinct
failure, and `switchboard_sync_failures_total` counts every failed pull. Nothing here ever
resets a branch.

Requests (a webhook, a replica announcing a commit) coalesce: while a pull runs, any number
of requests make one more pull after it, never more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from service.errors import EventLogError, GitError
from service.journal.events import SyncFailed
from service.journal.log import EventLog
from service.runtime.registry import Registry
from service.runtime.watcher import Reloader
from service.vcs.commit import Committer

log = logging.getLogger(__name__)

Result = Literal["applied", "unchanged", "failed"]

_NUMBERS = re.compile(r"\d+")
"""Masked when failures are compared: git's reason names how long it waited (curl's `Failed to
connect to host port 443 after 131 ms`), a number that differs on each poll of one failure."""


def parse_pull(spec: str) -> tuple[str, str]:
    """`REMOTE/BRANCH` -> (remote, branch): the remote's name is up to the first `/`.

    ValueError for anything git could take as an option, or with a part missing.
    """
    remote, _, branch = spec.strip().partition("/")
    if not remote or not branch or remote.startswith("-") or branch.startswith("-"):
        raise ValueError(f"SWITCHBOARD_GIT_PULL must be REMOTE/BRANCH (origin/main), not {spec!r}")
    if any(c.isspace() or c in "~^:?*[\\" for c in branch) or ".." in branch or branch.endswith((".", "/")):
        raise ValueError(f"SWITCHBOARD_GIT_PULL: {branch!r} is not a branch name")
    return remote, branch


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """What `/readyz` says of the pull: `ok`, or `failed` and why; what the remote is at."""

    status: Literal["ok", "failed"] = "ok"
    reason: str | None = None
    remote_commit: str | None = None

    def answer(self) -> dict[str, str | None]:
        return {"status": self.status, "reason": self.reason, "remote_commit": self.remote_commit}


class Puller:
    """Pulls one remote branch into the repository that holds the providers folder."""

    def __init__(
        self,
        spec: str,
        committer: Committer,
        reloader: Reloader,
        registry: Registry,
        events: EventLog,
        *,
        lock: asyncio.Lock,
        interval_s: float = 30.0,
        on_result: Callable[[Result], None] | None = None,
    ) -> None:
        self.spec = spec
        self.remote, self.branch = parse_pull(spec)
        self.committer = committer
        self.reloader = reloader
        self.registry = registry
        self.events = events
        self.lock = lock
        """Shared with the writer: a pull never moves the branch under a write, nor a write under a pull."""
        self.interval_s = interval_s
        self.on_result = on_result
        self.status = SyncStatus()
        self._reported: tuple[str, str | None] | None = None
        self._wanted = asyncio.Event()

    # -- asking for a pull -------------------------------------------------------------------------

    def request(self) -> None:
        """Pull as soon as the pull running (if any) is done; many requests make one pull."""
        self._wanted.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Pull now, then every `interval_s` and on each request, until `stop` is set."""
        while not stop.is_set():
            self._wanted.clear()
            await self._pull_logged()
            wanted = asyncio.ensure_future(self._wanted.wait())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait(
                    {wanted, stopping}, timeout=self.interval_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in (wanted, stopping):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _pull_logged(self) -> None:
        try:
            await self.pull()
        except Exception:
            log.exception("the pull of %s failed", self.spec)

    # -- one pull ----------------------------------------------------------------------------------

    async def pull(self) -> Result:
        """Fetch, fast-forward and apply when possible; what happened. Never resets anything."""
        async with self.lock:
            try:
                result = await self._pull()
            except GitError as exc:  # any other step git refused: a failed pull, said as such
                reason = f"the pull of {self.spec} failed: {exc}"
                result = await self._failed(reason, self.status.remote_commit)
        if self.on_result is not None:
            self.on_result(result)
        return result

    async def _pull(self) -> Result:
        committer = self.committer
        try:
            remote = await asyncio.to_thread(committer.fetch, self.remote, self.branch)
        except GitError as exc:
            return await self._failed(f"the fetch of {self.spec} failed: {exc}", None)
        ref = await asyncio.to_thread(committer.ref)
        if ref == "HEAD":
            return await self._failed(
                f"HEAD is detached: the pull fast-forwards a branch, and moves no detached HEAD; "
                f"check out the branch {self.branch}",
                remote,
            )
        local = await asyncio.to_thread(committer.resolve, ref)
        if local == remote:
            return self._ok(remote, "unchanged")
        if local is not None and not await asyncio.to_thread(committer.is_ancestor, local, remote):
            return await self._failed(await self._why_not(local, remote), remote)
        edited = await asyncio.to_thread(committer.local_edits, local, remote)
        if edited:
            shown = ", ".join(edited[:5]) + (f" and {len(edited) - 5} more" if len(edited) > 5 else "")
            return await self._failed(
                f"local changes that are not committed ({shown}): not fast-forwarded to {self.spec}; "
                "commit or discard them",
                remote,
            )
        async with self.reloader.exclusive() as reload:  # no reload sees half the files moved
            try:
                await asyncio.to_thread(committer.advance, ref, local, remote, note=f"pull {self.spec}")
            except GitError as exc:
                return await self._failed(f"the fast-forward to {self.spec} failed: {exc}", remote)
            await reload()
        log.info("pulled %s: %s -> %s", self.spec, (local or "nothing")[:12], remote[:12])
        return self._ok(remote, "applied")

    async def _why_not(self, local: str, remote: str) -> str:
        behind = await asyncio.to_thread(self.committer.is_ancestor, remote, local)
        if behind:
            return (
                f"the local branch has commits {self.spec} lacks: it cannot fast-forward, and was "
                "left alone (push them, or reset the branch by hand)"
            )
        return (
            f"the local branch and {self.spec} have diverged (each has commits the other lacks; "
            "a force-push?): it cannot fast-forward, and was left alone (never reset)"
        )

    def _ok(self, remote: str, result: Result) -> Result:
        self.status = SyncStatus("ok", None, remote)
        self._reported = None  # the same failure again, later, is news again
        return result

    async def _failed(self, reason: str, remote: str | None) -> Result:
        if self.committer.stopping.is_set():  # a fetch killed because the service stops: no failure
            return "failed"
        self.status = SyncStatus("failed", reason, remote)
        failure = (_NUMBERS.sub("#", reason), remote)
        if self._reported == failure:
            return "failed"
        self._reported = failure
        log.warning("sync: %s", reason)
        served = self.registry.state.last_applied_commit
        event = SyncFailed(subject=self.spec, reason=reason, remote_commit=remote, commit=served)
        try:
            await asyncio.to_thread(self.events.append, event)
        except EventLogError as exc:  # stopping: the log closed
            log.warning("sync.failed not recorded: %s", exc)
        return "failed"

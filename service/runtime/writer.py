"""Writes over HTTP that become git commits (docs/reference.md §8): the old admin API, with git as the trail.

A write never takes a shortcut into the registry. It becomes a file and a commit, and comes
back through the same path as any change (the watcher's reload), so the event log records it
with its commit and author like a merged pull request:

1. Draft the change on the files at HEAD (the base), as `drafts` does: refused for a file with
   local edits (409) or one that changed since the client's `If-Match` (412); a plaintext
   `api_key` encrypted by sops in memory; validated exactly as `switchboard validate` would
   validate the commit (`checks`), so a refusal (422) writes nothing.
2. Commit it with plumbing (no hook runs), author `NAME <NAME@clients.switchboard.invalid>`.
3. `branch` mode: the commit goes to `switchboard/<verb>-<id>-<n>` and nothing is applied (202).
4. `commit` mode: with the watcher held off, move the branch and the files, then reload once
   (`landing`); the answer carries the generation that applied it. A commit the service does
   not apply is undone: branch and files as before, and 409.
5. With `SWITCHBOARD_GIT_PUSH`, the commit is pushed first, as a compare-and-swap on the
   remote's branch (it must be at the base), so a push never lands on a remote that moved nor
   carries commits the remote lacks. A refused push is drafted again on the remote's head
   (validated again), at most 3 times, when the local branch can fast-forward to that head; a
   local branch with commits the remote lacks takes no write (409), so the two never diverge.
   Once the remote has the commit it is landed here; a commit the remote has that this service
   does not serve is a 409 that says so, with the commit, and stays (the remote keeps it).

A 200 or 201 means committed, pushed where push is on, and served. Git failing (a full disk, a
read-only store) is a 409 with git's reason, and what moved is put back. Writes run one at a
time, in the order they arrive, to the end even when their client leaves. Where they go (the
mode, git-sync's checkout, the branch pushed to) is `delivery`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from service.config.snapshot import Snapshot
from service.config.upstreams import Lookup, system_lookup
from service.crypto.sops import Sops
from service.errors import Busy, Conflict, GitError, MethodNotAllowed
from service.runtime.checks import check_folder
from service.runtime.delivery import Mode, branch_name, branch_stem, fed_from, new_branch, resolve_mode
from service.runtime.drafts import Draft, Drafter, NoFile, ProviderKind, RouteChange, StaleTag
from service.runtime.landing import Lander
from service.runtime.publish import PUSH_ATTEMPTS, Making, Publisher, not_served
from service.runtime.refusals import file_of, naming
from service.runtime.registry import Registry
from service.runtime.watcher import Reloader
from service.runtime.written import Written
from service.settings import Settings
from service.vcs.authorship import Identity, message
from service.vcs.commit import Committer
from service.vcs.gitrepo import GitRepo, blob_sha

log = logging.getLogger(__name__)

APPLY_WAIT_S = 15.0
"""How long a write pushed from a git-sync checkout waits for git-sync to bring it back (its
default period is 10 s); then it is answered 202, pending."""

MAX_WAITING = 64
"""Writes queued behind the one running, at most: each takes a commit and a reload (~0.1 s),
so a client sending writes without waiting for answers cannot pile up tasks, bodies and
connections without bound."""


class Writer:
    """Turns writes into commits, one at a time, and waits until the service has applied each."""

    def __init__(
        self,
        settings: Settings,
        sops: Sops,
        registry: Registry,
        reloader: Reloader,
        repo: GitRepo | None,
        *,
        lookup: Lookup = system_lookup,
    ) -> None:
        """`lookup` resolves the host names of the `base_url`s written (SWITCHBOARD_ALLOWED_UPSTREAMS)."""
        self.settings = settings
        self.registry = registry
        self.reloader = reloader
        self.mode: Mode = resolve_mode(settings, repo)
        self.drafts = Drafter(settings, sops, repo, applies=self.mode == "commit", lookup=lookup)
        self.committer = Committer(repo, Identity.parse(settings.git_committer)) if repo is not None else None
        self.lock = asyncio.Lock()
        """Held while a write runs; a pull (runtime.sync) takes it too, so neither moves the branch
        under the other."""
        self.max_waiting = MAX_WAITING
        """Writes that may wait for the one running; more are refused (503, `Retry-After`)."""
        self.waiting = 0
        self.apply_wait_s = APPLY_WAIT_S
        """With git-sync: how long a write pushed waits for the swap that brings it (reference §12)."""
        self.lander = Lander(registry, reloader, self.drafts.display)
        self.publisher = Publisher(settings, self.lander, self._prepare)
        self._running: set[asyncio.Future[Written]] = set()
        """Writes under way: each runs to its end even when its client left (`aclose` waits)."""

    @property
    def repo(self) -> GitRepo | None:
        """The repository written to: the checkout's, or the git directory behind git-sync's."""
        return self.drafts.repo

    def recover(self) -> None:
        """Finish or clear a write a crash cut short; run before the first load."""
        if self.committer is not None:
            done = self.committer.recover()
            if done:
                log.warning("writes: %s", done)

    async def aclose(self) -> None:
        """Wait for the writes under way, before the reloader and the log close (the service is
        stopping: `Committer.abort` has cut their pushes and fetches short)."""
        if self._running:
            await asyncio.wait(set(self._running))

    # -- what the HTTP layer calls -------------------------------------------------------------

    async def create(
        self, kind: ProviderKind, body: Mapping[str, Any], client: str, reason: str | None
    ) -> Written:
        """A new provider file from `body` (its fields; `api_key` in plaintext)."""
        self.writable()
        with self.naming(kind, body.get("id") if isinstance(body, Mapping) else None):
            draft = self.drafts.create(kind, body)
        return await self._write(draft, client, reason)

    async def replace(
        self,
        kind: ProviderKind,
        provider_id: str,
        body: Mapping[str, Any],
        client: str,
        reason: str | None,
        if_match: str | None,
        *,
        key_readable: bool,
    ) -> Written:
        """The whole document of `provider_id` replaced by `body` (`api_key` left out: kept).

        `key_readable`: the client may read decrypted keys (`secrets:read`), which lets it move
        a key it does not send (`Drafter._update`).
        """
        self.writable()
        with self.naming(kind, provider_id):
            draft = self.drafts.replace(kind, provider_id, body, if_match, key_readable=key_readable)
        return await self._write(draft, client, reason)

    async def patch(
        self,
        kind: ProviderKind,
        provider_id: str,
        patch: Mapping[str, Any],
        client: str,
        reason: str | None,
        if_match: str | None,
        *,
        key_readable: bool,
    ) -> Written:
        """`provider_id`'s document with a JSON merge patch (RFC 7386); `key_readable` as in `replace`."""
        self.writable()
        with self.naming(kind, provider_id):
            draft = self.drafts.patch(kind, provider_id, patch, if_match, key_readable=key_readable)
        return await self._write(draft, client, reason)

    async def delete(
        self, kind: ProviderKind, provider_id: str, client: str, reason: str | None, if_match: str | None
    ) -> Written:
        """Remove `provider_id`'s file; 409 while routing names it."""
        self.writable()
        return await self._write(self.drafts.delete(kind, provider_id, if_match), client, reason)

    async def route(
        self, purpose: str, route: RouteChange, client: str, reason: str | None, if_match: str | None
    ) -> Written:
        """Set the route of `purpose` in the routing file (made when there is none); `route` may
        be a function of the route the file has there, made again on each base (the old form)."""
        self.writable()
        with self.naming("routing", purpose):
            draft = self.drafts.route(purpose, route, if_match)
        return await self._write(draft, client, reason)

    def naming(self, kind: str, subject: object) -> contextlib.AbstractContextManager[None]:
        """Within it, a refusal's problems found in the body itself name the file a write of `kind`
        to `subject` changes (`refusals`)."""
        return naming(lambda: file_of(self.settings, self.registry.snapshot, kind, subject))

    # -- the common path ----------------------------------------------------------------------

    def writable(self) -> None:
        """405 (`Allow: GET, HEAD`) when writes over HTTP are off: said before a body is read or
        judged, so that a write that could never be made is not told how to fix its body."""
        if self.mode == "off" or self.committer is None:
            why = "outside a git repository" if self.repo is None else "SWITCHBOARD_WRITE_MODE is off"
            raise MethodNotAllowed(f"writes over HTTP are off ({why}): change the files through git")

    async def _write(self, draft: Draft, client: str, reason: str | None) -> Written:
        self.writable()
        if self.waiting >= self.max_waiting:
            raise Busy(
                f"{self.waiting} writes are waiting for their turn (each is a commit, applied one "
                "at a time): try again shortly",
                retry_after_s=1,
            )
        # Shielded: a client that leaves (its handler cancelled) must not cut a write short
        # between its push and its apply, nor let the next write in while git still runs.
        self.waiting += 1
        running = asyncio.ensure_future(self._in_turn(draft, client, reason))
        self._running.add(running)
        running.add_done_callback(self._done)
        written = await asyncio.shield(running)
        if written.pending:  # pushed from git-sync's checkout: applied when git-sync brings it
            return await self._until_served(written)
        return written

    def _done(self, running: asyncio.Future[Written]) -> None:
        """Forget a write that ended. Its error is retrieved here: a client that left reads none."""
        self._running.discard(running)
        if not running.cancelled():
            running.exception()

    async def _in_turn(self, draft: Draft, client: str, reason: str | None) -> Written:
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        try:
            synced = await asyncio.to_thread(self._delivery)
            return await self._commit(draft, client, reason, synced)
        except (GitError, OSError) as exc:
            # Failed before anything moved: a commit git could not write (a full disk, a
            # read-only object store), a repository it could not read. Each step that moves
            # something answers for itself (`Lander.land`, `_landed`).
            raise Conflict(f"the write failed, and nothing was written: {exc}") from None
        finally:
            self.lock.release()

    def _delivery(self) -> str | None:
        """The commit git-sync's checkout is at, when git-sync feeds this replica (the commit is
        then built in the repository's own git directory); None for a branch of its own."""
        assert self.committer is not None  # noqa: S101 - checked by _write
        synced, repo = fed_from(self.settings, self.committer.repo)
        if repo.root != self.committer.repo.root:
            self.drafts.repo = repo
            self.committer = Committer(repo, self.committer.committer, stopping=self.committer.stopping)
        return synced

    async def _commit(self, draft: Draft, client: str, reason: str | None, synced: str | None) -> Written:
        committer = self.committer
        assert committer is not None  # noqa: S101 - checked by _write
        local: str | None = synced
        ref = "HEAD"
        if synced is None:
            ref = await asyncio.to_thread(committer.ref)
            if self.mode == "commit":
                branch_name(ref)  # a commit on a detached HEAD is lost at the next checkout or sync
            local = await asyncio.to_thread(committer.resolve, ref)
        subject = f"{draft.verb} {draft.kind} {draft.subject}"
        making = Making(
            committer, draft, ref, local, synced is not None, client, message(subject, reason, client)
        )
        path, data, changed = await asyncio.to_thread(self._prepare, draft, local, None if synced else local)
        if self.settings.git_push and self.mode == "commit":
            landed = await self.publisher.publish(making, path, data, changed)
            snapshot = None if landed.pending else self.registry.snapshot
            return self._written(
                draft,
                landed.path,
                landed.data,
                landed.commit,
                snapshot=snapshot,
                changed=landed.changed,
                pending=landed.pending,
            )
        if not changed:
            return await self._unchanged(draft, path, data, local)
        commit = await asyncio.to_thread(making.build, local, path, data)
        if self.mode == "branch":
            return await self._branch(making, commit, path, data)
        refusal = await self.lander.land(committer, ref, local, commit, path, undo=True)
        if refusal is not None:
            raise Conflict(refusal)
        return self._written(draft, path, data, commit, snapshot=self.registry.snapshot)

    async def _branch(self, making: Making, commit: str, path: str, data: bytes | None) -> Written:
        """`branch` mode: `commit` on a new branch, pushed where push is on; applied nowhere."""
        repo = making.committer.repo
        draft = making.draft
        stem = branch_stem(draft.verb, draft.subject)
        if not self.settings.git_push:
            branch = await asyncio.to_thread(new_branch, repo, stem, commit)
            return self._written(draft, path, data, commit, branch=branch)
        rejected: str | None = None
        for _ in range(PUSH_ATTEMPTS):  # a new branch on the remote too: never one that is there
            try:
                taken = await asyncio.to_thread(
                    making.committer.remote_branches, self.settings.git_push, f"{stem}-*"
                )
            except GitError as exc:
                raise Conflict(
                    f"cannot list the branches of the remote; nothing was written: {exc}"
                ) from None
            branch = await asyncio.to_thread(new_branch, repo, stem, commit, taken)
            rejected = await asyncio.to_thread(
                making.committer.push, self.settings.git_push, commit, branch, at=None
            )
            if rejected is None:
                return self._written(draft, path, data, commit, branch=branch)
            await asyncio.to_thread(repo.run, "update-ref", "-d", f"refs/heads/{branch}", commit)
        raise Conflict(f"the push of {branch} failed; nothing was written: {rejected}")

    async def _unchanged(self, draft: Draft, path: str, data: bytes | None, commit: str | None) -> Written:
        """A write asking for what `commit` (applied here) already says: no commit. Still a 409
        when that file is not served as it is (refused: its last good version is)."""
        refusal = await self.lander.applied(path)
        if refusal is not None:
            raise Conflict(
                f"{self.drafts.display(path)} already says this, but the service does not apply it: {refusal}"
            )
        return self._written(draft, path, data, commit or "", snapshot=self.registry.snapshot, changed=False)

    # -- with SWITCHBOARD_GIT_PUSH --------------------------------------------------------------

    async def _until_served(self, written: Written) -> Written:
        """`written` once this replica applies its commit (or one after it); a 409 when it
        refused it; still pending after `apply_wait_s`."""
        assert self.committer is not None  # noqa: S101
        state, refusal = await self.lander.until_served(
            self.committer, written.commit, written.file, self.apply_wait_s
        )
        if refusal is not None:
            raise not_served(written.commit, refusal)
        if state is None:
            return written
        snapshot = state.snapshot
        return replace(written, generation=snapshot.generation, snapshot=snapshot, pending=False)

    # -- drafting -----------------------------------------------------------------------------------

    def _prepare(self, draft: Draft, base: str | None, local: str | None) -> tuple[str, bytes | None, bool]:
        """Files at `base`, the draft's change on them, validated as `validate` would; raises 4xx.
        With `local`, the file written must hold no local edits against it (409)."""
        assert self.repo is not None  # noqa: S101
        files = self.repo.read_tree(base, self.drafts.folder) if base else {}
        try:
            with self.naming(draft.kind, draft.subject):
                path, data, changed = draft.make(files, lambda: self.drafts.committed_rules(base, local))
        except StaleTag as stale:
            self._check_clean(stale.path, local)
            raise
        except NoFile as missing:
            for candidate in missing.paths:
                self._check_clean(candidate, local)
            raise
        self._check_clean(path, local)
        if changed:
            check_folder(files, path, data, self.drafts.display)
        return path, data, changed

    def _check_clean(self, path: str, local: str | None) -> None:
        """409 when `path` has local changes against `local` (the commit the files are at)."""
        if local is not None and self.committer is not None and self.committer.is_dirty(path, local):
            raise Conflict(
                f"{self.drafts.display(path)} has local changes that are not committed; "
                "commit or discard them first (a write never overwrites them)"
            )

    def _written(
        self,
        draft: Draft,
        path: str,
        data: bytes | None,
        commit: str,
        *,
        snapshot: Snapshot | None = None,
        branch: str | None = None,
        changed: bool = True,
        pending: bool = False,
    ) -> Written:
        """What `draft` did: `path` made `data` (None: deleted) in `commit`, applied in `snapshot`."""
        return Written(
            draft.verb,
            draft.kind,
            draft.subject,
            self.drafts.display(path),
            commit,
            blob_sha(data) if data is not None else None,
            generation=snapshot.generation if snapshot is not None else None,
            snapshot=snapshot,
            branch=branch,
            changed=changed,
            pending=pending,
        )

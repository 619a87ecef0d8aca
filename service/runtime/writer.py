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
   With `SWITCHBOARD_GIT_PUSH`, push; a rejected push is rebuilt on the remote's head (and
   validated again), at most 3 times, or the write fails and nothing local moved (409).
4. `commit` mode: with the watcher held off, move the branch and the files, then reload once;
   the answer carries the generation that applied it. A failure puts branch and files back.

Writes are applied one at a time, in the order they arrive. Where they go (the mode, git-sync's
checkout, the branch pushed to) is `delivery`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from service.config.snapshot import Snapshot
from service.crypto.sops import Sops
from service.errors import Busy, Conflict, GitError, MethodNotAllowed
from service.runtime.checks import check_folder
from service.runtime.delivery import (
    Mode,
    branch_name,
    new_branch,
    push_target,
    resolve_mode,
    synced_checkout,
)
from service.runtime.drafts import Draft, Drafter, ProviderKind, Verb
from service.runtime.registry import Outcome, Registry
from service.runtime.watcher import Reloader, link_folders
from service.settings import Settings
from service.vcs.commit import Committer, Identity, message
from service.vcs.gitrepo import GitRepo, blob_sha

log = logging.getLogger(__name__)

PUSH_ATTEMPTS = 3
APPLY_WAIT_S = 15.0
"""How long a write pushed from a git-sync checkout waits for git-sync to bring it back (its
default period is 10 s); then it is answered 202, pending."""

MAX_WAITING = 64
"""Writes queued behind the one running, at most: each takes a commit and a reload (~0.1 s),
so a client sending writes without waiting for answers cannot pile up tasks, bodies and
connections without bound."""


@dataclass(frozen=True, slots=True)
class Written:
    """What a write did: its commit, and the generation that applied it (None in branch mode)."""

    verb: Verb
    kind: str
    subject: str
    file: str
    commit: str
    blob: str | None
    """The git blob id of the file written (None when it was deleted): the answer's ETag."""
    generation: int | None = None
    snapshot: Snapshot | None = None
    branch: str | None = None
    changed: bool = True
    """False when the write asked for what the file already says: no commit was made."""
    pending: bool = False
    """Pushed, but not applied here yet (git-sync had not brought it within `apply_wait_s`)."""


class Writer:
    """Turns writes into commits, one at a time, and waits until the service has applied each."""

    def __init__(
        self,
        settings: Settings,
        sops: Sops,
        registry: Registry,
        reloader: Reloader,
        repo: GitRepo | None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.reloader = reloader
        self.mode: Mode = resolve_mode(settings, repo)
        self.drafts = Drafter(settings, sops, repo, applies=self.mode == "commit")
        self.committer = Committer(repo, Identity.parse(settings.git_committer)) if repo is not None else None
        self.lock = asyncio.Lock()
        """Held while a write runs; a pull (runtime.sync) takes it too, so neither moves the branch
        under the other."""
        self.max_waiting = MAX_WAITING
        """Writes that may wait for the one running; more are refused (503, `Retry-After`)."""
        self.waiting = 0
        self.apply_wait_s = APPLY_WAIT_S
        """With git-sync: how long a write pushed waits for the swap that brings it back
        (docs/reference.md §12)."""

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

    # -- what the HTTP layer calls -------------------------------------------------------------

    async def create(
        self, kind: ProviderKind, body: Mapping[str, Any], client: str, reason: str | None
    ) -> Written:
        """A new provider file from `body` (its fields; `api_key` in plaintext)."""
        return await self._write(self.drafts.create(kind, body), client, reason)

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
        draft = self.drafts.patch(kind, provider_id, patch, if_match, key_readable=key_readable)
        return await self._write(draft, client, reason)

    async def delete(
        self, kind: ProviderKind, provider_id: str, client: str, reason: str | None, if_match: str | None
    ) -> Written:
        """Remove `provider_id`'s file; 409 while routing names it."""
        return await self._write(self.drafts.delete(kind, provider_id, if_match), client, reason)

    async def route(
        self, purpose: str, route: Mapping[str, Any], client: str, reason: str | None, if_match: str | None
    ) -> Written:
        """Set the route of `purpose` in the routing file (made when there is none)."""
        return await self._write(self.drafts.route(purpose, route, if_match), client, reason)

    # -- the common path ----------------------------------------------------------------------

    async def _write(self, draft: Draft, client: str, reason: str | None) -> Written:
        if self.mode == "off" or self.committer is None:
            why = "outside a git repository" if self.repo is None else "SWITCHBOARD_WRITE_MODE is off"
            raise MethodNotAllowed(f"writes over HTTP are off ({why}): change the files through git")
        if self.waiting >= self.max_waiting:
            raise Busy(
                f"{self.waiting} writes are waiting for their turn (each is a commit, applied one "
                "at a time): try again shortly",
                retry_after_s=1,
            )
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        try:
            synced = await asyncio.to_thread(self._delivery)
            written = await self._commit(draft, client, reason, synced)
        finally:
            self.lock.release()
        if written.pending:  # pushed from git-sync's checkout: applied when git-sync brings it
            return await self._until_applied(written)
        return written

    def _delivery(self) -> str | None:
        """The commit git-sync's checkout is at, when this replica is fed by git-sync; None when
        it writes to a branch of its own. MethodNotAllowed when a replica that pulls or is
        synced has nowhere to push a write.

        With the built-in pull or git-sync, the remote is the truth: a commit made here alone
        would be served by this replica only, and (with the pull) keep its branch from ever
        fast-forwarding again. A git-sync checkout is a worktree behind a swapped link, on a
        detached HEAD, and git-sync's: it is never moved here (nor even read after this, since
        git-sync may delete it any moment). The commit is built in the repository's own git
        directory, pushed, and applied when git-sync brings it back.
        """
        assert self.committer is not None  # noqa: S101 - checked by _write
        synced: str | None = None
        if link_folders(self.settings.providers_dir):
            found = synced_checkout(self.settings.providers_dir)
            if found is not None:
                synced, repo = found
                if repo.root != self.committer.repo.root:
                    self.drafts.repo, self.committer = (
                        repo,
                        Committer(repo, self.committer.committer, stopping=self.committer.stopping),
                    )
        if self.settings.git_push is None and (synced or self.settings.git_pull is not None):
            feed = "git-sync" if synced else "SWITCHBOARD_GIT_PULL"
            raise MethodNotAllowed(
                f"this replica is fed from a remote ({feed}), so a write must reach the remote first: "
                "set SWITCHBOARD_GIT_PUSH, or write through git"
            )
        return synced

    async def _commit(
        self, draft: Draft, client: str, reason: str | None, synced: str | None = None
    ) -> Written:
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
        text = message(subject, reason, client)
        author = Identity.client(client)
        base = local
        target: str | None = None
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            check = attempt == 1 and synced is None  # git-sync's checkouts hold no local edits
            path, data, changed = await asyncio.to_thread(self._prepare, draft, base, check)
            if not changed:
                return self._written(
                    draft, path, data, base or "", snapshot=self.registry.snapshot, changed=False
                )
            commit = await asyncio.to_thread(committer.build, base, {path: data}, author=author, text=text)
            if self.mode == "branch":
                branch = await asyncio.to_thread(
                    new_branch, committer.repo, draft.verb, draft.subject, commit
                )
                rejected = await self._push(commit, branch) if self.settings.git_push else None
                if rejected is not None:
                    await asyncio.to_thread(committer.repo.run, "update-ref", "-d", f"refs/heads/{branch}")
                    raise Conflict(f"the push of {branch} failed: {rejected}")
                return self._written(draft, path, data, commit, branch=branch)
            if not self.settings.git_push:
                return await self._apply(draft, ref, local, commit, path, data)
            target = target or await push_target(self.settings, committer, ref, local, synced is not None)
            rejected = await self._push(commit, target)
            if rejected is None:
                if synced is not None:  # git-sync's checkout is not moved here: it brings the commit back
                    return self._written(draft, path, data, commit, pending=True)
                if (
                    base != local
                    and local is not None
                    and not await asyncio.to_thread(committer.is_ancestor, local, commit)
                ):
                    raise Conflict(
                        "the push landed, but the local branch has commits the remote lacks, so it was not "
                        "moved: reconcile the local branch with the remote"
                    )
                return await self._apply(draft, ref, local, commit, path, data)
            log.info("push of %s rejected (attempt %d): %s", subject, attempt, rejected)
            if attempt == PUSH_ATTEMPTS:
                raise Conflict(f"the push was refused {PUSH_ATTEMPTS} times; nothing was written: {rejected}")
            try:
                base = await asyncio.to_thread(committer.fetch, self.settings.git_push, target)
            except GitError as exc:
                raise Conflict(
                    f"the push was refused and the fetch failed; nothing was written: {exc}"
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _until_applied(self, written: Written) -> Written:
        """`written` once this replica applies its commit (or one after it), or still pending
        after `apply_wait_s`; never longer."""
        loop = asyncio.get_running_loop()
        applied = asyncio.Event()

        def wake(outcome: Outcome) -> None:  # in the applying thread
            loop.call_soon_threadsafe(applied.set)

        self.registry.on_apply.append(wake)
        deadline = loop.time() + self.apply_wait_s
        try:
            while True:
                applied.clear()
                state = self.registry.state
                if state.last_applied_commit is not None and await asyncio.to_thread(
                    self._landed, written.commit, state.last_applied_commit
                ):
                    snapshot = state.snapshot
                    return replace(written, generation=snapshot.generation, snapshot=snapshot, pending=False)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.info("%s pushed; not applied within %gs", written.commit[:12], self.apply_wait_s)
                    return written
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(applied.wait(), remaining)
        finally:
            self.registry.on_apply.remove(wake)

    def _prepare(self, draft: Draft, base: str | None, first: bool) -> tuple[str, bytes | None, bool]:
        """Files at `base`, the draft's change on them, validated as `validate` would; raises 4xx."""
        assert self.repo is not None  # noqa: S101
        files = self.repo.read_tree(base, self.drafts.folder) if base else {}
        path, data, changed = draft.make(files)
        if first and self.committer is not None and self.committer.is_dirty(path, base):
            raise Conflict(
                f"{self.drafts.display(path)} has local changes that are not committed; "
                "commit or discard them first (a write never overwrites them)"
            )
        if changed:
            check_folder(files, path, data, self.drafts.display)
        return path, data, changed

    async def _push(self, commit: str, branch: str) -> str | None:
        assert self.committer is not None and self.settings.git_push is not None  # noqa: S101
        return await asyncio.to_thread(self.committer.push, self.settings.git_push, commit, branch)

    async def _apply(
        self, draft: Draft, ref: str, local: str | None, commit: str, path: str, data: bytes | None
    ) -> Written:
        """Move the branch and files to `commit` with the watcher held off, then reload once."""
        committer = self.committer
        assert committer is not None  # noqa: S101
        paths = await asyncio.to_thread(committer.changed, local, commit)
        dirty = [p for p in paths if await asyncio.to_thread(committer.is_dirty, p, local)]
        if dirty:
            raise Conflict(
                f"{', '.join(self.drafts.display(p) for p in dirty)}: local changes that are not committed; "
                "a write never overwrites them"
            )
        async with self.reloader.exclusive() as reload:
            try:
                moved = await asyncio.to_thread(committer.advance, ref, local, commit)
            except GitError as exc:
                raise Conflict(f"git refused the write; nothing changed: {exc}") from None
            name = self.drafts.display(path)
            refusal = await self._refusal(reload, name)
            if refusal is not None and not self.settings.git_push:
                await asyncio.to_thread(committer.undo, ref, local, commit, moved)
                await self._refusal(reload, name)
                raise Conflict(f"the service did not apply the write, and it was undone: {refusal}")
        return self._written(draft, path, data, commit, snapshot=self.registry.snapshot)

    @staticmethod
    async def _refusal(reload: Callable[[], Awaitable[Outcome]], name: str) -> str | None:
        """Reload; why the written file `name` was not applied, or None when it was.

        Not applied: the file refused, the batch refused as a whole (files with local edits may
        make it fail cross-file checks that passed at HEAD), or the reload failing outright.
        """
        try:
            outcome = await reload()
        except Exception:  # a write must not stay half-applied, whatever went wrong
            log.exception("the reload after a write failed")
            return "the reload failed (see the service log)"
        if name in outcome.refused:
            return outcome.refused[name]
        if not outcome.applied:
            return "; ".join(f"{file}: {reason}" for file, reason in sorted(outcome.refused.items()))
        return None

    def _landed(self, commit: str, applied: str) -> bool:
        """Whether `applied` is `commit` or one after it (asked of the repository's own git
        directory, which git-sync never removes)."""
        return commit == applied or (
            self.committer is not None and self.committer.is_ancestor(commit, applied)
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

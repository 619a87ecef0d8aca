"""A write with `SWITCHBOARD_GIT_PUSH` (docs/reference.md §8, 12): on the remote first, then here.

The push is a compare-and-swap on the remote's branch (`Committer.push` with the commit it
must be at), so it never lands on a remote that moved since it was looked at, and never
carries along commits of the local branch that the remote lacks. Refused, the remote's head is
fetched, the write drafted again on it and validated again, at most `PUSH_ATTEMPTS` times;
a local branch that cannot fast-forward to that head (commits the remote lacks) takes no
write at all (409), so local and remote never diverge.

Once the remote has the commit it is landed here (`Lander.land`, never undone: the remote
keeps it). A commit the remote has and this service does not serve is answered 409 saying so,
with the commit (`not_served`): never a 200 for what is not served, never a 409 that hides
what the remote has. From git-sync's checkout nothing is landed here: git-sync brings the
commit back, and the writer waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import Conflict, GitError
from service.runtime.delivery import push_target
from service.runtime.drafts import Draft
from service.runtime.landing import Lander
from service.settings import Settings
from service.vcs.authorship import Identity
from service.vcs.commit import Committer

log = logging.getLogger(__name__)

PUSH_ATTEMPTS = 3

Prepare = Callable[[Draft, str | None, str | None], tuple[str, bytes | None, bool]]
"""(draft, base, local) -> (path, new content, changed): the draft made and validated on `base`."""


@dataclass(frozen=True, slots=True)
class Making:
    """One write under way: its draft, the branch it goes on and where that was, who makes it."""

    committer: Committer
    draft: Draft
    ref: str
    local: str | None
    """The commit the branch (or git-sync's checkout) was at when the write began."""
    synced: bool
    """Whether `local` is git-sync's checkout, which is never moved here."""
    client: str
    text: str

    def build(self, base: str | None, path: str, data: bytes | None) -> str:
        """The commit of the draft's change on `base` (touching no ref, no index, no file)."""
        return self.committer.build(base, {path: data}, author=Identity.client(self.client), text=self.text)


@dataclass(frozen=True, slots=True)
class Landed:
    """A write the remote has: its commit, applied here (or, from git-sync's checkout, pending)."""

    commit: str
    path: str
    data: bytes | None
    changed: bool
    pending: bool


class Publisher:
    """Pushes writes to `SWITCHBOARD_GIT_PUSH` and lands what the remote took."""

    def __init__(self, settings: Settings, lander: Lander, prepare: Prepare) -> None:
        self.settings = settings
        self.lander = lander
        self.prepare = prepare

    async def publish(self, making: Making, path: str, data: bytes | None, changed: bool) -> Landed:
        """Push the write drafted on the local branch (`path` made `data`), then land it here.

        The first push assumes the remote is at the local branch; refused, the remote's head
        is fetched and the write drafted again on it. A write that changes nothing is checked
        against the remote too: "pushed where push is on" holds for what it asked.
        """
        remote = self.settings.git_push
        assert remote is not None  # noqa: S101
        committer, draft = making.committer, making.draft
        target = await push_target(self.settings, committer, making.ref, making.local, making.synced)
        base, fetched, refused, rejected = making.local, None, 0, None
        while True:
            if changed:
                commit = await asyncio.to_thread(making.build, base, path, data)
                if not making.synced:  # what the local branch lands on must hold no local edits
                    dirty = await asyncio.to_thread(self.lander.dirty, committer, making.local, commit)
                    if dirty:
                        raise Conflict(self.lander.why_dirty(dirty))
                rejected = await asyncio.to_thread(committer.push, remote, commit, target, at=base)
                if rejected is None:
                    return await self._land(making, commit, path, data, changed=True)
                refused += 1
                log.info("push of %s rejected (attempt %d): %s", draft.subject, refused, rejected)
                if refused == PUSH_ATTEMPTS:
                    raise Conflict(f"the push was refused {refused} times; nothing was written: {rejected}")
            elif fetched is not None:  # the remote has what was asked already
                return await self._land(making, fetched, path, data, changed=False)
            head = await self._remote_head(making, remote, target)
            if refused and head == base:  # not a race lost: a hook, a protected branch, a credential
                raise Conflict(f"the push was refused; nothing was written: {rejected}")
            base = fetched = head
            path, data, changed = await asyncio.to_thread(self.prepare, draft, base, None)

    async def _remote_head(self, making: Making, remote: str, target: str) -> str:
        """The commit the remote's branch is at, which the local branch must be able to
        fast-forward to: a write on a branch with commits the remote lacks would make the two
        diverge, or publish those commits along with it."""
        committer, local = making.committer, making.local
        try:
            head = await asyncio.to_thread(committer.fetch, remote, target)
        except GitError as exc:
            raise Conflict(f"the push was refused and the fetch failed; nothing was written: {exc}") from None
        if making.synced or local is None or await asyncio.to_thread(committer.is_ancestor, local, head):
            return head
        raise Conflict(
            f"the local branch (at {local[:12]}) cannot fast-forward to the remote's {target} (at "
            f"{head[:12]}): it has commits the remote lacks (or the remote was rewritten), and a write "
            "would make the two diverge, or publish those commits with it; push them or reset the "
            "branch first. Nothing was written."
        )

    async def _land(
        self, making: Making, commit: str, path: str, data: bytes | None, *, changed: bool
    ) -> Landed:
        """The remote has `commit`: land it here, or say with it that it is not served."""
        if making.synced:  # git-sync's checkout is not moved here: it brings the commit back
            return Landed(commit, path, data, changed, pending=True)
        refusal = await self.lander.land(making.committer, making.ref, making.local, commit, path, undo=False)
        if refusal is not None:
            raise not_served(commit, refusal)
        return Landed(commit, path, data, changed, pending=False)


def not_served(commit: str, reason: str) -> Conflict:
    """409 for a commit the remote has and this service does not serve: said, with the commit."""
    return Conflict(
        f"the remote has this write (commit {commit[:12]}) and the remote keeps it, but this service "
        f"does not serve it: {reason}; fix it through git",
        commit=commit,
        pushed=True,
    )

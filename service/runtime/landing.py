"""Landing a write's commit here (docs/reference.md §8): the branch and files moved to it, then one reload.

A write is served only once the service applied its commit, through the watcher's path. The
`Lander` moves the branch and the files with the watcher held off (so no reload sees half a
change), reloads once, and says whether the written file was applied; a commit not applied is
undone when nothing outside has it (no push), and kept when the remote has it (the writer
then says so). A replica fed by git-sync never moves git-sync's checkout: `until_served` waits
for the swap that brings the commit, and says whether it was applied or refused.

Nothing here answers a client: each step returns why it failed, and the writer words the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from service.errors import EventLogError, GitError
from service.runtime.registry import Outcome, Registry
from service.runtime.state import State
from service.runtime.watcher import Reloader
from service.vcs.commit import Committer

log = logging.getLogger(__name__)

Display = Callable[[str], str]
"""A repository path as answers name it (relative to the configuration root)."""


class Lander:
    """Moves the branch and files to a write's commit and applies it, or says why not."""

    def __init__(self, registry: Registry, reloader: Reloader, display: Display) -> None:
        self.registry = registry
        self.reloader = reloader
        self.display = display

    def dirty(self, committer: Committer, local: str | None, commit: str) -> list[str]:
        """The paths `commit` changes since `local` that have local changes not committed: a
        write never runs over them (nor over an untracked file in the way of one it adds)."""
        return [p for p in committer.changed(local, commit) if committer.is_dirty(p, local)]

    def why_dirty(self, paths: list[str]) -> str:
        shown = ", ".join(self.display(p) for p in paths)
        return f"{shown}: local changes that are not committed; a write never overwrites them"

    async def land(
        self, committer: Committer, ref: str, local: str | None, commit: str, path: str, *, undo: bool
    ) -> str | None:
        """Move `ref` and its files from `local` to `commit`, reload: None when the file `path`
        was applied, else why not. With `undo`, a commit not applied is undone first (branch,
        index and files as before), and the reason says whether that worked."""
        name = self.display(path)
        try:
            dirty = await asyncio.to_thread(self.dirty, committer, local, commit)
        except (GitError, OSError) as exc:
            return f"git failed; nothing changed here: {exc}"
        if dirty:
            return self.why_dirty(dirty)
        async with self.reloader.exclusive() as reload:
            try:
                moved = await asyncio.to_thread(committer.advance, ref, local, commit)
            except GitError as exc:
                return f"git refused the write; nothing changed here: {exc}"
            refusal = await self.refusal(reload, name)
            if refusal is None or not undo:
                return refusal
            try:
                await asyncio.to_thread(committer.undo, ref, local, commit, moved)
            except (GitError, OSError) as exc:
                log.error("a write not applied could not be undone: %s", exc)
                return (
                    f"the service did not apply the write ({refusal}), and putting it back failed too "
                    f"({exc}): the branch may still hold the commit (see `git log` and `git status`)"
                )
            await self.refusal(reload, name)
        return f"the service did not apply the write, and it was undone: {refusal}"

    async def applied(self, path: str) -> str | None:
        """Reload now: None when the file `path` is applied as it is, else why not."""
        async with self.reloader.exclusive() as reload:
            return await self.refusal(reload, self.display(path))

    @staticmethod
    async def refusal(reload: Callable[[], Awaitable[Outcome]], name: str) -> str | None:
        """Reload; why the written file `name` was not applied, or None when it was.

        Not applied: the file refused, the batch refused as a whole (files with local edits may
        make it fail cross-file checks that passed at HEAD), the event log unable to record it,
        or the reload failing outright.
        """
        try:
            outcome = await reload()
        except EventLogError as exc:  # a change that cannot be recorded is not applied
            return f"the event log cannot record it: {exc}"
        except Exception:  # a write must not stay half-applied, whatever went wrong
            log.exception("the reload after a write failed")
            return "the reload failed (see the service log)"
        if name in outcome.refused:
            return outcome.refused[name]
        if not outcome.applied:
            return _all(outcome.refused)
        return None

    async def until_served(
        self, committer: Committer, commit: str, name: str, wait_s: float
    ) -> tuple[State | None, str | None]:
        """With git-sync: wait until this replica applied `commit` (or one after it), at most
        `wait_s`. (the state, None) once the file `name` (as answers name it) is served;
        (None, why) once it was refused; (None, None) when git-sync did not bring the commit
        in time."""
        loop = asyncio.get_running_loop()
        news = asyncio.Event()

        def wake(outcome: Outcome) -> None:  # in the applying thread
            loop.call_soon_threadsafe(news.set)

        self.registry.on_apply.append(wake)
        deadline = loop.time() + wait_s
        try:
            while True:
                news.clear()
                state = self.registry.state
                if await asyncio.to_thread(_reached, committer, commit, state.last_applied_commit):
                    return (None, state.refused[name]) if name in state.refused else (state, None)
                if await asyncio.to_thread(_reached, committer, commit, state.last_attempted_commit):
                    return None, _all(state.refused)  # the commit was read, and refused as a whole
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.info("%s pushed; not applied within %gs", commit[:12], wait_s)
                    return None, None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(news.wait(), remaining)
        finally:
            self.registry.on_apply.remove(wake)


def _reached(committer: Committer, commit: str, at: str | None) -> bool:
    """Whether `at` is `commit` or one after it (asked of the repository's own git directory,
    which git-sync never removes)."""
    return at is not None and (at == commit or committer.is_ancestor(commit, at))


def _all(refused: Mapping[str, str]) -> str:
    """Every refusal, as one reason."""
    return "; ".join(f"{file}: {reason}" for file, reason in sorted(refused.items())) or "refused"

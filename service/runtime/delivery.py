"""Where a write goes (docs/reference.md §8, §12): the write mode, and the branch its commit is put on.

- `commit` mode moves the branch checked out (a commit on a detached HEAD would be lost at the
  next checkout or sync); with `SWITCHBOARD_GIT_PUSH` it pushes to that branch first.
- `branch` mode puts each commit on a new branch `switchboard/<verb>-<id>-<n>`, applied nowhere.
- `off`: writes over HTTP are refused (the default outside a git repository).

A replica fed by git-sync writes from the repository behind the checkout's link, and pushes to
the branch git-sync follows.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from service.errors import Conflict, GitError, MethodNotAllowed
from service.runtime.scan import link_folders
from service.settings import Settings
from service.vcs.commit import Committer
from service.vcs.gitrepo import GitRepo

Mode = Literal["commit", "branch", "off"]

_BRANCH_ATTEMPTS = 5


def resolve_mode(settings: Settings, repo: GitRepo | None) -> Mode:
    """`SWITCHBOARD_WRITE_MODE`, or `commit` inside a git repository and `off` outside one."""
    if settings.write_mode is not None:
        return settings.write_mode if repo is not None else "off"
    return "commit" if repo is not None else "off"


def fed_from(settings: Settings, repo: GitRepo) -> tuple[str | None, GitRepo]:
    """(the commit git-sync's checkout is at, the repository behind it) when git-sync feeds this
    replica; (None, `repo`) when it writes to a branch of its own. MethodNotAllowed when a
    replica that pulls or is synced has nowhere to push a write.

    With the built-in pull or git-sync, the remote is the truth: a commit made here alone
    would be served by this replica only, and (with the pull) keep its branch from ever
    fast-forwarding again. A git-sync checkout is a worktree behind a swapped link, on a
    detached HEAD, and git-sync's: it is never moved here (nor even read after this, since
    git-sync may delete it any moment). The commit is built in the repository's own git
    directory, pushed, and applied when git-sync brings it back.
    """
    synced: str | None = None
    if link_folders(settings.providers_dir):
        found = synced_checkout(settings.providers_dir)
        if found is not None:
            synced, repo = found
    if settings.git_push is None and (synced or settings.git_pull is not None):
        feed = "git-sync" if synced else "SWITCHBOARD_GIT_PULL"
        raise MethodNotAllowed(
            f"this replica is fed from a remote ({feed}), so a write must reach the remote first: "
            "set SWITCHBOARD_GIT_PUSH, or write through git"
        )
    return synced, repo


async def refuse_unfed(settings: Settings, repo: GitRepo) -> None:
    """`fed_from`'s 405 alone, asked before a write's body is read: without a link on the way
    to the providers it asks no git (and does not leave the loop); behind one, git tells whether
    it is git-sync's checkout, in a thread."""
    if settings.git_push is None:
        if link_folders(settings.providers_dir):
            await asyncio.to_thread(fed_from, settings, repo)
        else:
            fed_from(settings, repo)


def synced_checkout(providers_dir: Path) -> tuple[str, GitRepo] | None:
    """(HEAD, the repository's git directory) of the detached worktree behind the link; None
    for a branch checked out. A worktree git-sync removes under the question is asked again."""
    for _ in range(3):
        worktree = GitRepo.find(providers_dir)
        if worktree is None:
            return None
        try:
            if worktree.run("symbolic-ref", "-q", "HEAD", ok=(0, 1)).strip():
                return None
            head = worktree.head()
            common = worktree.run("rev-parse", "--path-format=absolute", "--git-common-dir")
        except GitError:
            continue  # swapped and removed meanwhile
        if head is not None:
            return head, GitRepo(Path(common.decode().strip()))
    raise Conflict("the checkout behind the providers link kept changing; try again")


def branch_name(ref: str) -> str:
    """The branch `ref` names; Conflict for a detached HEAD, which a commit cannot be kept on."""
    if not ref.startswith("refs/heads/"):
        raise Conflict(
            "HEAD is detached (a git-sync checkout?): a write needs a branch to commit to "
            "(check one out, or use SWITCHBOARD_WRITE_MODE=branch)"
        )
    return ref.removeprefix("refs/heads/")


async def push_target(
    settings: Settings, committer: Committer, ref: str, local: str | None, synced: bool
) -> str:
    """The remote branch a write is pushed to: the current branch's name, or, from git-sync's
    detached checkout, the branch it follows (`SWITCHBOARD_GIT_PULL`'s, else asked of the remote)."""
    assert settings.git_push is not None  # noqa: S101
    if not synced:
        return branch_name(ref)
    if settings.git_pull is not None:
        return settings.git_pull.partition("/")[2]
    try:
        return await asyncio.to_thread(committer.remote_branch, settings.git_push, local)
    except GitError as exc:
        raise Conflict(f"cannot tell which branch of the remote to push to: {exc}") from None


def branch_stem(verb: str, subject: str) -> str:
    """`switchboard/<verb>-<subject>`, the branch names of a write in `branch` mode without their
    number. An id may hold `..`, which a ref name may not: it is written `.`."""
    return f"switchboard/{verb}-{re.sub(r'[.]{2,}', '.', subject)}"


def new_branch(repo: GitRepo, stem: str, commit: str, taken: Iterable[str] = ()) -> str:
    """A new branch `<stem>-<n>` at `commit` (never an existing one, nor one of `taken`: the
    names the remote a write is pushed to holds).

    `n` follows the highest taken, found in one listing (trying numbers one git call each
    made the thousandth write of an id cost a thousand calls).
    """
    listed = repo.run("for-each-ref", "--format=%(refname:strip=2)", f"refs/heads/{stem}-*")
    tails = (line.removeprefix(f"{stem}-") for line in [*listed.decode().splitlines(), *taken])
    highest = max((int(t) for t in tails if t.isdigit()), default=0)
    for n in range(highest + 1, highest + 1 + _BRANCH_ATTEMPTS):
        try:
            repo.run("update-ref", f"refs/heads/{stem}-{n}", commit, "0" * 40)
        except GitError:
            continue  # taken meanwhile (another replica?): the next number
        return f"{stem}-{n}"
    raise Conflict(f"no free branch name under {stem}-")

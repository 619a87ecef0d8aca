"""Writing to git for the service: a commit made without hooks, then the branch and files moved.

The service holds decrypted keys, so nothing in or beside the repository may run a program in
its process: commits are built with plumbing (`hash-object`, a temporary index, `write-tree`,
and the commit object written out whole, author and committer included), which runs no hook
and needs no identity from the environment; every command also gets `SAFE_CONFIG`.

A write is three steps, each safe to stop after:

1. `build`: the new commit object on top of a base. Nothing visible has changed.
2. `advance`: an intent record in the git directory, then the branch moved from the base to
   the commit (compare-and-swap: a branch moved by someone else meanwhile is refused), then
   each changed file written atomically and its index entry updated (`worktree.WorkTree`).
3. the intent record removed.

`recover` (run before the service loads anything) finishes a step 2 that a crash cut short,
so after a restart the working tree is clean and the commit whole, never half of either.
`undo` puts branch, index and files back as they were when something fails after step 2; it
is recorded the same way, so a crash in the middle of an undo is finished at the restart too.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from service.errors import GitError
from service.files import fsync_path, write_atomically
from service.vcs.authorship import Identity
from service.vcs.git_output import redact
from service.vcs.gitrepo import GitRepo
from service.vcs.worktree import WorkTree, no_filters

_INTENT = "switchboard-write.json"
REMOTE_TIMEOUT_S = 60.0
"""The longest a push or a fetch may take (a write waits for it, the write lock held)."""
FETCHED = "refs/switchboard/fetched/"
"""Where `fetch` records what a remote's branch is at."""

Changes = Mapping[str, bytes | None]
"""Path (relative to the top level, POSIX) -> new content, or None to delete the file."""


class Committer:
    """Builds commits in one repository and moves its branch and files to them."""

    def __init__(
        self, repo: GitRepo, committer: Identity, *, stopping: threading.Event | None = None
    ) -> None:
        self.repo = repo
        self.committer = committer
        self.stopping = stopping or threading.Event()
        """Set by `abort`: pushes and fetches running are killed, new ones refused (shutdown)."""
        self._git_dir = Path(repo.run("rev-parse", "--absolute-git-dir").decode().strip())
        self.tree = WorkTree(repo, self._git_dir)

    # -- reading -----------------------------------------------------------------------------

    def ref(self) -> str:
        """The ref a write moves: the current branch (`refs/heads/main`), or `HEAD` when detached."""
        out = self.repo.run("symbolic-ref", "-q", "HEAD", ok=(0, 1)).decode().strip()
        return out or "HEAD"

    def resolve(self, ref: str) -> str | None:
        """The commit `ref` points at, or None (an unborn branch, an unknown ref)."""
        out = self.repo.run("rev-parse", "-q", "--verify", f"{ref}^{{commit}}", ok=(0, 1)).strip()
        return out.decode() if out else None

    def changed(self, old: str | None, new: str) -> list[str]:
        """The paths that differ between two commits (all of `new`'s when `old` is None)."""
        if old is None:
            out = self.repo.run("ls-tree", "-r", "-z", "--name-only", "--full-tree", new)
        else:
            out = self.repo.run("diff-tree", "-r", "-z", "--no-renames", "--name-only", old, new)
        return sorted(p.decode("utf-8", "surrogateescape") for p in out.split(b"\0") if p)

    def is_dirty(self, path: str, base: str | None) -> bool:
        """Whether `path` has local changes against `base` in the working tree or the index."""
        expected = self.repo.read_file(base, path) if base else None
        try:
            current: bytes | None = (self.repo.root / path).read_bytes()
        except FileNotFoundError:
            current = None
        except IsADirectoryError:  # a folder in the file's place is in the way of any write
            return True
        if current != expected:
            return True
        staged = self.repo.run("diff-index", "--cached", "--name-only", base, "--", path) if base else b""
        return bool(staged.strip())

    # -- step 1: a commit object ----------------------------------------------------------------

    def build(self, base: str | None, changes: Changes, *, author: Identity, text: str) -> str:
        """A commit on top of `base` with `changes`; touches no ref, no index and no file."""
        index = self._git_dir / f"switchboard-index-{secrets.token_hex(6)}"
        env = {"GIT_INDEX_FILE": str(index)}
        try:
            if base is None:
                self.repo.run("read-tree", "--empty", env=env)
            else:
                self.repo.run("read-tree", base, env=env)
            for path, data in changes.items():
                if data is None:
                    self.repo.run("update-index", "--force-remove", "--", path, env=env)
                else:
                    blob = self.repo.run("hash-object", "-w", "--stdin", data=data).decode().strip()
                    self.repo.run("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
            tree = self.repo.run("write-tree", env=env).decode().strip()
        finally:
            index.unlink(missing_ok=True)
        when = int(time.time())
        header = [f"tree {tree}"] + ([f"parent {base}"] if base else [])
        header += [f"author {author.line(when)}", f"committer {self.committer.line(when)}"]
        body = "\n".join(header) + "\n\n" + text
        return (
            self.repo.run("hash-object", "-t", "commit", "-w", "--stdin", data=body.encode()).decode().strip()
        )

    # -- step 2: the branch and the files --------------------------------------------------------

    def advance(self, ref: str, old: str | None, new: str, *, note: str = "write over HTTP") -> list[str]:
        """Move `ref` from `old` to `new` and bring the changed files and index entries along.

        Raises GitError when the branch is no longer at `old` (nothing changed then), or when a
        later step fails (everything is put back first). Returns the paths changed. `note`
        says why, in the reflog.
        """
        paths = self.changed(old, new)
        expected = self.tree.contents(old, paths)
        try:
            self._record(ref, old, new, paths)
        except OSError as exc:  # a full disk: nothing has moved
            raise GitError(f"could not record the write in {self._git_dir}: {exc}") from exc
        try:
            self._move(ref, old, new, note)
        except GitError:
            self._forget()
            raise
        edited: list[str] = []

        def untouched() -> None:
            # Local changes made since the caller checked for them (a hand edit, another
            # program): checked again at the last moment, and never written over.
            edited.extend(self.tree.edited(expected))
            if edited:
                raise GitError(f"{', '.join(edited)}: changed in the working tree meanwhile; not overwritten")

        try:
            self.tree.bring(new, paths, before=untouched)
        except (GitError, OSError) as exc:
            try:
                self.undo(ref, old, new, paths, written=not edited)  # nothing written: the branch alone
            except (GitError, OSError) as failed:
                raise GitError(
                    f"could not update the working tree ({exc}), nor put it back ({failed}); "
                    "the service finishes that when it starts again"
                ) from exc
            raise GitError(f"could not update the working tree: {exc}") from exc
        self._forget()
        return paths

    def undo(self, ref: str, old: str | None, new: str, paths: list[str], *, written: bool = True) -> None:
        """Put `ref`, the index entries and the files of `paths` back as they were at `old`; the
        branch alone when none of `new`'s files was `written` (a hand edit found first).

        Recorded as a move from `new` to `old`, so that `recover` finishes one a crash cut short.
        Raises GitError or OSError when it cannot (the record then stays, for `recover`).
        """
        paths = paths if written else []
        self._record(ref, new, old, paths, undo=True, written=written)
        self._move(ref, new, old)
        self.tree.bring(old, paths)
        self._forget()

    def _move(self, ref: str, old: str | None, new: str | None, note: str = "undo") -> None:
        zero = "0" * 40
        if new is None:
            self.repo.run("update-ref", "-d", ref, old or zero)
        else:
            self.repo.run("update-ref", "-m", f"switchboard: {note}", ref, new, old or zero)

    # -- the intent record, and recovery -------------------------------------------------------

    @property
    def _intent(self) -> Path:
        return self._git_dir / _INTENT

    def _record(
        self,
        ref: str,
        old: str | None,
        new: str | None,
        paths: list[str],
        *,
        undo: bool = False,
        written: bool = True,
    ) -> None:
        record = {"ref": ref, "old": old, "new": new, "paths": paths, "undo": undo, "written": written}
        write_atomically(self._intent, json.dumps(record).encode(), mode=0o600)

    def _forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._intent.unlink()
            fsync_path(self._git_dir)

    def recover(self) -> str | None:
        """Finish a write a crash cut short; returns what was done, or None when there was nothing."""
        try:
            intent = json.loads(self._intent.read_bytes())
            ref, old, new, paths = str(intent["ref"]), intent.get("old"), intent["new"], intent.get("paths")
            if not all(isinstance(c, str | None) for c in (old, new)) or not (
                paths is None or (isinstance(paths, list) and all(isinstance(p, str) for p in paths))
            ):
                raise TypeError("not a write record")
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            self._forget()
            return "a damaged write record was removed"
        current = self.resolve(ref)
        if paths is None:  # a record written before records listed their paths
            paths = self.changed(old, new) if new is not None and self.resolve(new) else []
        self.tree.clear_leftovers(paths)
        if current == new:
            self.tree.clear_stale_index_lock()
            self.tree.bring(new, paths)
            self._forget()
            at = f"at {new[:10]}" if new is not None else "removed"
            return f"finished a write cut short: {ref} is {at}, its files now match"
        if current == old and old is not None and intent.get("undo") is True:
            if intent.get("written") is False:
                # The undo of a write that wrote none of its files (a hand edit found first), cut
                # short before it moved the branch back: it goes back, the files as they were left.
                self._move(ref, old, new)
                self._forget()
                return f"a write refused before its files moved left {ref} at {old[:10]}; it is back"
            # An undo cut short before it moved the branch back: the write stands, whole.
            self.tree.clear_stale_index_lock()
            self.tree.bring(old, paths)
            self._forget()
            return f"an undo cut short left {ref} at {old[:10]}; its files now match"
        self._forget()
        if current == old:
            return f"a write cut short before it moved {ref} left nothing to undo"
        return f"a write record for {ref} was stale ({ref} has moved on); removed"

    # -- remotes ----------------------------------------------------------------------------------

    def abort(self) -> None:
        """Kill the pushes and fetches running now and refuse any more: the service is stopping.

        A remote that hangs keeps its git until the 60 s timeout, and a thread waiting for git
        cannot be cancelled: without this a stopping service waited for it, and was killed.
        """
        self.stopping.set()

    def push(self, remote: str, commit: str, branch: str, *, at: str | None) -> str | None:
        """Push `commit` to `branch` on `remote` if that branch is `at` there (None: if the remote
        has no such branch); None when done, else git's reason (rejected, stale...).

        A compare-and-swap (`--force-with-lease` with the commit expected), so a push never
        carries along commits of this branch that the remote lacks, and never lands on a
        remote that moved since it was last looked at. `commit` must descend from `at`: the
        lease is never used to rewrite what the remote has.
        """
        if at is not None and not self.is_ancestor(at, commit):
            return (
                f"{commit[:12]} does not descend from {at[:12]}; a push never rewrites the remote's history"
            )
        try:
            self.repo.run(
                "push",
                "--porcelain",
                "--no-verify",
                f"--force-with-lease=refs/heads/{branch}:{at or ''}",
                # A remote on this machine runs the pack program here: the stock one, never a
                # `remote.<name>.receivepack` command from the repository's config.
                "--receive-pack=git-receive-pack",
                remote,
                f"{commit}:refs/heads/{branch}",
                timeout_s=REMOTE_TIMEOUT_S,
                abort=self.stopping,
            )
        except GitError as exc:
            return str(exc)
        return None

    def fetch(self, remote: str, branch: str) -> str:
        """Fetch `branch` from `remote`; the commit it is at there.

        It lands in a ref of the service's own (`refs/switchboard/fetched/<branch>`), never in
        FETCH_HEAD, which git-sync and people's own pulls read from the same repository.
        """
        tracking = f"{FETCHED}{branch}"
        self.repo.run(
            "fetch",
            "-q",
            "--no-tags",
            "--no-write-fetch-head",
            "--upload-pack=git-upload-pack",
            remote,
            f"+refs/heads/{branch}:{tracking}",  # forced: it records what the remote has, rewritten or not
            timeout_s=REMOTE_TIMEOUT_S,
            abort=self.stopping,
        )
        commit = self.resolve(tracking)
        if commit is None:
            raise GitError(f"git fetch {remote} {branch} gave no commit")
        return commit

    def remote_branches(self, remote: str, pattern: str) -> list[str]:
        """The branches of `remote` whose names match `pattern` (`switchboard/update-gpu-*`)."""
        out = self.repo.run(
            "ls-remote",
            "--heads",
            "--upload-pack=git-upload-pack",
            remote,
            f"refs/heads/{pattern}",
            timeout_s=REMOTE_TIMEOUT_S,
            abort=self.stopping,
        )
        lines = out.decode("utf-8", "replace").splitlines()
        return [line.partition("\t")[2].removeprefix("refs/heads/") for line in lines]

    def remote_branch(self, remote: str, commit: str | None) -> str:
        """The branch of `remote` a detached checkout (git-sync's) follows: the one whose tip is
        `commit`, the remote's default branch among several or when none is; GitError when
        the remote cannot be asked."""
        out = self.repo.run(
            "ls-remote",
            "--symref",
            "--upload-pack=git-upload-pack",
            remote,
            "HEAD",
            "refs/heads/*",
            timeout_s=REMOTE_TIMEOUT_S,
            abort=self.stopping,
        )
        default, at = None, []
        for line in out.decode("utf-8", "replace").splitlines():
            left, _, name = line.partition("\t")
            if left.startswith("ref: refs/heads/") and name == "HEAD":
                default = left.removeprefix("ref: refs/heads/")
            elif name.startswith("refs/heads/") and left == commit:
                at.append(name.removeprefix("refs/heads/"))
        if len(at) == 1 or (at and default not in at):
            return sorted(at)[0]
        if default is None:
            raise GitError(f"{redact(remote)} names no default branch, and no branch is at {commit}")
        return default

    def is_ancestor(self, ancestor: str, commit: str) -> bool:
        """Whether `ancestor` is in `commit`'s history (itself included)."""
        try:
            self.repo.run("merge-base", "--is-ancestor", ancestor, commit)
        except GitError:
            return False
        return True

    def local_edits(self, old: str | None, new: str) -> list[str]:
        """What a fast-forward from `old` to `new` must not run over: tracked files changed in the
        working tree or the index, and files in the way of paths `new` adds. No filter runs."""
        out = self.repo.run(
            "status",
            "--porcelain=v1",
            "-z",
            "--untracked-files=no",
            "--ignore-submodules=all",
            env=no_filters(self.repo),
        )
        edited = {e[3:].decode("utf-8", "surrogateescape") for e in out.split(b"\0") if len(e) > 3}
        for path in self.changed(old, new):
            if (self.repo.root / path).exists() and (old is None or self.repo.read_file(old, path) is None):
                edited.add(path)  # untracked, where the new commit puts a file
        return sorted(edited)

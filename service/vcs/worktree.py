"""Bringing a commit's files into the working tree and the index, as a checkout leaves them.

The committer moves a branch with plumbing; this puts the files of the paths it changed where
a `git checkout` would (contents, modes, symlinks, removals and the folders they empty) and
updates their index entries, so that `git status` is clean after a write or a pull. Nothing
here runs a program of the repository's choosing: no hook, and no filter driver
(`no_filters`), since the process holds decrypted keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path

from service.errors import GitError
from service.files import fsync_path, write_atomically
from service.vcs.gitrepo import GitRepo

log = logging.getLogger(__name__)

_OFF = (("clean", ""), ("smudge", ""), ("process", ""), ("required", "false"))
"""A filter driver with these settings runs nothing."""

_BATCH = 256
"""Files whose contents one `git cat-file` call reads."""


class WorkTree:
    """The working tree and index of one repository, brought to a commit path by path."""

    def __init__(self, repo: GitRepo, git_dir: Path) -> None:
        self.repo = repo
        self._git_dir = git_dir

    def bring(
        self, commit: str | None, paths: list[str], *, before: Callable[[], None] | None = None
    ) -> None:
        """Each of `paths` as it is in `commit`, as a checkout leaves it; then their index entries.

        Files are written atomically with their mode (100755 executable), a symlink is made a
        symlink: anything else would leave the working tree differing from the commit, and
        every later pull would refuse to run over those "local edits". Removals go first, so a
        file can take the place of a link or of a folder the commit emptied, and a folder they
        empty goes too, as git removes it (a commit that deletes `providers.d/` whole leaves no
        folder, as after a `git pull` or a git-sync swap: the watcher asks git, which says the
        commit has none, and serves an empty configuration). Blobs are read in
        batches (one git call each, not two per file), and nothing is written through a link
        that leads out of the repository. `before` is called once git has listed the commit,
        before anything is written: what it raises leaves the tree as it was.
        """
        entries = self._entries(commit, paths)
        if before is not None:
            before()
        for path in sorted((p for p in paths if p not in entries), reverse=True):
            target = self._inside(path)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
                target.unlink()
                fsync_path(target.parent)
            self._prune(target.parent)
        wanted = [p for p in paths if p in entries and entries[p][0] != b"160000"]  # not submodules
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start : start + _BATCH]
            contents = self.repo.blobs(sorted({entries[p][1].decode() for p in batch}))
            for path in batch:
                mode, sha = entries[path]
                self._place(self._inside(path), contents[sha.decode()], mode)
        if paths:
            self._set_index(paths, entries)

    def contents(self, commit: str | None, paths: list[str]) -> dict[str, bytes | None]:
        """What each of `paths` holds in `commit` (a link: where it leads; None: nothing), to
        tell with `edited` whether the working tree still holds it."""
        entries = {p: e for p, e in self._entries(commit, paths).items() if e[0] != b"160000"}
        blobs = self.repo.blobs(sorted({e[1].decode() for e in entries.values()})) if entries else {}
        return {p: blobs[entries[p][1].decode()] if p in entries else None for p in paths}

    def edited(self, expected: Mapping[str, bytes | None]) -> list[str]:
        """Those of `expected`'s paths whose working tree file no longer holds what it gives."""
        return [path for path, data in expected.items() if _held(self.repo.root / path) != data]

    def _entries(self, commit: str | None, paths: list[str]) -> dict[str, tuple[bytes, bytes]]:
        """(mode, object id) in `commit` of those of `paths` it holds: one listing of the whole
        tree (naming thousands of paths on a command line would exceed what one may hold)."""
        if commit is None or not paths:
            return {}
        wanted = set(paths)
        found: dict[str, tuple[bytes, bytes]] = {}
        for entry in self.repo.run("ls-tree", "-r", "-z", "--full-tree", commit).split(b"\0"):
            meta, _, name = entry.partition(b"\t")
            path = name.decode("utf-8", "surrogateescape")
            if meta and path in wanted:
                mode, _, sha = meta.split()
                found[path] = (mode, sha)
        return found

    def _inside(self, path: str) -> Path:
        """The working tree path of `path`; GitError when a link on the way leads out of the repository."""
        target = self.repo.root / path
        root = self.repo.root.resolve()
        parent = target.parent.resolve()
        if parent != root and root not in parent.parents:
            raise GitError(f"{path}: a symlink on its way leads out of the repository; not written")
        return target

    def _place(self, target: Path, data: bytes, mode: bytes) -> None:
        if target.is_dir() and not target.is_symlink():
            target.rmdir()  # emptied by the removals; one that is not is an OSError, and undone
        if mode != b"120000":
            write_atomically(target, data, mode=0o755 if mode == b"100755" else 0o644)
            return
        # A symlink, replaced whole by a rename as a file is (the temporary name is one that
        # `clear_leftovers` clears after a crash).
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        temporary.symlink_to(os.fsdecode(data))
        try:
            temporary.replace(target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_path(target.parent)

    def _prune(self, folder: Path) -> None:
        """Remove `folder` and its parents while they are empty, up to the top level (as git does)."""
        root = self.repo.root.absolute()
        while folder.absolute() != root and root in folder.absolute().parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or not there): as git, leave it
                return
            folder = folder.parent

    def _set_index(self, paths: list[str], entries: Mapping[str, tuple[bytes, bytes]]) -> None:
        """The index entries of `paths` as `entries` (from `_entries`) give them (removed where none).

        Writing the index makes git re-read "racily clean" files through their clean filter
        (`.gitattributes` names one, the config defines its command): every filter the config
        defines is switched off for this one command, so none runs in this process.
        """
        removed = b"0 " + b"0" * 40
        entry = {p: b" ".join(e) for p, e in entries.items()}
        lines = [entry.get(p, removed) + b"\t" + p.encode("utf-8", "surrogateescape") for p in paths]
        data = b"\0".join(lines) + b"\0"
        self.repo.run("update-index", "-z", "--index-info", data=data, env=no_filters(self.repo))

    def clear_leftovers(self, paths: list[str]) -> None:
        """The hidden temporary files of `write_atomically` a kill left beside `paths`."""
        for path in paths:
            target = self.repo.root / path
            for leftover in target.parent.glob(f".{target.name}.*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def clear_stale_index_lock(self) -> None:
        """A git killed mid-update leaves `index.lock`; at recovery no git of ours is running."""
        lock = self._git_dir / "index.lock"
        if lock.exists():
            log.warning("removing a stale %s left by a write cut short", lock)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _held(target: Path) -> bytes | None:
    """What the working tree holds at `target`: a link's target, a file's bytes, None when
    nothing is there (or an empty folder a removal left, as git sees it)."""
    try:
        if target.is_symlink():
            return os.fsencode(target.readlink())
        return target.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except IsADirectoryError:
        return None if not any(target.iterdir()) else b"\0a folder"


def no_filters(repo: GitRepo) -> dict[str, str]:
    """Environment that switches off every filter driver the config defines (GIT_CONFIG_COUNT
    entries weigh as `-c` does, and take any name as it is)."""
    out = repo.run("config", "-z", "--get-regexp", r"^filter\.", ok=(0, 1))
    drivers = sorted({entry.split(b"\n")[0].rsplit(b".", 1)[0] for entry in out.split(b"\0") if entry})
    env: dict[str, str] = {}
    settings = [(f"{d.decode('utf-8', 'surrogateescape')}.{k}", v) for d in drivers for k, v in _OFF]
    for number, (key, value) in enumerate(settings):
        env[f"GIT_CONFIG_KEY_{number}"], env[f"GIT_CONFIG_VALUE_{number}"] = key, value
    return env | {"GIT_CONFIG_COUNT": str(len(settings))} if settings else {}

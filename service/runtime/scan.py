"""The scan: what `providers.d/` holds on disk now, each config file read whole and hashed.

The watcher scans the folder at every batch and loads only the files whose hash changed. No
file is read past the 1 MiB limit: a larger one is refused from its size and a head.

A folder reached through a symlink that is swapped whole (git-sync's `/git/current`, pointed
at a new worktree per commit) is followed: each scan reads one target, resolved once, checked
again after reading: a batch is one worktree's files, never a mix of two.

A folder that cannot be listed keeps its files' last good versions (a mount gone, a folder
deleted by hand must not take every provider away), unless it is missing and git says that is
the configuration: git removes a folder a commit empties, and a replica cloned at that commit
has none (`service.vcs.absence`, asked only while the folder is missing). At the start there
are no last good versions: a folder that is there but cannot be listed says why (`Scan.unlisted`),
and the watcher holds the first load, and readiness, back until it can be.

A file that is a symbolic link is followed only within the repository (the configuration
root, links above it resolved, as git-sync's is): one leading out of it, or into its `.git`,
is refused unread (docs/reference.md §4). Whoever may push to the repository can commit a link to any path
of the replica; git, git-sync and the pull check it out as a link, and reading it would load
another team's files or a mounted secret, whose values a refusal may quote.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.config.loader import MAX_FILE_BYTES, declared_kind, is_config_file, too_large
from service.files import leads_outside, read_limited
from service.runtime.registry import source_gone
from service.vcs.absence import absence

# The watcher's logger, as before the scan was a module of its own: what operators filter on.
log = logging.getLogger("service.runtime.watcher")

SCAN_ATTEMPTS = 5
"""How many times a scan (or a reload) is tried again when git-sync swaps the link under it."""
LINK_OUT = "a symbolic link out of the repository (or into its .git): not read"
"""Why a file leading out of the repository is refused; it names no path of the replica."""


@dataclass(frozen=True, slots=True)
class Read:
    """One file as the scan found it: its bytes and their hash, or why it could not be read."""

    data: bytes | None
    sha256: str
    error: str | None = None
    kind: str | None = None
    """For a file that could not be read whole: the kind it declares, when that can be told."""


@dataclass(frozen=True, slots=True)
class Scan:
    """One scan: the files found, named as in the folder, and where they were read."""

    files: dict[str, Read]
    source: Path | None
    """The folder read, links resolved; None when it could not be listed."""
    holder: Path | None = None
    """Set when the folder is missing and git says that is the configuration: the folder found
    holding it (resolved), and `source` is where the folder would be. There are no files."""
    unlisted: str | None = None
    """Why the folder, which is there (a folder the service may not read, a file or a link
    leading nowhere in its place), could not be listed; None when it was, or is missing."""

    @property
    def absent(self) -> bool:
        """The folder is missing, and git says that is the configuration."""
        return self.holder is not None

    def gone(self) -> bool:
        """What was read was removed since (git-sync swapped the link on): to be read again."""
        return source_gone(self.source, holder=self.holder)


class Scanner:
    """Reads the folder's config files, one target at a time, and says what it could not read."""

    def __init__(self, folder: Path, root: Path) -> None:
        self.folder = folder
        self.root = root
        self.absent = False
        """The last scan found the folder missing, and git says that is the configuration."""
        self._told: tuple[object, ...] | None = None
        """What was last logged of a folder that cannot be listed: each state is logged once."""

    def scan(self, known: Mapping[str, str | None]) -> Scan:
        """The config files of the folder the path leads to now.

        `known` holds the files loaded before, each with the kind it had: what one that cannot
        be read now is refused as. A link swapped during the scan (the old target may be deleted
        under it) is scanned again on its new target: what is applied is always one target's files.
        """
        for _ in range(SCAN_ATTEMPTS):
            target = _target(self.folder)
            scan = self._scan(target, known)
            if _target(self.folder) == target:
                break
        self.absent = scan.absent
        return scan

    def _scan(self, target: Path | None, known: Mapping[str, str | None]) -> Scan:
        """The config files of `target` (the folder, links resolved), named as in the folder."""
        found: dict[str, Read] = {}
        try:
            entries = sorted(os.scandir(target or self.folder), key=lambda e: e.name)
        except OSError as exc:
            return self._unlisted(exc, known)
        if self._told is not None:
            self._tell(None, logging.INFO, "%s can be listed again", self.folder)
        # the folder itself: a link committed in its place
        out = leads_outside(target or self.folder, self.root)
        for entry in entries:
            if not is_config_file(entry.name):
                continue
            file = self._name(self.folder / entry.name)
            path = Path(entry.path)
            try:
                if out or entry.is_symlink():
                    real = Path(os.path.realpath(path))
                    if out or leads_outside(real, self.root):  # decided before any look at the target
                        found[file] = Read(None, "link-out", LINK_OUT, known.get(file))
                        continue
                    path = real
                if not entry.is_file():  # follows symlinks; a folder or a dangling link is skipped
                    continue
                # The link's target, resolved and checked above, is opened as such: one swapped
                # for a link since fails (ELOOP) and is read again at the next scan.
                data, size = read_limited(path, MAX_FILE_BYTES, follow=False)
            except FileNotFoundError:
                continue  # deleted while we looked: the next batch sees it gone
            except OSError as exc:
                reason = f"cannot read: {exc.strerror}"
                found[file] = Read(None, f"error:{exc.errno}", reason, known.get(file))
                continue
            if size is not None:  # too large: refused from its size and a head, never read whole
                error = too_large(file, size).reason
                found[file] = Read(None, f"too-large:{size}", error, declared_kind(data))
                continue
            found[file] = Read(data, hashlib.sha256(data).hexdigest())
        return Scan(found, target)

    def _unlisted(self, exc: OSError, known: Mapping[str, str | None]) -> Scan:
        """The folder cannot be listed. Missing (git removed a folder a commit emptied), and git
        says so at the commit served: an empty folder, every file removed, as a replica started
        fresh there has it. Otherwise (deleted by hand, outside git, a mount gone, permissions)
        its files are refused and their last good versions stay: no outage for a folder that
        will be back. Each state is logged once."""
        missing = _missing(self.folder, self.root) if exc.errno == errno.ENOENT else None
        doubt = ""
        if missing is not None:
            holder, where = missing
            verdict = absence(where, sorted({Path(f).name for f in known}))
            if verdict.confirmed:
                state = ("absent", verdict.commit)
                message = "%s is not in commit %s (HEAD): no providers are served from it"
                self._tell(state, logging.INFO, message, self.folder, verdict.commit)
                return Scan({}, where, holder)
            doubt = f" ({verdict.doubt})"
        self._tell(
            ("unlisted", exc.errno, doubt),
            logging.ERROR,
            "cannot list %s: %s%s; what was loaded from it stays",
            self.folder,
            exc.strerror,
            doubt,
        )
        # A hash no content has: the files are refused (their last good versions stay)
        # and reloaded once the folder can be read again.
        refused = {f: Read(None, "unreadable-folder", "unreadable folder", kind) for f, kind in known.items()}
        there = exc.errno != errno.ENOENT or _lexists(self.folder)
        unlisted = f"cannot list {self._name(self.folder)}: {exc.strerror}" if there else None
        return Scan(refused, None, unlisted=unlisted)

    def _tell(self, state: tuple[object, ...] | None, level: int, message: str, *args: object) -> None:
        """Log `message` when the folder's `state` is new: once, not at every rescan of it."""
        if state != self._told:
            self._told = state
            log.log(level, message, *args)

    def _name(self, path: Path) -> str:
        """The file as events name it: relative to the repository root when inside it."""
        try:
            return path.absolute().relative_to(self.root.absolute()).as_posix()
        except ValueError:
            return path.absolute().as_posix()


def _target(folder: Path) -> Path | None:
    """The folder `folder` leads to now, every link resolved; None when there is none."""
    try:
        target = Path(os.path.realpath(folder, strict=True))
    except OSError:
        return None
    return target if target.is_dir() else None


def _lexists(path: Path) -> bool:
    """Whether anything is at `path`, a link leading nowhere included."""
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def listable(folder: Path) -> bool:
    """Whether `folder` can be listed now (opened as a directory; nothing is read)."""
    try:
        with os.scandir(folder):
            return True
    except OSError:
        return False


def _missing(folder: Path, root: Path) -> tuple[Path, Path] | None:
    """When nothing at all is at `folder` (not even a dangling link): the folder holding it that
    is there (resolved), and where `folder` would be under it. None when there is none.

    git removes every folder a commit empties, up to the repository's top: the folders between
    `root` and `folder` (`--providers config/providers.d`) may have gone with it. `root` itself
    (git-sync's link) and the folders above it are never looked past."""
    try:
        os.lstat(folder)
    except FileNotFoundError:
        holder = holding(folder, root)
        if holder is None:
            return None
        real = Path(os.path.realpath(holder))
        return real, real / folder.absolute().relative_to(holder.absolute())
    except OSError:
        return None
    return None


def holding(folder: Path, root: Path) -> Path | None:
    """The nearest folder holding `folder` that is there: its parent, or one between it and
    `root` (git removes every folder a commit empties); None when there is none."""
    path, top = folder.absolute(), root.absolute()
    for step in path.parents:
        if step.is_dir():
            return step
        if step == top or not step.is_relative_to(top):
            return None
    return None


def link_folders(folder: Path) -> list[Path]:
    """The folders holding a symlink on the way to `folder`: a link swapped by a rename shows
    as an event there (a watch of `folder` follows the old target and sees nothing)."""
    found: list[Path] = []
    path = folder.absolute()
    for step in (*reversed(path.parents), path):
        if step.is_symlink() and step.parent.is_dir() and step.parent not in found:
            found.append(step.parent)
    return found

"""Which commit and author a change in `providers.d/` came from, as docs/reference.md §5 records them.

`commit` is HEAD when the file's content is committed unchanged there; otherwise it is null
and the event says `uncommitted`. `author` is the author of the last commit touching the
file. Outside a git repository both are null. This runs on the reload path, never per request.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from service.config.snapshot import NO_GIT, Attribution
from service.errors import GitError
from service.files import leads_outside
from service.vcs.gitrepo import GitRepo, blob_sha

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Batch:
    """The attribution of a batch of files, and `changed`: the last commit of HEAD's first-parent
    line that touched their folder (or a file a link of it leads to), removals included; None
    outside git or before the first commit. A batch without files (an empty folder) names the
    folder's own last change, or the line's first commit when nothing ever touched it."""

    files: dict[Path, Attribution]
    changed: str | None
    order: Mapping[str, int] = field(default_factory=dict)
    """The commits of HEAD's first-parent line the walk met, newest first (0: the newest): what
    tells, without git, which of two files' `changed` commits is the later."""


class Attributor:
    """Asks git about the files of one folder; every answer is computed on demand, off the hot path."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.absolute()
        self.repo = GitRepo.find(_nearest_folder(folder))
        self._store = _object_store(self.repo)
        self._target: Path | None = None
        self._pin: str | None = None

    def follow(self, target: Path) -> None:
        """Answer for the files of `target`: the folder as read, links resolved.

        Behind a link that git-sync swaps, each commit is a new worktree with its own HEAD;
        the repository is looked up again when the target changes (two git calls), so `commit`
        is the HEAD of the worktree the files came from. A target that is not there (a worktree
        of a commit without the folder) belongs to the repository around it.
        """
        if target == self._target:
            return
        self._target = target
        self.repo = GitRepo.find(_nearest_folder(target))
        self._store = _object_store(self.repo)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[str | None]:
        """HEAD, read once; every `attribute` within answers for that commit.

        Its trees and log are read from the repository's own git directory, by commit id:
        git-sync removes a worktree as soon as it swapped the link away from it, and HEAD may
        move meanwhile, but a batch is attributed to one commit, whole (it was attributed file by
        file to whatever HEAD was, or to nothing once the worktree was gone).
        """
        self._pin = self.head()
        try:
            yield self._pin
        finally:
            self._pin = None

    def head(self) -> str | None:
        """The HEAD commit, or None outside a repository or before the first commit."""
        try:
            return self.repo.head() if self.repo else None
        except GitError as exc:
            log.warning("git: %s", exc)
            return None

    def attribute(self, files: Mapping[Path, bytes | None]) -> dict[Path, Attribution]:
        """Attribution of each file, given its current content (None: the file was removed)."""
        return self.attribute_batch(files).files

    def attribute_batch(self, files: Mapping[Path, bytes | None]) -> Batch:
        """Attribution of each file, given its current content (None: the file was removed), and
        the last commit that touched their folder (`Batch`).

        Four git calls for the whole batch, whatever its size: HEAD, the blob ids of HEAD's
        tree, one walk of the log for the last author of each file and one of its first-parent
        line for the last commit that changed each (`GitRepo.last_changes`); the two walks run
        at once (with a long history each takes longest: ~0.4 s at 20,000 commits).
        """
        if self.repo is None:
            return Batch(dict.fromkeys(files, NO_GIT), None)
        head = self._pin or self.head()
        if not files:
            return Batch({}, self._folder_changed(head))
        relative = {path: self._relative(path) for path in files}
        links = {path: link for path in files if (link := self._link(path)) is not None}
        known = sorted({r for r in relative.values() if r is not None})
        if head is None or not known:
            return Batch(dict.fromkeys(files, Attribution(None, None, True)), None)
        store = self._store or self.repo
        leading = {target for _, target in links.values() if target is not None}
        folders = sorted({str(PurePosixPath(p).parent) for p in known})
        try:
            blobs: dict[str, str] = {}
            for folder in sorted({str(PurePosixPath(p).parent) for p in (*known, *leading)}):
                blobs.update(store.blob_ids(head, folder, links=True))
            # the two walks of the log at once, each in its own git: a reload waits for the longer
            with ThreadPoolExecutor(1, thread_name_prefix="switchboard-git-authors") as other:
                walking = other.submit(store.last_authors, known, head)
                # a link's target is walked by itself: what else its folder holds is not configuration
                changes = store.last_changes(folders, sorted({*known, *leading}), head)
                authors = walking.result()
        except GitError as exc:
            log.warning("git: %s", exc)
            return Batch(dict.fromkeys(files, Attribution(None, None, True)), None)
        result = {}
        for path, data in files.items():
            rel = relative[path]
            in_head = blobs.get(rel) if rel else None
            target = None
            if path in links:  # git holds a link's target; the content read is what it leads to
                held, target = links[path]
                committed = in_head == blob_sha(held) and (
                    target is None or (data is not None and blobs.get(target) == blob_sha(data))
                )
            else:
                committed = rel is not None and (
                    (in_head is None) if data is None else (in_head == blob_sha(data))
                )
            author = authors.get(rel) if rel else None
            if committed:
                # a file HEAD holds was touched on its line; `head` only if the walk missed it
                # (a name git quotes): a later commit than the true one, never an earlier
                changed = changes.last(*(p for p in (rel, target) if p is not None)) or head
                result[path] = Attribution(head, author, False, changed)
            else:
                result[path] = Attribution(None, author, True)
        return Batch(result, changes.newest or head, {c: i for i, c in enumerate(changes.commits)})

    def _folder_changed(self, head: str | None) -> str | None:
        """Where an empty folder last changed: the last commit of HEAD's first-parent line that
        touched it (the removal of its last file), or the line's first commit when none did.

        Asked of git's log, not of the files removed: a replica that saw them go and one started
        after (a clone has no empty folder) must name the same commit, and a later commit
        elsewhere must not move it. One walk of the log; a second call only for a folder with
        no history.
        """
        folder = self._relative_folder()
        if head is None or folder is None:
            return None
        store = self._store or self.repo
        assert store is not None  # noqa: S101 - checked by the caller
        try:
            return store.last_changes([folder], [], head).newest or store.first_commit(head)
        except GitError as exc:
            log.warning("git: %s", exc)
            return None

    def _relative_folder(self) -> str | None:
        """The folder relative to the top level: the one read (a link's target) when followed."""
        assert self.repo is not None  # noqa: S101 - checked by the caller
        top = self.repo.root
        for candidate in (self._target, self.folder, self.folder.parent.resolve() / self.folder.name):
            if candidate is None:
                continue
            try:
                return candidate.relative_to(top).as_posix()
            except ValueError:
                continue
        return None

    def _link(self, path: Path) -> tuple[bytes, str | None] | None:
        """For a symbolic link: what git holds for it (its target), and the file it leads to
        relative to the top level, or None when that is out of the repository (never read)."""
        assert self.repo is not None  # noqa: S101 - checked by the caller
        try:
            if not path.is_symlink():
                return None
            held = os.fsencode(path.readlink())
        except OSError:
            return None
        top = self.repo.root
        if leads_outside(path, top):
            return held, None
        return held, Path(os.path.realpath(path)).relative_to(os.path.realpath(top)).as_posix()

    def _relative(self, path: Path) -> str | None:
        assert self.repo is not None  # noqa: S101 - checked by the caller
        top = self.repo.root
        candidates = [path.absolute(), path.absolute().parent.resolve() / path.name]
        if self._target is not None and path.absolute().parent == self.folder:
            candidates.insert(0, self._target / path.name)  # as read, even if the link moved since
        for candidate in candidates:
            try:
                return candidate.relative_to(top).as_posix()
            except ValueError:
                continue
        return None


def _nearest_folder(path: Path) -> Path:
    """`path`, or the nearest of its parents that is a folder: the one git is asked about (the
    folder itself may not exist, yet or any more)."""
    return next((p for p in (path, *path.absolute().parents) if p.is_dir()), path)


def _object_store(repo: GitRepo | None) -> GitRepo | None:
    """The git directory shared by `repo`'s worktrees (`.git`): it outlives any one of them."""
    if repo is None:
        return None
    try:
        common = repo.run("rev-parse", "--path-format=absolute", "--git-common-dir").decode().strip()
    except GitError:
        return None
    return GitRepo(Path(common))

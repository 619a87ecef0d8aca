"""Whether git says a folder missing from the working tree is meant to be missing.

git removes a folder that a commit empties: `git rm` of its last file, a pull, a checkout,
a fast-forward, all leave no `providers.d/` at such a commit, and neither has git-sync's
worktree of it. There the missing folder is the configuration, an empty one, as a replica
started fresh at that commit serves it. A folder missing otherwise (deleted by hand while the
commit still holds it, a copy half done, a folder git never held) says nothing of
the configuration. Only git tells the two apart: it is asked only while the folder is
missing, never on a reload of a folder that is there, never on a request.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from service.errors import GitError
from service.vcs.gitrepo import GitRepo


@dataclass(frozen=True, slots=True)
class Absence:
    """What git says of a folder that is not in the working tree."""

    commit: str | None
    """The commit asked: HEAD of the working tree that would hold the folder (None without one)."""
    doubt: str | None = None
    """Why git does not confirm the absence; None when it does."""

    @property
    def confirmed(self) -> bool:
        """The commit has no such folder, nor has the index, and git does not ignore it."""
        return self.doubt is None


def absence(folder: Path, names: Iterable[str] = ()) -> Absence:
    """What git says of `folder`, missing from a working tree that holds its parent, or, git
    removing every folder a commit empties, a folder above it (the caller decides how far up).

    Confirmed when that working tree's HEAD commit has no entry at `folder`'s path, its index
    none under it, a commit before it held it (git removed it: a folder no commit ever held,
    made and deleted by hand or by another tool, was not), and git ignores neither the folder
    nor the files `names` (those last read in it): a folder git does not hold (`.gitignore`d,
    filled by another tool) is never taken as removed by git. Six git calls at most; any
    failure of git is a doubt.
    """
    holder = Path(os.path.realpath(folder.parent))
    repo = None
    for place in (holder, *holder.parents):
        if not place.is_dir():
            continue
        repo = GitRepo.find(place)
        if repo is not None or place.is_dir():  # its answer, unless it went while git was asked
            break
    if repo is None:
        if shutil.which("git") is None:
            return Absence(None, "git is not installed (no `git` on PATH)")
        return Absence(None, "not in a git working tree")
    try:
        path = (holder / folder.name).relative_to(os.path.realpath(repo.root)).as_posix()
    except ValueError:
        return Absence(None, "outside the git working tree")
    head: str | None = None
    try:
        head = repo.head()
        if head is None:
            return Absence(None, "the repository has no commit yet")
        if repo.run("ls-tree", "-z", "--full-tree", head, "--", path).strip(b"\0"):
            return Absence(head, f"commit {head[:12]} (HEAD) holds it")
        if repo.run("ls-files", "-z", "--", path).strip(b"\0"):
            return Absence(head, "the git index holds files of it")
        if not repo.run("log", "-1", "--format=%H", head, "--", path).strip():
            return Absence(head, f"no commit up to {head[:12]} (HEAD) ever held it: git did not remove it")
        probes = "".join(f"{p}\0" for p in (f"{path}/", *(f"{path}/{name}" for name in names)))
        data = probes.encode("utf-8", "surrogateescape")
        if repo.run("check-ignore", "--stdin", "-z", data=data, ok=(0, 1)).strip(b"\0"):
            return Absence(head, "git ignores it: git does not hold it")
    except GitError as exc:
        return Absence(head, f"git could not tell ({exc})")
    return Absence(head)

"""Which commit and author a change in `providers.d/` came from, as SPEC 5 records them.

`commit` is HEAD when the file's content is committed unchanged there; otherwise it is null
and the event says `uncommitted`. `author` is the author of the last commit touching the
file. Outside a git repository both are null. This runs on the reload path, never per request.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_GIT_TIMEOUT_S = 10


@dataclass(frozen=True, slots=True)
class Attribution:
    """Where a file's current content came from."""

    commit: str | None
    author: str | None
    uncommitted: bool


NO_GIT = Attribution(None, None, False)


def blob_sha(data: bytes) -> str:
    """The id git gives a blob with this content (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


class Attributor:
    """Asks git about files under `root`; every answer is computed on demand, off the hot path."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._toplevel = self._git("rev-parse", "--show-toplevel")

    @property
    def in_repository(self) -> bool:
        return self._toplevel is not None

    def head(self) -> str | None:
        """The HEAD commit, or None outside a repository or before the first commit."""
        return self._git("rev-parse", "--verify", "-q", "HEAD") if self.in_repository else None

    def attribute(self, files: Mapping[Path, bytes | None]) -> dict[Path, Attribution]:
        """Attribution of each file, given its current content (None: the file was removed).

        Three git calls for the whole batch, whatever its size: HEAD, the blobs of HEAD's
        tree, and one walk of the log for the last author of each file.
        """
        if self._toplevel is None:
            return dict.fromkeys(files, NO_GIT)
        head = self.head()
        relative = {path: self._relative(path) for path in files}
        known = [r for r in relative.values() if r is not None]
        if head is None or not known:
            return dict.fromkeys(files, Attribution(None, None, True))
        blobs = self._blobs(known)
        authors = self._authors(known)
        result = {}
        for path, data in files.items():
            rel = relative[path]
            if rel is None:
                result[path] = Attribution(None, None, True)
                continue
            in_head = blobs.get(rel)
            committed = (in_head is None) if data is None else (in_head == blob_sha(data))
            author = authors.get(rel)
            result[path] = Attribution(head, author, False) if committed else Attribution(None, author, True)
        return result

    def _relative(self, path: Path) -> str | None:
        top = Path(self._toplevel or "/")
        for candidate in (path.absolute(), path.absolute().parent.resolve() / path.name):
            try:
                return candidate.relative_to(top).as_posix()
            except ValueError:
                continue
        return None

    def _blobs(self, paths: list[str]) -> dict[str, str]:
        out = self._git(
            "ls-tree", "-r", "--full-tree", "HEAD", "--", *sorted({str(Path(p).parent) for p in paths})
        )
        blobs = {}
        for line in (out or "").splitlines():
            meta, _, name = line.partition("\t")
            parts = meta.split()
            if len(parts) == 3 and parts[1] == "blob":
                blobs[name] = parts[2]
        return blobs

    def _authors(self, paths: list[str]) -> dict[str, str]:
        wanted = set(paths)
        folders = sorted({str(Path(p).parent) for p in paths})
        out = self._git("log", "--format=%x00%an <%ae>", "--name-only", "HEAD", "--", *folders)
        authors: dict[str, str] = {}
        author = ""
        for line in (out or "").splitlines():
            if line.startswith("\0"):
                author = line[1:]
            elif line in wanted and line not in authors:
                authors[line] = author
                if len(authors) == len(wanted):
                    break
        return authors

    def _git(self, *args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args],
                cwd=self.root,
                capture_output=True,
                timeout=_GIT_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        return done.stdout.decode("utf-8", "replace").strip()

"""Read-only access to the git repository that holds the configuration.

Nothing here checks anything out or writes to the repository: files of a revision are read
straight from the object store (`git ls-tree` + `git cat-file --batch`), so `plan` can compare
two revisions while the working tree stays as the user left it, and the service can tell
which commit a file came from.

    repo = GitRepo.find(Path("."))
    base = repo.merge_base("HEAD", repo.default_branch() or "HEAD")
    files = repo.read_tree(base, "providers.d")   # {"providers.d/x.yaml": b"..."}
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from service.errors import GitError
from service.vcs.git_output import failure

_TIMEOUT_S = 30.0
_ABORT_POLL_S = 0.1
"""How often a command that may be aborted looks whether it is."""

SAFE_CONFIG = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "protocol.ext.allow=never",
    "-c",
    "log.showSignature=false",
)
"""Passed to every git command the service runs: no hook, no fsmonitor, no `ext::` transport and
no signature check (`gpg.program`) can run a program of the repository's choosing in the
process that holds the keys. (The commands themselves read no working tree file through a
filter, and push and fetch name the stock pack programs.)"""

_DROPPED_PREFIXES = ("SOPS_", "SWITCHBOARD_", "GIT_AUTHOR_", "GIT_COMMITTER_", "GIT_CONFIG")
_DROPPED = frozenset({"EMAIL", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY"})


def safe_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment git runs with: no age identity or service secret, no ambient git identity
    (commits name their author and committer explicitly), and never a prompt for credentials."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k not in _DROPPED and not k.startswith(_DROPPED_PREFIXES)}
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    """Kill a git started with `start_new_session` and everything it started (ssh...)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@dataclass(frozen=True, slots=True)
class Commit:
    """A commit and its author, as `"Name <email>"`."""

    sha: str
    author: str


@dataclass(frozen=True, slots=True)
class LastChanges:
    """What one walk of the log found (`GitRepo.last_changes`): the commits met, newest first,
    as far as the oldest one needed, and for each path the index of the last that touched it."""

    commits: tuple[str, ...]
    touched: Mapping[str, int]

    @property
    def newest(self) -> str | None:
        """The last commit that touched anything walked; None when none did."""
        return self.commits[0] if self.commits else None

    def last(self, *paths: str) -> str | None:
        """The newest of the last commits that touched `paths`; None when none did."""
        found = [self.touched[p] for p in paths if p in self.touched]
        return self.commits[min(found)] if found else None


def blob_sha(data: bytes) -> str:
    """The id git gives a blob with this content (`git hash-object`), without asking git."""
    header = f"blob {len(data)}\0".encode()
    return hashlib.sha1(header + data, usedforsecurity=False).hexdigest()


class GitRepo:
    """A git work tree at `root` (its top level), read through the `git` binary."""

    def __init__(self, root: Path, *, binary: str = "git", environ: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.binary = binary
        self._env = safe_environ(environ)

    def __repr__(self) -> str:
        return f"GitRepo({str(self.root)!r})"

    @classmethod
    def find(cls, path: Path, *, binary: str = "git") -> GitRepo | None:
        """The repository whose work tree contains `path`, or None when there is none."""
        try:
            proc = subprocess.run(
                [binary, "-C", str(path), *SAFE_CONFIG, "rev-parse", "--show-toplevel"],
                capture_output=True,
                env=safe_environ(),
                timeout=_TIMEOUT_S,
                check=False,
            )
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0:
            return None
        return cls(Path(proc.stdout.decode().strip()), binary=binary)

    # -- running git ------------------------------------------------------------------------

    def run(
        self,
        *args: str,
        data: bytes | None = None,
        ok: tuple[int, ...] = (0,),
        env: Mapping[str, str] | None = None,
        timeout_s: float = _TIMEOUT_S,
        abort: threading.Event | None = None,
    ) -> bytes:
        """Run `git ARGS` at the top level; returns stdout. Raises GitError on another exit code.

        `env` adds variables to the safe environment (a temporary index file, say). git runs
        in a session of its own, without the service's terminal (so ssh cannot stop to ask for
        a passphrase or a host key on it), and a timeout kills the whole session: an ssh that
        hangs on a dead remote goes with the git that started it. So does `abort` being set
        (the service stopping): a fetch from a remote that hangs would otherwise keep its
        thread, and the process, alive until its timeout, long after the service was told to stop.
        """
        if abort is not None and abort.is_set():
            raise GitError(f"git {args[0]} was not run: the service is stopping")
        argv = [self.binary, "-C", str(self.root), *SAFE_CONFIG, *args]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env | dict(env) if env else self._env,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise GitError(f"the git binary {self.binary!r} was not found") from None
        deadline = time.monotonic() + timeout_s
        pending = data
        try:
            while True:
                wait = max(deadline - time.monotonic(), 0.0)
                try:
                    stdout, stderr = proc.communicate(
                        pending, timeout=min(wait, _ABORT_POLL_S) if abort is not None else wait
                    )
                    break
                except subprocess.TimeoutExpired:
                    pending = None  # sent already: communicate goes on from where it was
                    if abort is not None and abort.is_set():
                        _kill_session(proc)
                        raise GitError(f"git {args[0]} was stopped: the service is stopping") from None
                    if time.monotonic() >= deadline:
                        _kill_session(proc)
                        raise GitError(f"git {args[0]} did not finish within {timeout_s:g}s") from None
        except GitError:
            raise
        except BaseException:  # interrupted: leave no git behind
            _kill_session(proc)
            raise
        if proc.returncode not in ok:
            raise GitError(f"git {args[0]} failed: {failure(stderr, proc.returncode)}")
        return stdout

    # -- revisions --------------------------------------------------------------------------

    def resolve(self, rev: str) -> str:
        """The commit id `rev` names. Raises GitError for an unknown revision."""
        out = self.run("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", ok=(0, 1))
        if not out.strip():
            raise GitError(f"unknown revision {rev!r}")
        return out.decode().strip()

    def head(self) -> str | None:
        """The commit HEAD points at, or None in a repository without commits."""
        out = self.run("rev-parse", "--verify", "--quiet", "HEAD^{commit}", ok=(0, 1)).strip()
        return out.decode() if out else None

    def default_branch(self) -> str | None:
        """The branch pull requests go to: `origin/HEAD`'s target, else `main`, else `master`."""
        out = self.run("symbolic-ref", "--quiet", "--short", "refs/remotes/origin/HEAD", ok=(0, 1, 128))
        candidates = [out.decode().strip()] if out.strip() else []
        candidates += ["main", "master", "origin/main", "origin/master"]
        for name in candidates:
            if self.run("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", ok=(0, 1)).strip():
                return name
        return None

    def merge_base(self, a: str, b: str) -> str | None:
        """The best common ancestor of two revisions, or None when they share no history."""
        out = self.run("merge-base", a, b, ok=(0, 1)).strip()
        return out.decode() if out else None

    # -- contents ---------------------------------------------------------------------------

    def read_tree(self, rev: str, folder: str) -> dict[str, bytes]:
        """The files directly in `folder` (relative to the top level) at `rev`: {path: bytes}.

        Paths are POSIX and relative to the top level. Symlinks and submodules are skipped.
        """
        blobs = self.blob_ids(rev, folder)
        contents = self._cat_blobs(list(blobs.values()))
        return {path: contents[sha] for path, sha in sorted(blobs.items())}

    def blob_ids(self, rev: str, folder: str, *, links: bool = False) -> dict[str, str]:
        """The blob id of each file directly in `folder` at `rev`, without reading the contents;
        with `links`, of each symbolic link too (a blob holding its target)."""
        prefix = PurePosixPath(folder).as_posix().strip("/")
        out = self.run("ls-tree", "-z", "--full-tree", rev, "--", f"{prefix}/" if prefix else ".")
        blobs: dict[str, str] = {}
        for entry in out.split(b"\0"):
            if not entry:
                continue
            meta, _, path = entry.partition(b"\t")
            mode, kind, sha = meta.decode().split()
            if kind == "blob" and (mode in ("100644", "100755") or (links and mode == "120000")):
                blobs[path.decode("utf-8", "surrogateescape")] = sha
        return blobs

    def last_authors(self, paths: list[str], rev: str = "HEAD") -> dict[str, str]:
        """The author of the last commit touching each path, in one walk of the log."""
        wanted = set(paths)
        folders = sorted({str(PurePosixPath(p).parent) for p in paths})
        out = self.run("log", "--format=%x00%an <%ae>", "--name-only", "-z", rev, "--", *folders, ok=(0, 128))
        authors: dict[str, str] = {}
        for author, names in _walked(out):
            for name in names:
                if name in wanted and name not in authors:
                    authors[name] = author
            if len(authors) == len(wanted):
                break
        return authors

    def last_changes(self, folders: list[str], paths: list[str], rev: str = "HEAD") -> LastChanges:
        """The last commit of `rev`'s first-parent line that touched each of `paths`, and the last
        that touched anything in `folders` or `paths` (removals included), in one walk of the log.

        First parents only: a change merged from a branch is dated by its merge, a commit of the
        line a replica serves, not by the branch's own commit, which a replica that has fetched
        the branch but not yet applied the merge would take for another history.
        """
        within = {PurePosixPath(f).as_posix().strip("/") or "." for f in folders}
        # a path of a folder walked is not named again: each name a pathspec holds is matched
        # against every path of every commit (named, 50 files made a walk of 20,000 commits 3 times as long)
        spec = sorted(within | {p for p in paths if not _within(PurePosixPath(p).as_posix(), within)})
        out = self.run(
            "log",
            "--first-parent",
            "--no-renames",
            "--format=%x00%H",
            "--name-only",
            "-z",
            rev,
            "--",
            *spec,
            ok=(0, 128),
        )
        wanted = set(paths)
        order: list[str] = []
        touched: dict[str, int] = {}
        for commit, names in _walked(out):
            order.append(commit)
            for name in names:
                if name in wanted and name not in touched:
                    touched[name] = len(order) - 1
        return LastChanges(tuple(order[: max(touched.values(), default=0) + 1]), touched)

    def first_commit(self, rev: str = "HEAD") -> str | None:
        """The first commit of `rev`'s first-parent line (its root), or None without commits."""
        out = self.run("rev-list", "--first-parent", "--max-parents=0", rev, ok=(0, 128)).split()
        return out[-1].decode() if out else None

    def read_file(self, rev: str, path: str) -> bytes | None:
        """One file at `rev` (path relative to the top level), or None when it is not there."""
        out = self.run("ls-tree", "-z", "--full-tree", rev, "--", path)
        for entry in out.split(b"\0"):
            meta, _, name = entry.partition(b"\t")
            if name.decode("utf-8", "surrogateescape") == path and meta.split()[1:2] == [b"blob"]:
                sha = meta.split()[2].decode()
                return self._cat_blobs([sha])[sha]
        return None

    def blobs(self, shas: list[str]) -> dict[str, bytes]:
        """The contents of many blobs by id, in one `git cat-file --batch` call."""
        return self._cat_blobs(shas)

    def _cat_blobs(self, shas: list[str]) -> dict[str, bytes]:
        """Many blobs in one `git cat-file --batch` call."""
        if not shas:
            return {}
        out = self.run("cat-file", "--batch", data="".join(f"{s}\n" for s in shas).encode())
        found: dict[str, bytes] = {}
        pos = 0
        for _ in shas:
            end = out.index(b"\n", pos)
            sha, kind, size = out[pos:end].decode().split()
            if kind != "blob":
                raise GitError(f"object {sha} is a {kind}, not a blob")
            start = end + 1
            found[sha] = out[start : start + int(size)]
            pos = start + int(size) + 1  # the content is followed by a newline
        return found

    def last_commit(self, path: str, rev: str = "HEAD") -> Commit | None:
        """The last commit up to `rev` that touched `path`, with its author; None if none did."""
        out = self.run("log", "-1", "--format=%H%x00%an <%ae>", rev, "--", path, ok=(0, 128)).strip()
        if not out:
            return None
        sha, _, author = out.decode("utf-8", "replace").partition("\0")
        return Commit(sha, author)

    def relative(self, path: Path) -> str:
        """`path` relative to the top level, POSIX; raises GitError when it lies outside."""
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            raise GitError(f"{path} is not inside the repository at {self.root}") from None


def _walked(out: bytes) -> Iterator[tuple[str, list[str]]]:
    """Each commit of `git log --format=%x00… --name-only -z`: its header and the names it
    touched, as git holds them. With `-z` names are never quoted (without it, core.quotePath
    quotes any name with a space, a quote or a byte past ASCII, and such a file was never found).
    Every field ends in NUL; a header follows an empty field, and the first name of a commit
    starts with the newline that ends its header."""
    header: str | None = None
    names: list[str] = []
    fields = out.split(b"\0")
    for i, field in enumerate(fields):
        if i > 0 and not fields[i - 1] and field:
            if header is not None:
                yield header, names
            header, names = field.decode("utf-8", "replace"), []
        elif field and header is not None:
            names.append(field.removeprefix(b"\n").decode("utf-8", "surrogateescape"))
    if header is not None:
        yield header, names


def _within(path: str, folders: set[str]) -> bool:
    """`path` is in one of `folders` (`.` holding every path), at any depth."""
    return "." in folders or any(path == f or path.startswith(f + "/") for f in folders)

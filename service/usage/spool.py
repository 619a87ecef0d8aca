"""The spool: records on local disk until the database holds them (docs/reference.md §13).

A folder of numbered segment files (`000000000001.jsonl`…), each append-only, one record a
line. `append` writes a line to the active segment at once (a `write` into the page cache, so
a kill -9 the moment after loses nothing); `sync` fsyncs it, in groups, from the ledger's
thread. `seal` closes the active segment and opens the next, so the ledger can store the
sealed ones and `remove` each only after its batch is committed: a crash between the commit
and the removal stores the segment again, which the database's key on `id` makes harmless.

Beside each line `append` may keep what the ledger stores of it (its row), so that the lines
this process wrote are stored from memory, never read back: the ledger `take`s the active
segment's rows, stores them and marks them `stored`, and once a segment it sealed is
stored (its rows `kept` since the last take too) it is removed. The files are read only for
what memory does not hold: a previous process's segments, and a segment whose rows were
given up (`spill`: the database failed, or they grew past `MAX_ROWS`).

A segment whose records are all in the database is not deleted at once: it is renamed
`….stored` and kept `RETAIN_S`, so that what was stored since the last snapshot of spent (written
every few seconds beside the spool) is still on local disk should the process die and start again
with the database down (`retained`): the snapshot plus the spool then count it. Nothing replays
a `.stored` file; each goes `RETAIN_S` after it was stored (one a previous process left, after
this one's start).

One process owns a spool: it holds an exclusive lock on `.lock` while it runs (released by
the kernel when it dies), and a second process pointed at the same folder is refused. A line
a crash tore is set aside in `torn.txt` and reported, never silently dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.errors import SwitchboardError

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
STORED_SUFFIX = ".stored"
RETAIN_S = 20.0
"""How long a stored segment is kept: several times the period of the snapshot of spent (5 s)."""
TORN = "torn.txt"
MAX_ROWS = 200_000
"""Rows kept in memory for one segment at most; past it, the segment is read back from its file."""


class SpoolBusy(SwitchboardError):
    """Another process holds this spool: two processes must not share one."""


class Spool:
    """Segment files in `folder`; `append` is safe from any thread."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._lock_fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise SpoolBusy(
                f"the usage spool {folder} is in use by another process; "
                "give each process its own SWITCHBOARD_USAGE_SPOOL"
            ) from None
        found = sorted((n, p) for p in folder.glob(f"*{SEGMENT_SUFFIX}") if (n := _number(p)) is not None)
        kept = sorted((n, p) for p in folder.glob(f"*{STORED_SUFFIX}") if (n := _number(p)) is not None)
        self._next = max((n for n, _ in found + kept), default=0) + 1
        self._sealed = [p for _, p in found]
        """Segments to store, oldest first: a previous process's, and those sealed since."""
        started = time.monotonic()
        self._retained: deque[tuple[float, str]] = deque((started, str(p)) for _, p in kept)
        """Stored segments (`.stored`, their paths) and when they were stored, oldest first."""
        self._kept: dict[Path, list[Any]] = {}
        """Sealed segments whose rows not yet taken are in memory."""
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._active: Path | None = None
        self._size = 0
        self._synced = 0
        self._stored = 0
        """Bytes of the active segment whose records are in the database."""
        self._torn = False
        """A write to the active segment failed: it may end in a torn line (read it back)."""
        self._rows: list[Any] | None = []
        """Rows appended to the active segment since the last `take`; None: read it from its file."""
        self.keep_rows = True
        """Whether a new segment keeps its rows in memory (not while the database is down)."""
        self._open_next()

    # -- writing (any thread) --------------------------------------------------------------------

    def append(self, line: bytes, row: Any = None) -> None:
        """Write one line to the active segment, and keep `row` (what the ledger stores of it)
        beside it; OSError when it cannot (then the next line goes to a new segment, so a partial
        write stays a torn tail, never glued to a good line). Without a row the segment is read
        back from its file."""
        with self._lock:
            fd = self._fd
            if fd is None:
                raise OSError("the spool has no open segment")
            try:
                written = os.write(fd, line)
                if written < len(line):
                    view = memoryview(line)[written:]
                    while view:
                        view = view[os.write(fd, view) :]
                self._size += len(line)
            except OSError:
                self._fd, self._torn = None, True
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            rows = self._rows
            if rows is not None:
                if row is None or len(rows) >= MAX_ROWS:
                    self._rows = None
                else:
                    rows.append(row)

    @property
    def active_size(self) -> int:
        """Bytes written to the active segment (0 when none is open)."""
        return self._size

    # -- what memory holds (the ledger's thread) -------------------------------------------------

    def take(self) -> tuple[list[Any], int] | None:
        """The rows appended to the active segment since the last take, and the size of the
        segment they end at (for `stored`); None when they are not all in memory."""
        with self._lock:
            rows = self._rows
            if rows is None:
                return None
            self._rows = []
            return rows, self._size

    def stored(self, end: int) -> None:
        """The active segment's records up to `end` (a `take`'s) are in the database."""
        with self._lock:
            if end <= self._size:
                self._stored = max(self._stored, end)

    def spill(self) -> None:
        """Give up the active segment's rows in memory: it is read back from its file (after
        a failed store, the rows taken are no longer anywhere else)."""
        with self._lock:
            self._rows = None

    def kept(self, segment: Path) -> list[Any] | None:
        """The rows of a sealed segment not yet taken, when memory holds them (given once);
        None: read it from its file."""
        return self._kept.pop(segment, None)

    # -- the ledger's thread ---------------------------------------------------------------------

    def sync(self) -> None:
        """fsync what was appended since the last sync."""
        with self._lock:
            if self._fd is None or self._synced == self._size:
                return
            fd, size, active = os.dup(self._fd), self._size, self._active
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            if self._active == active:  # not sealed meanwhile
                self._synced = max(self._synced, size)

    def reopen(self) -> None:
        """Open a new active segment after a failed write closed the last one; OSError if it cannot."""
        with self._lock:
            if self._fd is not None:
                return
        self._open_next()

    def seal(self) -> None:
        """Close the active segment (fsynced) and open the next one, if it holds anything."""
        if self._size == 0 and self._fd is not None:
            return
        self._open_next()

    def sealed(self) -> list[Path]:
        """Every segment but the active one, oldest first (those of a previous process too)."""
        with self._lock:
            return list(self._sealed)

    def lines(self, segment: Path) -> Iterator[bytes]:
        """The complete lines of a segment, streamed; a torn one is set aside in `torn.txt`."""
        with segment.open("rb") as f:
            for raw in f:
                if raw.endswith(b"\n"):
                    yield raw
                elif raw.strip():
                    self.set_aside(raw, f"{segment.name}: a torn last line")

    def active_lines(self) -> list[bytes]:
        """The complete lines of the active segment so far that are not in the database."""
        with self._lock:
            active, size, stored = self._active, self._size, self._stored
        if active is None or size == stored:
            return []
        with active.open("rb") as f:
            f.seek(stored)
            data = f.read(size - stored)
        return [raw for raw in data.splitlines(keepends=True) if raw.endswith(b"\n")]

    def set_aside(self, raw: bytes, reason: str) -> None:
        """Keep a line that is not a record in `torn.txt`, with why, and report it."""
        log.warning("usage spool: set aside %s (%d bytes) in %s", reason, len(raw), self.folder / TORN)
        with (self.folder / TORN).open("ab") as f:
            f.write(f"# {reason}\n".encode() + raw.rstrip(b"\n") + b"\n")

    def remove(self, segment: Path) -> None:
        """Retire a segment whose records are all in the database (kept `RETAIN_S` as `.stored`)."""
        self._retain(segment)
        with self._lock:
            if segment in self._sealed:
                self._sealed.remove(segment)
            self._kept.pop(segment, None)

    def retained(self) -> list[bytes]:
        """The complete lines of the stored segments still kept (records in the database already)."""
        with self._lock:
            paths = [p for _, p in self._retained]
        found: list[bytes] = []
        for path in paths:
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:  # noqa: PTH123 - strings kept
                found.extend(raw for raw in f.read().splitlines(keepends=True) if raw.endswith(b"\n"))
        return found

    def expire(self) -> None:
        """Delete the stored segments kept `RETAIN_S` already."""
        cut = time.monotonic() - RETAIN_S
        while True:
            with self._lock:
                if not self._retained or self._retained[0][0] > cut:
                    return
                _, path = self._retained.popleft()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # noqa: PTH108 - once a cycle: no Path made

    def _retain(self, segment: Path) -> None:
        # Once a cycle on the ledger's thread: plain strings and one rename, no Path made.
        name = str(segment)
        kept = name.removesuffix(SEGMENT_SUFFIX) + STORED_SUFFIX
        try:
            os.rename(name, kept)  # noqa: PTH104
        except OSError:  # gone, or its folder replaced under the service: its records are stored
            return
        with self._lock:
            self._retained.append((time.monotonic(), kept))

    def close(self) -> None:
        """Close the active segment (removed when all of it is in the database) and release the folder."""
        with self._lock:
            fd, active, size, stored = self._fd, self._active, self._size, self._stored
            self._fd, self._active, self._size, self._synced, self._stored = None, None, 0, 0, 0
        if fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
        if active is not None and size == stored:
            if size:
                self._retain(active)
            else:
                with contextlib.suppress(OSError):  # its folder may be gone: nothing in it to keep
                    active.unlink(missing_ok=True)
        os.close(self._lock_fd)

    def _open_next(self) -> None:
        path = self.folder / f"{self._next:012d}{SEGMENT_SUFFIX}"
        self._next += 1
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        except FileNotFoundError:  # the folder was removed under the service: made again, and taken
            self.folder.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            os.close(self._lock_fd)  # the removed folder's
            self._lock_fd = lock_fd
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: another process took it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        _sync_folder(self.folder)  # the new file's name survives a power loss too
        done = None
        with self._lock:
            old, self._fd = self._fd, fd
            sealed, rows, stored, size, torn = self._active, self._rows, self._stored, self._size, self._torn
            self._active = path
            self._size = self._synced = self._stored = 0
            self._torn = False
            self._rows = [] if self.keep_rows else None
            if sealed is not None:
                if torn or stored < size or size == 0:
                    self._sealed.append(sealed)
                    if rows is not None and not torn:
                        self._kept[sealed] = rows
                else:  # every record in it is in the database already
                    done = sealed
        if old is not None:
            with contextlib.suppress(OSError):
                os.fsync(old)
            os.close(old)
        if done is not None:
            self._retain(done)


def adopt(folder: Path, orphan: Path) -> int:
    """Move what the spool `orphan` holds into the spool `folder`, numbered after its own (both
    held meanwhile: neither may be a running process's), and remove `orphan` once empty: its
    segments are then stored by `folder`'s process as a previous process's, and its stored ones
    retained as its own. The segments moved; 0 when a process holds either."""
    folder.mkdir(parents=True, exist_ok=True)
    locks = []
    try:
        for path in (folder, orphan):
            fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            locks.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0
        files = [p for p in (*folder.glob("*.jsonl"), *folder.glob("*.stored")) if _number(p) is not None]
        after = max((n for p in files if (n := _number(p)) is not None), default=0)
        theirs = sorted(
            (n, p)
            for p in (*orphan.glob(f"*{SEGMENT_SUFFIX}"), *orphan.glob(f"*{STORED_SUFFIX}"))
            if (n := _number(p)) is not None
        )
        moved = 0
        for _, path in theirs:
            after += 1
            suffix = STORED_SUFFIX if path.name.endswith(STORED_SUFFIX) else SEGMENT_SUFFIX
            path.rename(folder / f"{after:012d}{suffix}")
            moved += suffix == SEGMENT_SUFFIX
        _sync_folder(folder)
        (orphan / ".lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            orphan.rmdir()  # unless it holds more (`torn.txt`: lines set aside, reported)
        return moved
    finally:
        for fd in locks:
            os.close(fd)


def _number(path: Path) -> int | None:
    stem = path.name.removesuffix(SEGMENT_SUFFIX).removesuffix(STORED_SUFFIX)
    return int(stem) if stem.isdigit() else None


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The spool: records on local disk until the database holds them (docs/reference.md §13).

A folder of numbered segment files (`000000000001.jsonl`…), each append-only, one record a
line. `append` writes a line to the active segment at once (a `write` into the page cache, so
a kill -9 the moment after loses nothing); `sync` fsyncs it, in groups, from the ledger's
thread. `seal` closes the active segment and opens the next, so the ledger can store the
sealed ones and `remove` each only after its batch is committed: a crash between the commit
and the removal stores the segment again, which the database's key on `id` makes harmless.

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
from collections.abc import Iterator
from pathlib import Path

from service.errors import SwitchboardError

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
TORN = "torn.txt"


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
        numbers = [_number(p) for p in folder.glob(f"*{SEGMENT_SUFFIX}")]
        self._next = max((n for n in numbers if n is not None), default=0) + 1
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._active: Path | None = None
        self._size = 0
        self._synced = 0
        self._open_next()

    # -- writing (any thread) --------------------------------------------------------------------

    def append(self, line: bytes) -> None:
        """Write one line to the active segment; OSError when it cannot (then the next line goes
        to a new segment, so a partial write stays a torn tail, never glued to a good line)."""
        with self._lock:
            if self._fd is None:
                raise OSError("the spool has no open segment")
            try:
                view = memoryview(line)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                self._size += len(line)
            except OSError:
                fd, self._fd = self._fd, None
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise

    @property
    def active_size(self) -> int:
        """Bytes written to the active segment (0 when none is open)."""
        return self._size

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
        found = [(n, p) for p in self.folder.glob(f"*{SEGMENT_SUFFIX}") if (n := _number(p)) is not None]
        return [p for _, p in sorted(found) if p != self._active]

    def lines(self, segment: Path) -> Iterator[bytes]:
        """The complete lines of a segment, streamed; a torn one is set aside in `torn.txt`."""
        with segment.open("rb") as f:
            for raw in f:
                if raw.endswith(b"\n"):
                    yield raw
                elif raw.strip():
                    self.set_aside(raw, f"{segment.name}: a torn last line")

    def active_lines(self) -> list[bytes]:
        """The complete lines of the active segment so far."""
        with self._lock:
            active, size = self._active, self._size
        if active is None or size == 0:
            return []
        with active.open("rb") as f:
            data = f.read(size)
        return [raw for raw in data.splitlines(keepends=True) if raw.endswith(b"\n")]

    def set_aside(self, raw: bytes, reason: str) -> None:
        """Keep a line that is not a record in `torn.txt`, with why, and report it."""
        log.warning("usage spool: set aside %s (%d bytes) in %s", reason, len(raw), self.folder / TORN)
        with (self.folder / TORN).open("ab") as f:
            f.write(f"# {reason}\n".encode() + raw.rstrip(b"\n") + b"\n")

    def remove(self, segment: Path) -> None:
        """Delete a segment whose records are all in the database."""
        segment.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the active segment (removed when empty) and release the folder."""
        with self._lock:
            fd, active, size = self._fd, self._active, self._size
            self._fd, self._active, self._size, self._synced = None, None, 0, 0
        if fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
        if active is not None and size == 0:
            active.unlink(missing_ok=True)
        os.close(self._lock_fd)

    def _open_next(self) -> None:
        path = self.folder / f"{self._next:012d}{SEGMENT_SUFFIX}"
        self._next += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        _sync_folder(self.folder)  # the new file's name survives a power loss too
        with self._lock:
            old, self._fd, self._active = self._fd, fd, path
            self._size = self._synced = 0
        if old is not None:
            with contextlib.suppress(OSError):
                os.fsync(old)
            os.close(old)


def _number(path: Path) -> int | None:
    stem = path.name.removesuffix(SEGMENT_SUFFIX)
    return int(stem) if stem.isdigit() else None


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

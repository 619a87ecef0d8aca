"""Durable writes: a file is replaced whole or not at all, and the replacement survives a crash.

Every writer of configuration files goes through `write_atomically` (temp file beside the
target, fsync, rename, fsync of the folder), so the watcher, git and a power cut only ever
see the old content or the new.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

HEAD_BYTES = 64 << 10
"""How much of a file over its limit `read_limited` still reads: enough to tell what it is."""


def write_atomically(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data`; keeps the current mode unless `mode` is given (new: 0644)."""
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dot name: the watcher and editors' ignore rules skip it until the rename.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (making the entries created, renamed or removed in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_limited(path: Path, limit: int, *, follow: bool = True) -> tuple[bytes, int | None]:
    """The bytes of the regular file `path` when it holds at most `limit`: (data, None).

    A larger file is not read whole: (its first `HEAD_BYTES`, its size). The size is checked
    before reading, and the read itself stops past `limit`, so a file that grows meanwhile
    cannot make it read more. A FIFO or a device is refused (OSError) without blocking, and
    without `follow` so is a symbolic link (ELOOP).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > limit:
            return f.read(HEAD_BYTES), info.st_size
        data = f.read(limit + 1)
        if len(data) > limit:  # it grew since the stat
            return data[:HEAD_BYTES], max(os.fstat(fd).st_size, len(data))
        return data, None


def leads_outside(path: Path | str, boundary: Path) -> bool:
    """Whether `path`, every symbolic link on the way resolved, lies outside `boundary` (itself
    resolved), or inside a `.git` folder of it: where no link of a configuration folder may lead
    (another team's files, a mounted secret, the repository's own git config and credentials)."""
    real = Path(os.path.realpath(path))
    try:
        inside = real.relative_to(os.path.realpath(boundary))
    except ValueError:
        return True
    return ".git" in inside.parts

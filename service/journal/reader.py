"""Reading an event log without opening it for appending: what the commands do.

`switchboard audit` and `state` read the file while the service may be appending to it, so
nothing here takes the lock the `EventLog` holds: `iter_events` and `read_events` skip a torn
last line (an append under way, or a crash). `verify` checks the whole hash chain and names
the first bad seq, a torn last line included.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from service.errors import ChainBroken, EventLogError
from service.journal.events import EVENT, GENESIS, Event, event_hash, parse_event


def iter_events(path: Path | str) -> Iterator[Event]:
    """The events of a log, streamed from the file (a torn last line is skipped).

    For the commands, which may read while the service appends; memory stays bounded
    whatever the length of the log.
    """
    with contextlib.suppress(FileNotFoundError), _open(path) as f:
        pending: bytes | None = None
        for line in f:
            if pending is not None:
                yield _event(path, pending)
            pending = line
        if pending is not None and pending.endswith(b"\n") and is_json(pending):
            yield _event(path, pending)


def readable(path: Path | str) -> None:
    """EventLogError unless the log at `path` can be opened for reading: a command that reads it
    says so for a missing one (a wrong `--events`), where its empty answer would read as "nothing
    happened" or as an empty configuration."""
    try:
        _open(path).close()
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _open(path: Path | str) -> BinaryIO:
    """The log at `path`, opened for reading; OSError for a FIFO or a device, which would block
    the command or never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return os.fdopen(fd, "rb")


def _unreadable(path: Path | str, exc: OSError) -> EventLogError:
    return EventLogError(f"{path}: cannot read the event log: {exc.strerror}")


def _event(path: Path | str, line: bytes) -> Event:
    try:
        return parse_event(line)
    except ValueError as exc:
        message = f"{path}: the event log has invalid lines; run `switchboard audit verify`"
        raise EventLogError(message) from exc


def read_events(path: Path | str) -> list[Event]:
    """Every event of a log, without opening it for writing (a torn last line is skipped)."""
    return list(iter_events(path))


def verify(path: Path | str) -> int:
    """Check the whole chain; the number of events, or ChainBroken naming the first bad seq."""
    prev = GENESIS
    seq = 0
    try:
        with _open(path) as f:
            for seq, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    raise ChainBroken(seq, "the last line is torn (no newline at its end)")
                prev = _check_link(seq, line, prev)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    return seq


def _check_link(seq: int, line: bytes, prev: str) -> str:
    """Check one line against the hash before it; returns its own hash."""
    try:
        record = json.loads(line)
    except ValueError:
        raise ChainBroken(seq, f"line {seq} is not valid JSON") from None
    if not isinstance(record, dict):
        raise ChainBroken(seq, f"line {seq} is not a JSON object")
    if record.get("seq") != seq:
        raise ChainBroken(seq, f"expected seq {seq} on line {seq}, found {record.get('seq')!r}")
    if record.get("prev") != prev:
        raise ChainBroken(seq, "prev is not the hash of the event before it")
    try:
        intact = record.get("hash") == event_hash(record)
    except ValueError:  # NaN or Infinity: json.loads takes them, canonical JSON does not
        intact = False
    if not intact:
        raise ChainBroken(seq, "hash does not match the event's content")
    try:
        EVENT.validate_python(record)
    except ValidationError as exc:
        raise ChainBroken(seq, f"not a valid event ({exc.error_count()} errors)") from None
    return str(record["hash"])


def is_json(line: bytes) -> bool:
    """Whether `line` is whole JSON (a torn last line is not)."""
    try:
        json.loads(line)
    except ValueError:
        return False
    return True

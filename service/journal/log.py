"""The event log file: append-only, hash-chained JSON Lines, one writer at a time.

Each append is one write, flushed and fsynced; a torn last line left by a crash is set
aside on open and reported. `journal.reader` reads a log without opening it, and
checks its whole chain.

The log grows for years, so the process keeps no event in memory: an `Index` of where each
one is in the file, and the configuration the log ends with (the checkpoint the registry
starts from). Reading past events (`events_after`, `select`, `replay`) goes back to the
file, from any thread, while appends go on.

The file is the service's while it runs: one replaced, moved, removed, truncated, appended to
or edited at its end under it (`fault`) is appended to no more, and not read, until it is
whole again, so that the hash chain never forks and no answer is read from another file.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar, cast

from service.config.view import VIEW_CHANGING_TYPES, ConfigView, apply_change, empty_view
from service.errors import EventLogError
from service.files import fsync_path
from service.journal.events import EVENT_TYPES, GENESIS, BaseEvent, Event, event_hash, now, parse_event
from service.journal.index import VIEW_CHANGING_CODES, Index, type_codes
from service.journal.reader import is_json

log = logging.getLogger(__name__)

_E = TypeVar("_E", bound=BaseEvent)

OnAppend = Callable[[Event], None]

NOT_CONFIG_CHANGES = frozenset({"secret.read", "service.started"})
"""Event types that do not move `config_index` (the X-Switchboard-Index of docs/reference.md §9)."""

_NAMED_FILES = frozenset({"routing.updated", "clients.updated"})

_BLOCK = 64 << 10
"""Past events are read back from the file in blocks of about this many bytes."""


class EventLog:
    """The log file, opened for appending; one process at a time (an exclusive flock).

    Opening reads the file once, line by line: each event is checked, indexed and applied
    to the checkpoint, then dropped. A torn last line, left by a crash mid-write, is moved
    to `<path>.broken` and described in `recovered_tail`; the file is cut back to the last
    whole line. Lines that are not events in the middle of the file are not repaired:
    opening fails, and `verify` names the first bad seq. The hash chain is checked by `verify`.
    """

    def __init__(self, path: Path | str, on_append: OnAppend | None = None) -> None:
        self.path = Path(path)
        self.on_append: list[OnAppend] = [on_append] if on_append is not None else []
        """Called with each event once it is written, in the appending thread (metrics count
        events here). A callback that raises is logged and the others still run."""
        self.recovered_tail: str | None = None
        self._changed: str | None = None
        """How the file was found changed under the log the last time it was checked."""
        self._unwritable: str | None = None
        """Why the last append failed (a full disk), until one succeeds."""
        self._lock = threading.Lock()
        self._tail = b""
        """The last line, as written: the end of the file is checked against it."""
        self._index = Index()
        self._view = empty_view()
        self._last: BaseEvent | None = None
        self._config_index = 0
        self._files: dict[str, str | None] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):  # a FIFO would hang the start, read forever
            os.close(self._fd)
            raise EventLogError(f"{self.path}: the event log is not a regular file")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            raise EventLogError(f"{self.path}: another process has the event log open") from exc
        try:
            if created:
                fsync_path(self.path.parent)
            self._load()
        except BaseException:
            os.close(self._fd)
            raise

    # -- opening -----------------------------------------------------------------------------

    def _load(self) -> None:
        offset, number = 0, 0
        pending: bytes | None = None
        with self.path.open("rb") as f:
            for line in f:
                if pending is not None:
                    number += 1
                    self._take(offset, pending, number)
                    offset += len(pending)
                pending = line
        if pending is None:
            return
        if pending.endswith(b"\n") and is_json(pending):
            self._take(offset, pending, number + 1)
        else:
            self._set_aside(pending, offset, number)

    def _take(self, offset: int, line: bytes, number: int) -> None:
        try:
            event = parse_event(line)
        except ValueError as exc:
            raise EventLogError(
                f"{self.path}: line {number} is not a valid event; run `switchboard audit verify`"
            ) from exc
        self._track(offset, line, event)

    def _track(self, offset: int, line: bytes, event: BaseEvent) -> None:
        """Index `event` and bring the checkpoint and counters up to it (under the lock)."""
        self._index.add(offset, len(line), event.seq, event.ts, event.type)
        self._last, self._tail = event, line
        if event.type in VIEW_CHANGING_TYPES:
            apply_change(self._view, event.type, event.subject, event.changes)
            if event.type in _NAMED_FILES:
                self._files[event.type] = event.file
        if event.type not in NOT_CONFIG_CHANGES:
            self._config_index = event.seq

    def _set_aside(self, tail: bytes, keep: int, whole_lines: int) -> None:
        broken = self.path.with_name(self.path.name + ".broken")
        existed = broken.exists()
        with broken.open("ab") as out:
            out.write(tail if tail.endswith(b"\n") else tail + b"\n")
            out.flush()
            os.fsync(out.fileno())
        if not existed:
            fsync_path(broken.parent)
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        self.recovered_tail = (
            f"a torn last line ({len(tail)} bytes after line {whole_lines}) was moved to {broken}"
        )

    # -- appending ---------------------------------------------------------------------------

    def append(self, draft: _E) -> _E:
        """Write `draft` as the next event (seq, ts, prev, hash filled in): one write, fsynced."""
        if type(draft) not in EVENT_TYPES:  # only what `parse_event` can read back
            raise TypeError(f"not an event type of the log: {type(draft).__name__}")
        with self._lock:
            if self._fd < 0:
                raise EventLogError(f"{self.path}: the event log is closed")
            last = self._last
            ts = now() if last is None else max(now(), last.ts)  # never backwards, for replay
            update = {"seq": self.last_seq + 1, "ts": ts, "prev": self.last_hash, "hash": ""}
            event = draft.model_copy(update=update)
            data = event.model_dump(mode="json", exclude={"prev", "hash"}) | {"prev": event.prev}
            try:
                data["hash"] = event_hash(data)
                line = (json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
            except ValueError as exc:
                raise EventLogError(f"{self.path}: event is not valid JSON: {exc}") from exc
            self._check()
            offset = self._write(line)
            event = event.model_copy(update={"hash": data["hash"]})
            self._track(offset, line, event)
        for callback in list(self.on_append):
            try:
                callback(cast("Event", event))
            except Exception:  # the event is written; one listener's bug must not undo that
                log.exception("an on_append callback failed on seq %d", event.seq)
        return event

    def _write(self, line: bytes) -> int:
        """Append `line`; returns the offset it starts at."""
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)  # one write: a crash leaves at most a torn tail
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            os.fsync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            failure = f"cannot append: {exc}"
            if self._unwritable is None:
                log.error("%s: %s", self.path, failure)
            self._unwritable = failure
            raise EventLogError(f"{self.path}: {failure}") from exc
        if self._unwritable is not None:
            log.warning("%s: appends go on", self.path)
            self._unwritable = None
        return size

    # -- whether the file is still the one written ---------------------------------------------

    @property
    def fault(self) -> str | None:
        """What is wrong with the file (None: nothing), as last found: changed under the log
        (replaced, removed, truncated, written by another hand), or its last append failed."""
        return self._changed or self._unwritable

    def check(self) -> None:
        """EventLogError naming the fault when the file is not the one this log wrote, whole
        (`fault` says the same). Reads the file's end: call it off the event loop."""
        with self._lock:
            if self._fd >= 0:
                self._check()

    def _check(self) -> None:
        """`check`, under the lock, with the file open."""
        fault = self._trouble()
        if fault != self._changed:
            if fault is not None:
                log.error("%s: %s; nothing is appended to it until it is whole again", self.path, fault)
            else:
                log.warning("%s: the event log is whole again; appends go on", self.path)
            self._changed = fault
        if fault is not None:
            raise EventLogError(f"{self.path}: {fault}; nothing is appended to it (restore it, or restart)")

    def _trouble(self) -> str | None:
        try:
            there = self.path.stat()
        except OSError as exc:
            return f"the event log was removed or moved away under the service ({exc.strerror})"
        mine = os.fstat(self._fd)
        if (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
            return "the event log was replaced by another file under the service"
        end = self._index.end
        if mine.st_size < end:
            return f"the event log was truncated under the service ({mine.st_size} of {end} bytes left)"
        if mine.st_size > end:
            extra = mine.st_size - end
            return f"the event log was written to by another hand ({extra} bytes after the last event)"
        tail = self._tail
        if tail and os.pread(self._fd, len(tail), end - len(tail)) != tail:
            return "the event log's last line was changed under the service"
        return None

    # -- where the log stands ----------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The seq of the last event, 0 for an empty log."""
        return self._last.seq if self._last is not None else 0

    @property
    def last_hash(self) -> str:
        """The hash of the last event, `GENESIS` for an empty log."""
        return self._last.hash if self._last is not None else GENESIS

    @property
    def config_index(self) -> int:
        """The seq of the last event but `secret.read` and `service.started` (0: none).

        The `X-Switchboard-Index` of docs/reference.md §9: it moves on every configuration and health change,
        and, read back from the file on open, never goes back across restarts.
        """
        return self._config_index

    def checkpoint(self) -> ConfigView:
        """The configuration the log ends with (masked), as a replay of every event gives it.

        Kept up to date on every append; a copy, so the caller may keep or change it.
        """
        with self._lock:
            return copy.deepcopy(self._view)

    def last_file_of(self, event_type: str) -> str | None:
        """The file the last `routing.updated` / `clients.updated` event named (None: none yet)."""
        with self._lock:
            return self._files.get(event_type)

    # -- reading past events back from the file ------------------------------------------------

    def events_after(self, seq: int = 0, limit: int | None = None) -> Iterator[Event]:
        """The events whose seq is above `seq`, in order, read from the file (at most `limit`).

        Safe from any thread while appends go on: it reads through its own file handle and
        ends with the last event appended before it reaches the end. A reader that must miss
        nothing (an event stream) registers in `on_append` first, then reads, and skips the
        seqs it has seen.
        """
        with self._lock:
            start = self._index.after_seq(seq)
            stop = None if limit is None else start + limit
        for _, line in self._lines(start, stop):
            yield self._parse(line)

    def events(self) -> list[Event]:
        """Every event, oldest first, read from the file. For small logs and tests:
        `events_after` streams instead of holding them all."""
        return list(self.events_after(0))

    def replay(self, at: datetime | None = None) -> tuple[int, ConfigView]:
        """The configuration (masked) as it stood at `at` (default: now), rebuilt from the file.

        Returns the seq of the last event at or before `at` (0 when none) and the view. Only
        the lines of events that change the configuration are parsed. It reads the file:
        call it off the event loop.
        """
        with self._lock:
            stop = len(self._index) if at is None else self._index.until(at)
            seq = self._index.seqs[stop - 1] if stop else 0
        view = empty_view()
        types = self._index.types
        for position, line in self._lines(0, stop):
            if types[position] in VIEW_CHANGING_CODES:
                record = json.loads(line)
                apply_change(view, record["type"], record.get("subject"), record.get("changes") or {})
        return seq, view

    def select(
        self,
        subject: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events matching every filter given, oldest first; `limit` keeps the most recent ones.

        As `service.journal.replay.filter_events`, read from the file: time and type narrow
        the lines with the index, and only the lines kept are parsed. Call it off the loop.
        """
        if limit is not None and limit <= 0:
            return []
        codes = type_codes(type) if type is not None else None
        with self._lock:
            start = self._index.since(since) if since is not None else 0
            stop = self._index.until(until) if until is not None else len(self._index)
        types = self._index.types
        kept: deque[bytes] = deque(maxlen=limit)
        for position, line in self._lines(start, stop):
            if codes is not None and types[position] not in codes:
                continue
            if subject is not None and json.loads(line).get("subject") != subject:
                continue
            kept.append(line)
        return [self._parse(line) for line in kept]

    def _lines(self, start: int, stop: int | None) -> Iterator[tuple[int, bytes]]:
        """(position, line) of the events from `start` to `stop` (None: to the end, as it grows)."""
        index = self._index
        with self._reader() as fd:
            position = start
            while True:
                with self._lock:
                    end = len(index) if stop is None else min(stop, len(index))
                    if position >= end:
                        return
                    last, first, after = index.block(position, end, _BLOCK)
                    offsets = index.offsets[position:last]
                data = self._read_at(fd, first, after - first)
                bounds = [*offsets, after]
                for i in range(len(offsets)):
                    yield position + i, data[bounds[i] - first : bounds[i + 1] - first]
                position = last

    @contextlib.contextmanager
    def _reader(self) -> Iterator[int]:
        """A descriptor of the file to read past events from: the one appended to (checked
        first, so an answer is never read from another file), or once closed the path's."""
        with self._lock:
            if self._fd >= 0:
                self._check()
                fd = os.dup(self._fd)
            else:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except OSError as exc:
                    raise EventLogError(f"{self.path}: cannot read the event log: {exc.strerror}") from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def _read_at(self, fd: int, offset: int, size: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise EventLogError(f"{self.path}: the event log was truncated under the service")
        return data

    def _parse(self, line: bytes) -> Event:
        try:
            return parse_event(line)
        except ValueError:
            raise EventLogError(
                f"{self.path}: a line changed since it was written; run `switchboard audit verify`"
            ) from None

    # -- closing -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether `close` was called: appending is then an error (reading still works)."""
        return self._fd < 0

    def close(self) -> None:
        """Release the file; appending afterwards is an error."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

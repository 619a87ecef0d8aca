"""The event log file: append-only, hash-chained JSON Lines, one writer at a time.

Each append is one write, flushed and fsynced; a torn last line left by a crash is set
aside on open and reported. `verify` checks the whole chain and names the first bad seq.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from pydantic import ValidationError

from service.errors import ChainBroken, EventLogError
from service.files import fsync_path
from service.journal.events import EVENT, EVENT_TYPES, GENESIS, BaseEvent, Event, event_hash, now, parse_event

_E = TypeVar("_E", bound=BaseEvent)


class EventLog:
    """The log file, opened for appending; one process at a time (an exclusive flock).

    Opening reads every event. A torn last line, left by a crash mid-write, is moved to
    `<path>.broken` and described in `recovered_tail`; the file is cut back to the last
    whole line. Lines that do not parse in the middle of the file are not repaired: opening
    fails, and `verify` names the first bad seq. The hash chain itself is checked by `verify`.
    """

    def __init__(self, path: Path | str, on_append: Callable[[BaseEvent], None] | None = None) -> None:
        self.path = Path(path)
        self.on_append = on_append
        """Called after each append (metrics count events by type here)."""
        self.recovered_tail: str | None = None
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            raise EventLogError(f"{self.path}: another process has the event log open") from exc
        try:
            if created:
                fsync_path(self.path.parent)
            self._events = self._load()
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> list[Event]:
        data = self.path.read_bytes()
        lines, tail = _split(data)
        if tail is not None:
            self._set_aside(tail, len(data) - len(tail), len(lines))
        events: list[Event] = []
        for number, line in enumerate(lines, start=1):
            try:
                events.append(parse_event(line))
            except ValueError as exc:
                raise EventLogError(
                    f"{self.path}: line {number} is not a valid event; run `switchboard audit verify`"
                ) from exc
        return events

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

    def append(self, draft: _E) -> _E:
        """Write `draft` as the next event (seq, ts, prev, hash filled in): one write, fsynced."""
        if type(draft) not in EVENT_TYPES:  # only what `parse_event` can read back
            raise TypeError(f"not an event type of the log: {type(draft).__name__}")
        with self._lock:
            if self._fd < 0:
                raise EventLogError(f"{self.path}: the event log is closed")
            last = self._events[-1] if self._events else None
            ts = now() if last is None else max(now(), last.ts)  # never backwards, for replay
            update = {"seq": self.last_seq + 1, "ts": ts, "prev": self.last_hash, "hash": ""}
            event = draft.model_copy(update=update)
            data = event.model_dump(mode="json", exclude={"prev", "hash"}) | {"prev": event.prev}
            try:
                data["hash"] = event_hash(data)
                line = (json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
            except ValueError as exc:
                raise EventLogError(f"{self.path}: event is not valid JSON: {exc}") from exc
            self._write(line)
            event = event.model_copy(update={"hash": data["hash"]})
            self._events.append(cast("Event", event))
        if self.on_append is not None:
            self.on_append(event)
        return event

    def _write(self, line: bytes) -> None:
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)  # one write: a crash leaves at most a torn tail
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            os.fsync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise EventLogError(f"{self.path}: cannot append: {exc}") from exc

    def events(self) -> list[Event]:
        """Every event in the log, oldest first (a copy of the list; the events are frozen)."""
        with self._lock:
            return list(self._events)

    @property
    def last_seq(self) -> int:
        """The seq of the last event, 0 for an empty log."""
        return self._events[-1].seq if self._events else 0

    @property
    def last_hash(self) -> str:
        """The hash of the last event, `GENESIS` for an empty log."""
        return self._events[-1].hash if self._events else GENESIS

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


def read_events(path: Path | str) -> list[Event]:
    """The events of a log without opening it for writing (a torn last line is skipped)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    lines, _ = _split(data)
    try:
        return [parse_event(line) for line in lines]
    except ValueError as exc:
        message = f"{path}: the event log has invalid lines; run `switchboard audit verify`"
        raise EventLogError(message) from exc


def verify(path: Path | str) -> int:
    """Check the whole chain; the number of events, or ChainBroken naming the first bad seq."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EventLogError(f"{path}: cannot read the event log: {exc.strerror}") from exc
    prev = GENESIS
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    for seq, line in enumerate(raw_lines, start=1):
        if seq == len(raw_lines) and not data.endswith(b"\n"):
            raise ChainBroken(seq, "the last line is torn (no newline at its end)")
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
        prev = record["hash"]
    return len(raw_lines)


def _split(data: bytes) -> tuple[list[bytes], bytes | None]:
    """Whole lines, and a torn tail: bytes after the last newline, or a last line that is not JSON."""
    *lines, rest = data.split(b"\n")
    if rest:
        return lines, rest
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            torn = lines.pop()
            return lines, torn + b"\n"
    return lines, None

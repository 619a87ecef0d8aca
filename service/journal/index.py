"""Where each event of the log is: its offset in the file, its seq, time and type, no more.

The service keeps the index, not the events: 25 bytes an event (100,000 events: 2.5 MB),
so the log can grow for years. Reading an event goes back to the file at its offset.
Times are microseconds since the epoch, kept non-decreasing (an event written with a
clock that went back counts at the time of the one before it, as `append` writes it), so
"the events up to a time" is a prefix found by bisection.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from datetime import UTC, datetime, timedelta

from service.config.view import VIEW_CHANGING_TYPES
from service.journal.events import EVENT_TYPES, to_utc

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

TYPE_NAMES: tuple[str, ...] = tuple(sorted(str(t.model_fields["type"].default) for t in EVENT_TYPES))
"""Every event type, by its code: the code of a type is its position here."""
_CODES = {name: code for code, name in enumerate(TYPE_NAMES)}
VIEW_CHANGING_CODES = frozenset(_CODES[name] for name in VIEW_CHANGING_TYPES)


def micros(value: datetime) -> int:
    """`value` as whole microseconds since the epoch (exact, unlike a float timestamp)."""
    return (to_utc(value) - _EPOCH) // _MICROSECOND


def type_code(name: str) -> int:
    """The code of an event type."""
    return _CODES[name]


def type_codes(wanted: str) -> frozenset[int]:
    """The codes of a type (`provider.updated`) or of a family (`provider`); empty when none."""
    return frozenset(c for n, c in _CODES.items() if n == wanted or n.startswith(wanted + "."))


class Index:
    """The position of every event in the log file, in order. Not locked: its owner locks."""

    __slots__ = ("end", "offsets", "seqs", "times", "types")

    def __init__(self) -> None:
        self.offsets = array("q")
        """Where each event's line starts in the file."""
        self.seqs = array("q")
        self.times = array("q")
        """Microseconds since the epoch, non-decreasing."""
        self.types = bytearray()
        self.end = 0
        """Where the last whole line ends: the file's length."""

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, offset: int, length: int, seq: int, ts: datetime, event_type: str) -> None:
        """Record the event whose line of `length` bytes starts at `offset`."""
        when = micros(ts)
        if self.times and when < self.times[-1]:
            when = self.times[-1]
        self.offsets.append(offset)
        self.seqs.append(seq)
        self.times.append(when)
        self.types.append(_CODES[event_type])
        self.end = offset + length

    def after_seq(self, seq: int) -> int:
        """The position of the first event whose seq is above `seq`."""
        return bisect_right(self.seqs, seq)

    def until(self, at: datetime) -> int:
        """How many events were written at or before `at` (the position just after them)."""
        return bisect_right(self.times, micros(at))

    def since(self, at: datetime) -> int:
        """The position of the first event written at or after `at`."""
        return bisect_left(self.times, micros(at))

    def block(self, start: int, stop: int, size: int) -> tuple[int, int, int]:
        """From position `start`, the events (at least one) whose lines fit in about `size` bytes.

        Returns (the position after the last of them, the first byte, the byte after the last).
        """
        offsets = self.offsets
        first = offsets[start]
        last = bisect_right(offsets, first + size, start + 1, stop)
        return last, first, offsets[last] if last < len(offsets) else self.end

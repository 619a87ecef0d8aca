"""What goes wrong on the lean upstream client's way (`exchange`, `response` and `wire`).

`str()` of each is a reason fit for an attempt list:

    WireError
    ├── BrokenOff         the answer broken off, or no HTTP/1.1 answer
    ├── Disconnected      the connection closed before the answer's head was whole
    ├── Unsendable        (wire) a request that cannot be written as it stands
    ├── Unreachable       (wire) no connection
    └── ConnectTimeout    (wire) no connection in time; a `TimeoutError` too
    TooLarge              the answer is over the limit of what is read (no `WireError`)
"""

from __future__ import annotations


class TooLarge(Exception):
    """An upstream's answer is over the limit of what is read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer over {limit} bytes")
        self.limit = limit


class WireError(Exception):
    """What went wrong on the way; `str()` is a reason fit for an attempt list."""


class Disconnected(WireError):
    """The upstream closed the connection before the answer's head was whole."""

    def __init__(self) -> None:
        super().__init__("the upstream closed the connection")


class BrokenOff(WireError):
    """The upstream broke off its answer, or sent what is no HTTP/1.1 answer."""

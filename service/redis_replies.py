"""Redis replies bounded before they are read: redis-py's RESP parser, refusing a reply larger
than the caller ever gets (`bounded`).

As it stands, redis-py's parser buffers whatever length a reply announces: a server (or whoever
answers at that address) that sends `$1500000000` and streams made a process hold 5 GB within
the seconds before a timeout, `*100000000` built a list of as many items. Each length is checked
as its header is read, before anything of it is: a reply over the bounds raises
`InvalidResponse`, which the callers take as they take any garbage (the fan-out's session ends,
the limits fall back).
"""

from __future__ import annotations

from typing import TypeVar

from redis._parsers import _AsyncRESP2Parser, _AsyncRESP3Parser
from redis.exceptions import InvalidResponse

P = TypeVar("P", _AsyncRESP2Parser, _AsyncRESP3Parser)

_STRINGS = (b"$", b"=", b"!")
"""Headers of a string: bulk, verbatim, bulk error (the last two RESP3's only)."""
_AGGREGATES = (b"*", b"%", b"~", b">", b"|")
"""Headers of an aggregate: array, and RESP3's map, set, push and attributes."""


def bounded(parser: type[P], max_reply: int, max_items: int) -> type[P]:
    """`parser` (redis-py's RESP2 or RESP3 one), refusing a string longer than `max_reply` or an
    aggregate of more than `max_items` items, from its header."""

    class Bounded(parser):  # type: ignore[valid-type,misc]
        async def _readline(self) -> bytes:
            line: bytes = await super()._readline()
            kind = line[:1]
            if kind in _STRINGS or kind in _AGGREGATES:
                try:
                    size = int(line[1:])
                except ValueError:
                    return line  # the parser refuses it itself
                if size > (max_reply if kind in _STRINGS else max_items):
                    raise InvalidResponse(
                        f"a reply of {size} (header {kind!r}) is larger than Redis sends here"
                    )
            return line

    Bounded.__name__ = Bounded.__qualname__ = f"Bounded{parser.__name__}"
    return Bounded

"""A usage record's values made safe for any database (`service.usage.encoding` writes them so):
text without NUL characters or lone surrogates, cut to 256 characters (and 512 bytes); counts
whole numbers within 64 bits; times as microseconds since 1970 UTC; money a finite decimal
between 0 and a million dollars, written once as plain digits, stored as whole pico-dollars."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from service.usage.record import ATTO_PER_USD, amount_text, money

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
TEXT_LIMIT = 256
MAX_COUNT = 2**62
MAX_COST = Decimal(1_000_000)
"""More than any one request costs: a larger cost is an upstream's absurd usage, held to this."""
MAX_COST_ATTO = 1_000_000 * ATTO_PER_USD


def pico(amount: Decimal) -> int:
    """USD as whole pico-dollars (10⁻¹² USD), as the database stores money."""
    return int((amount * _PICO).to_integral_value(ROUND_HALF_EVEN))


def pico_text(text: str | Decimal | float) -> int:
    """A line's cost text as `pico` makes it whole pico-dollars (half to even): plain digits of
    12 decimals at most, as `fields` writes nearly every cost, in whole numbers; any other form
    (finer than a pico-dollar, an older line's `7.5E-7`, or a number where a line written by
    hand has no text: `decode_values` takes it) through `Decimal`."""
    if type(text) is str:
        whole, _, fraction = text.partition(".")
        if (
            len(fraction) <= 12
            and text.isascii()
            and whole.isdigit()
            and (fraction.isdigit() or not fraction)
        ):
            return int(whole + fraction.ljust(12, "0"))
    return pico(Decimal(text))


_PICO = Decimal(10) ** 12


def micros(ts: datetime) -> int:
    """Microseconds since 1970 UTC (a naive time is taken as UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def text(value: object, limit: int = TEXT_LIMIT) -> str | None:
    """A string any database stores: no NUL, valid UTF-8, at most `limit` characters and
    `2 * limit` bytes of UTF-8 (cut between characters), so that the keys a record makes stay
    within what an index holds: PostgreSQL refuses a B-tree entry past 2,704 bytes, and a
    rollup's key holds four names."""
    if value is None:
        return None
    if type(value) is str and len(value) <= limit and value.isascii() and "\x00" not in value:
        return value  # the common case, as it is: every record has several
    data = str(value)[:limit].replace("\x00", "").encode("utf-8", "replace")
    if len(data) > 2 * limit:  # characters of 3 or 4 bytes: cut, a partial one dropped
        return data[: 2 * limit].decode("utf-8", "ignore")
    return data.decode("utf-8")


def cost_text(value: object) -> str:
    """A cost within bounds (`cost`) as the line writes it: plain digits (`amount_text`); an
    `int` is atto-dollars, held to `MAX_COST` in whole numbers."""
    if type(value) is int:
        return amount_text(max(0, min(value, MAX_COST_ATTO)))
    return money(cost(value))


def cost(value: object) -> Decimal:
    """Money within bounds: finite, at least 0, at most `MAX_COST`."""
    if type(value) is Decimal and value.is_finite() and not value.is_signed() and value <= MAX_COST:
        return value  # the common case, as it is: a price's product
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return Decimal(0)
    if not amount.is_finite() or amount < 0:
        return Decimal(0)
    return min(amount, MAX_COST)


def count(value: object, limit: int = MAX_COUNT) -> int:
    """`value` as a whole number from 0 to `limit` (clamped), 0 when it is none."""
    try:
        number: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(0, min(number, limit))

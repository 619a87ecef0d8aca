"""Money as the counters hold it: whole nano-dollars (10**-9 USD), exact integers.

Costs are exact `Amount`s everywhere else (whole atto-dollars, or `Decimal` USD); counters
(in this process and in Redis, whose scripts compute in doubles) hold integers. A reservation
or a charge is rounded up to the next nano-dollar and a budget down, so that what is counted
is never less than what was spent, and a budget is never taken as larger than written.
Budgets above `MAX_UNITS` (billions of dollars) are held at it: beyond what any counter needs
to tell apart.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

from service.usage.record import ATTO_PER_USD, Amount, amount_text

UNIT = Decimal("1e-9")
PER_USD = 10**9
ATTO_PER_UNIT = ATTO_PER_USD // PER_USD
MAX_UNITS = 2**62
_CONTEXT = decimal.Context(prec=80)


def amount_units(amount: Amount) -> int:
    """An `Amount` in nano-dollars, rounded up as `charge_units` rounds (whole numbers alone
    for atto-dollars)."""
    if isinstance(amount, Decimal):
        return charge_units(amount)
    if amount <= 0:
        return 0
    return min(-(-amount // ATTO_PER_UNIT), MAX_UNITS)


def charge_units(usd: Decimal) -> int:
    """`usd` in nano-dollars, rounded up (what a cost or a reservation counts)."""
    found = _CHARGES.get(usd)  # a request's bound, and many a cost, are those of the last ones
    if found is not None:
        return found
    if usd <= 0:
        return 0
    units = _CONTEXT.multiply(usd, PER_USD).to_integral_value(rounding=decimal.ROUND_CEILING)
    value = min(int(units), MAX_UNITS)
    if len(_CHARGES) >= _REMEMBERED:
        _CHARGES.clear()
    _CHARGES[usd] = value
    return value


_CHARGES: dict[Decimal, int] = {}
"""Amounts charged lately, and their nano-dollars (equal decimals have one value, whatever their
exponent: `Decimal("0.10") == Decimal("0.1")`, one hash)."""
_REMEMBERED = 4096


def limit_units(usd: Decimal) -> int:
    """A budget of `usd` in nano-dollars, rounded down."""
    value = _CONTEXT.multiply(usd, PER_USD).to_integral_value(rounding=decimal.ROUND_FLOOR)
    return max(0, min(int(value), MAX_UNITS))


def usd(units: int) -> Decimal:
    """Nano-dollars as an exact amount of USD."""
    return _CONTEXT.divide(Decimal(units), PER_USD)


def usd_text(units: int) -> str:
    """Nano-dollars as `record.money` writes their USD (`"0.000001234"`, `"5"`), in whole-number
    arithmetic: a remaining-* header on every answer makes no `Decimal`."""
    return amount_text(units * ATTO_PER_UNIT)

"""What the files declare about money and limits (docs/reference.md §13): prices, budgets and client limits.

Amounts are `Decimal`s, read from YAML numbers or strings through their decimal text (never
through a binary float's value), so `0.15` is exactly fifteen cents per million tokens.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

MAX_USD = Decimal(10) ** 12
"""No price or budget is larger: a typo of many zeros is refused rather than trusted."""
MAX_DECIMALS = 12
MAX_COUNT = 10**12
"""No limit is larger; a limit is a positive whole number of requests or tokens."""


def _to_usd(value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError("must be an amount in USD, a number or a string of digits")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError('must be an amount in USD, such as 0.15 or "50"') from None
    if not amount.is_finite() or amount < 0:
        raise ValueError("must be a finite amount of 0 or more")
    if amount > MAX_USD:
        raise ValueError(f"must be at most {MAX_USD:,} USD")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_DECIMALS:
        raise ValueError(f"must have at most {MAX_DECIMALS} decimal places")
    return amount


def usd_text(amount: Decimal) -> str:
    """`amount` as decimal digits, never in exponent notation: `str(Decimal("1e3"))` is `1E+3`,
    which no reader of the JSON Schema below (nor the console's exact arithmetic) takes for an
    amount. As written otherwise (`100.000` stays `100.000`); no negative zero."""
    text = format(amount, "f")
    return text.removeprefix("-") if amount.is_zero() else text


Usd = Annotated[
    Decimal,
    BeforeValidator(_to_usd),
    PlainSerializer(usd_text, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": int(MAX_USD)},
                {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*$"},
            ],
            "description": "An amount in USD, exact: a number or a string of decimal digits.",
        }
    ),
]
"""An exact amount of US dollars."""

Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Period = Literal["day", "week", "month", "total"]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Price(_Part):
    """One model's prices, USD per million tokens of each class; a class left out is not priced
    here (litellm's map may price it, else cached input costs as input and cache writes are
    unpriced; `"*"` prices only models without an entry of their own)."""

    input: Usd | None = Field(None, description="Input tokens neither read from nor written to a cache.")
    output: Usd | None = Field(None, description="Completion tokens, reasoning tokens included.")
    cached_input: Usd | None = Field(None, description="Input tokens read from the provider's cache.")
    cache_write: Usd | None = Field(None, description="Input tokens written to the provider's cache.")


class Budget(_Part):
    """A spending cap for one period (UTC; weeks start on Monday)."""

    usd: Usd = Field(description="The most that may be spent in one period, in USD.")
    period: Period = Field(description="day | week | month | total (never resets).")


class Limits(_Part):
    """A client's limits: each is optional, and absent means unlimited."""

    rpm: Count | None = Field(None, description="Requests in any 60 s.")
    tpm: Count | None = Field(None, description="Prompt and completion tokens in any 60 s.")
    max_parallel: Count | None = Field(None, description="Requests in flight at once.")
    budget: Budget | None = Field(None, description="The client's spending cap.")


Pricing = dict[str, Price]
"""Model (as clients name it, or `"*"` for every other model) -> its prices."""

"""One request's usage: normalised token counts, and the ledger's record of the request.

These two value types are the interface between the parts of metering: the gateway fills a
`Record` when it answers, pricing turns `Tokens` into money, the ledger stores the record, and
the limits settle a reservation to its `cost_usd`. Money is never a float: a record's is a
`Decimal` (USD); on the request path it is an `Amount`, whole atto-dollars as pricing works
them out (or, for the few prices finer than that, a `Decimal` of USD).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, Protocol, TypeAlias

ATTO_PER_USD = 10**18
Amount: TypeAlias = int | Decimal
"""Money on the request path: an `int` is whole atto-dollars (10⁻¹⁸ USD), a `Decimal` is USD."""


class Tokens(NamedTuple):
    """A request's tokens, normalised so that each token is counted in one class only (docs/reference.md §13).

    `input` excludes cached and cache-write tokens; `output` includes `reasoning` (as OpenAI
    counts them), which is kept apart only to be reported. A tuple: one is made for each answer.
    """

    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def prompt(self) -> int:
        """Every input token: plain, cached and cache writes (a record's `prompt_tokens`)."""
        return self.input + self.cached_input + self.cache_write

    @property
    def total(self) -> int:
        """Prompt and completion tokens: what a `tpm` limit counts."""
        return self.input + self.cached_input + self.cache_write + self.output


@dataclass(frozen=True, slots=True)
class Record:
    """The ledger's record of one answered request (docs/reference.md §13): no prompt, no completion, no key,
    no token. `id` is the answer's `x-request-id`."""

    id: str
    ts: datetime
    client: str | None
    purpose: str
    model: str | None
    provider: str | None
    upstream_model: str | None
    status: int
    stream: bool
    attempts: int
    latency_ms: float
    ttfb_ms: float | None
    prompt_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal
    priced: bool
    estimated: bool
    replica: str
    limited: bool = False
    """Refused by a limit: a 429 always is; set it for a `refuse`-mode 503 too (reference §13 counts it
    as `limited`, not as an error). Not part of the record's JSON."""

    def to_json(self) -> dict[str, Any]:
        """The record as JSON (docs/reference.md §13): `ts` ISO 8601 UTC with `Z`, `cost_usd` a
        decimal string."""
        data = asdict(self)
        del data["limited"]
        data["ts"] = self.ts.isoformat().replace("+00:00", "Z")
        data["cost_usd"] = money(self.cost_usd)
        return data


def amount_text(amount: Amount) -> str:
    """`amount` as a decimal string of USD (`money`'s text): `"0.00000075"` for 750 giga-atto,
    plain digits, no exponent, no trailing zero. An `int` (atto-dollars) is written from its
    digits alone: no `Decimal` is made."""
    if isinstance(amount, Decimal):
        return money(amount)
    if amount < 0:
        return "-" + amount_text(-amount)
    digits = str(amount)
    if len(digits) <= 18:  # below a dollar
        return "0." + digits.rjust(18, "0").rstrip("0") if amount else "0"
    whole, fraction = digits[:-18], digits[-18:].rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole


def to_usd(amount: Amount) -> Decimal:
    """`amount` as exact USD."""
    if isinstance(amount, Decimal):
        return amount
    return Decimal(f"{amount}E-18")  # read, not computed: exact at any size


def money(amount: Decimal) -> str:
    """A decimal string of USD, never in exponent notation (`"0.00000015"`, not `"1.5E-7"`)."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


class RecordSink(Protocol):
    """Where the gateway hands each record: it must not block or fail the request."""

    def submit(self, record: Record) -> None: ...

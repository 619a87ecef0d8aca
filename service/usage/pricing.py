"""What a request costs (docs/reference.md §13): its tokens, priced per class, in exact decimal USD.

Prices come, class by class, from the first that has one:

1. the provider file's `pricing` entry for the model (as clients name it, else as it is sent
   upstream), or, for a model without an entry, its `"*"` entry: a class an entry leaves out
   is not taken from `"*"` (a cheap default would price a dear model's cache reads);
2. the price map bundled with the installed litellm (`model_prices_and_context_window_backup.json`
   in the package's folder), for `api_key` providers only, looked up as litellm names the
   model (`mistral/mistral-large-latest`, `gpt-4o` for OpenAI's own);
3. nothing: the class costs 0 and the request is recorded `priced: false`.

Cache writes are priced at `cache_write` only (docs/reference.md §13.1), never at the input
price as well or instead: with no `cache_write` in the file or the map they are unpriced, and
the record says `priced: false`; every vendor that bills cache writes bills them above input,
and the map has their price. Cached input without a price of its own is priced as the model's
input, as litellm does (a vendor that publishes no cache price bills cache reads as ordinary
input): never more than they cost. A self-hosted `ai_server` is never priced from litellm's
map: it is free unless its file prices it.

The map is read once, off the request path (`PriceMap.load`, in a worker thread at start),
from the file as the installed package holds it: litellm itself is never imported (that takes
seconds), and nothing is fetched. Its numbers are read as decimals (`parse_float=Decimal`), so
`2.5e-06` is exactly 2.5 USD per million tokens. A provider's rates are resolved once per
version of its file and model (`Pricing.rate`): a request costs a dictionary read and a few
multiplications.

**Amounts.** A `Rate` holds each price as whole atto-dollars (10⁻¹⁸ USD) per token too, worked
out once when it is resolved, and prices a request in integers (`Rate.amount`, `bound_amount`):
an `Amount` is an `int` of atto-dollars. A file's price (at most 12 decimals per million tokens)
is always a whole number of atto-dollars per token; a price of litellm's map may not be (a few
are written with 16 significant digits, `1.142857142857143E-7`): a rate with one such price is
kept exact instead, priced in `Decimal`s (an `Amount` that is a `Decimal` is USD), in a decimal
context wide enough that no product is ever rounded. Money is never rounded either way;
`record.amount_text` writes either as the same plain digits.
"""

from __future__ import annotations

import decimal
import functools
import importlib.metadata
import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from service.config.models import ApiKey, Provider
from service.usage.record import ATTO_PER_USD, Amount, Tokens
from service.vendors import VENDORS

log = logging.getLogger(__name__)

MILLION = Decimal(1_000_000)
EXACT = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.InvalidOperation])
"""Wide enough for any product of a bounded count (10**12) and a bounded price (10**12, 12
decimals, divided by a million): money is never rounded."""
MAP_FILE = "model_prices_and_context_window_backup.json"
MAX_RATES = 4096
"""Resolved (provider, model) rates kept; a provider that takes any model cannot grow it past this."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One model of litellm's map, as pricing needs it: USD per token (per query for a rerank)."""

    provider: str | None
    input: Decimal | None
    output: Decimal | None
    cached_input: Decimal | None
    cache_write: Decimal | None
    per_query: Decimal | None
    max_output: int | None


class PriceMap:
    """litellm's bundled price map, read once from the installed package."""

    def __init__(self, entries: Mapping[str, Entry], version: str | None) -> None:
        self.entries = entries
        self.version = version
        """The installed litellm's version (None when it is not installed)."""

    @classmethod
    def empty(cls) -> PriceMap:
        return cls({}, None)

    @classmethod
    def load(cls, path: Path | None = None) -> PriceMap:
        """Read the map from `path`, or from the installed litellm's folder (blocking: a 3 MB file).

        A missing or unreadable map is an empty one (logged): requests are then priced by the
        provider files alone.
        """
        version = litellm_version()
        path = path or bundled_map()
        if path is None:
            return cls({}, version)
        try:
            data = json.loads(path.read_bytes(), parse_float=Decimal)
        except (OSError, ValueError, RecursionError) as exc:
            log.warning(
                "litellm's price map %s cannot be read (%s): only the files price requests", path, exc
            )
            return cls({}, version)
        entries = {}
        for name, raw in data.items() if isinstance(data, dict) else ():
            entry = _entry(raw) if isinstance(name, str) and name != "sample_spec" else None
            if entry is not None:
                entries[name] = entry
        return cls(entries, version)

    def find(self, prefix: str, model: str) -> Entry | None:
        """The entry of `model` as litellm names it for the vendor whose litellm prefix is `prefix`."""
        bare = model.removeprefix(f"{prefix}/")
        found = self.entries.get(f"{prefix}/{bare}")
        if found is not None:
            return found
        found = self.entries.get(bare)
        if found is not None and found.provider == prefix:
            return found
        return None


@functools.cache
def bundled() -> PriceMap:
    """The installed litellm's map, read once per process (it cannot change while it runs)."""
    return PriceMap.load()


def bundled_map() -> Path | None:
    """Where the installed litellm keeps its price map, found without importing litellm."""
    try:
        spec = importlib.util.find_spec("litellm")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / MAP_FILE
        if path.is_file():
            return path
    return None


def litellm_version() -> str | None:
    """The installed litellm's version, from its metadata (no import)."""
    try:
        return importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _entry(raw: Any) -> Entry | None:
    if not isinstance(raw, dict):
        return None
    entry = Entry(
        provider=raw.get("litellm_provider") if isinstance(raw.get("litellm_provider"), str) else None,
        input=_price(raw.get("input_cost_per_token")),
        output=_price(raw.get("output_cost_per_token")),
        cached_input=_price(raw.get("cache_read_input_token_cost")),
        cache_write=_price(raw.get("cache_creation_input_token_cost")),
        per_query=_price(raw.get("input_cost_per_query")),
        max_output=_tokens(raw.get("max_output_tokens")) or _tokens(raw.get("max_tokens")),
    )
    if entry.input is None and entry.output is None and entry.per_query is None:
        return None
    return entry


def _price(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        return None
    amount = Decimal(value)
    return amount if amount.is_finite() and 0 <= amount < 10**6 else None


def _tokens(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


@dataclass(frozen=True, slots=True)
class Rate:
    """One provider's prices for one model, USD per token of each class (None: unpriced)."""

    input: Decimal | None = None
    output: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    per_query: Decimal | None = None
    """USD per rerank query, where the vendor prices queries."""
    max_output: int | None = None
    """The model's output limit, from litellm's map."""
    dearest_input: Decimal | None = field(init=False, repr=False, compare=False)
    """The dearest of the input classes' prices (what `bound` prices each prompt token at)."""
    prices: tuple[Decimal | None, ...] = field(init=False, repr=False, compare=False)
    """The prices in the order the sums take them: input, cached input, cache write, output,
    per query, dearest input."""
    atto: tuple[int | None, ...] | None = field(init=False, repr=False, compare=False)
    """`prices` in whole atto-dollars; None when one of them is finer than that (the rate is
    priced in decimals)."""

    def __post_init__(self) -> None:
        prices = [p for p in (self.input, self.cached_input, self.cache_write) if p is not None]
        dearest = max(prices) if prices else None
        object.__setattr__(self, "dearest_input", dearest)
        classes = (self.input, self.cached_input, self.cache_write, self.output, self.per_query, dearest)
        object.__setattr__(self, "prices", classes)
        atto = tuple(_atto(price) for price in classes)
        exact = all(a is not None for a, price in zip(atto, classes, strict=True) if price is not None)
        object.__setattr__(self, "atto", atto if exact else None)

    def known(self, purpose: str) -> bool:
        """Whether a request of `purpose` has a price: input (and output for chat), or per query."""
        if purpose == "reranking":
            return self.per_query is not None or self.input is not None
        return self.input is not None and (purpose != "chat" or self.output is not None)

    def amount(self, tokens: Tokens, queries: int = 0) -> tuple[Amount, bool]:
        """What `tokens` (and `queries` rerank queries) cost, and whether every class was priced:
        whole atto-dollars (an `int`), or USD (a `Decimal`) for a rate finer than that."""
        atto = self.atto
        if atto is None:
            return self.cost(tokens, queries)
        total, priced = _sum(atto, tokens, queries)
        return total, priced and self.any

    def bound_amount(self, prompt: int, completion: int, queries: int = 0) -> Amount:
        """`bound` as an `Amount`: whole atto-dollars, or USD for a rate finer than that."""
        atto = self.atto
        if atto is None:
            return self.bound(prompt, completion, queries)
        return _bound(atto, prompt, completion, queries)

    def cost(self, tokens: Tokens, queries: int = 0) -> tuple[Decimal, bool]:
        """What `tokens` (and `queries` rerank queries) cost in USD, and whether every class was
        priced: `amount`'s sums, in decimals none of which is rounded."""
        with decimal.localcontext(EXACT):
            total, priced = _sum(self.prices, tokens, queries)
        return Decimal(total), priced and self.any

    def bound(self, prompt: int, completion: int, queries: int = 0) -> Decimal:
        """An upper bound of the cost of `prompt` input tokens of any class and `completion`
        ones, in USD."""
        with decimal.localcontext(EXACT):
            return Decimal(_bound(self.prices, prompt, completion, queries))

    @property
    def any(self) -> bool:
        """Whether any price at all is known."""
        return self.input is not None or self.output is not None or self.per_query is not None


def _sum(prices: tuple[Amount | None, ...], tokens: Tokens, queries: int) -> tuple[Amount, bool]:
    """The sums of `Rate.amount` and `Rate.cost`, with `prices` as `Rate.atto` or `Rate.prices`
    hold them (decimals in an exact context)."""
    input_, cached_input, cache_write, output, per_query, _ = prices
    priced = True
    total: Amount = 0
    # Each class in turn, unrolled (a request pays for this on every answer).
    if tokens.input:
        if input_ is None:
            priced = False
        else:
            total += input_ * tokens.input
    if tokens.cached_input:
        if cached_input is None:
            priced = False
        else:
            total += cached_input * tokens.cached_input
    if tokens.cache_write:
        if cache_write is None:
            priced = False
        else:
            total += cache_write * tokens.cache_write
    if tokens.output:
        if output is None:
            priced = False
        else:
            total += output * tokens.output
    if queries and per_query is not None:
        total += per_query * queries
    elif queries and input_ is None:
        priced = False
    return total, priced


def _bound(prices: tuple[Amount | None, ...], prompt: int, completion: int, queries: int) -> Amount:
    """The sums of `Rate.bound_amount` and `Rate.bound`, with `prices` as `_sum` takes them: each
    prompt token at the dearest input price."""
    _, _, _, output, per_query, dearest = prices
    total: Amount = dearest * prompt if dearest is not None and prompt else 0
    if completion and output is not None:
        total += output * completion
    if queries and per_query is not None:
        total += per_query * queries
    return total


def _atto(price: Decimal | None) -> int | None:
    """`price` (USD) in whole atto-dollars; None when it is finer than that (or not given)."""
    if price is None:
        return None
    scaled = EXACT.multiply(price, ATTO_PER_USD)
    whole = scaled.to_integral_value()
    return int(whole) if whole == scaled else None


UNPRICED = Rate()


class Pricing:
    """Resolves each provider's rates for a model, once per version of its file."""

    def __init__(self, price_map: PriceMap | None = None) -> None:
        self.map = price_map or PriceMap.empty()
        self._rates: dict[tuple[str, str | None], tuple[Provider, Rate]] = {}

    def rate(self, provider: Provider, model: str | None) -> Rate:
        """What `model` costs at `provider` (`UNPRICED` when nothing prices it)."""
        key = (provider.id, model)
        found = self._rates.get(key)
        if found is not None and found[0] is provider:
            return found[1]
        rate = self._resolve(provider, model)
        if len(self._rates) >= MAX_RATES:
            self._rates.clear()
        self._rates[key] = (provider, rate)
        return rate

    def _resolve(self, provider: Provider, model: str | None) -> Rate:
        pricing = provider.pricing
        upstream = provider.upstream_model(model) if model is not None else None
        # A model's own entry (as clients name it, else as sent upstream) prices it alone:
        # `"*"` prices only the models without one, never the classes an entry leaves out.
        entry = next((pricing[m] for m in (model, upstream) if m is not None and m in pricing), None)
        if entry is None:
            entry = pricing.get("*")
        found: dict[str, Decimal | None] = {}
        for name in ("input", "output", "cached_input", "cache_write"):
            per_million = getattr(entry, name) if entry is not None else None
            found[name] = EXACT.divide(per_million, MILLION) if per_million is not None else None
        mapped = None
        if isinstance(provider, ApiKey) and upstream is not None:
            mapped = self.map.find(VENDORS[provider.provider].litellm_prefix, upstream)
        per_query = None
        max_output = None
        if mapped is not None:
            for name in ("input", "output", "cached_input", "cache_write"):
                if found[name] is None:
                    found[name] = getattr(mapped, name)
            per_query, max_output = mapped.per_query, mapped.max_output
        if found["cached_input"] is None:  # cache reads as input; cache writes at `cache_write` only
            found["cached_input"] = found["input"]
        return Rate(
            found["input"],
            found["output"],
            found["cached_input"],
            found["cache_write"],
            per_query,
            max_output,
        )

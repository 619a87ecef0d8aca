"""Prices (reference §13): the file's `pricing`, then litellm's bundled map, then nothing; exact money."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config.models import AiServer, ApiKey
from service.usage.pricing import EXACT, PriceMap, Pricing, Rate, bundled, bundled_map
from service.usage.record import Amount, Tokens, amount_text, money, to_usd

SEALED = "ENC[AES256_GCM,data:AAAA,iv:AAAA,tag:AAAA,type:str]"


def api_key(vendor: str = "openai", **fields: Any) -> ApiKey:
    return ApiKey.model_validate(
        {"kind": "api_key", "id": "v", "provider": vendor, "api_key": SEALED, **fields}
    )


def server(**fields: Any) -> AiServer:
    doc = {"kind": "ai_server", "id": "s", "server_type": "vllm", "base_url": "http://gpu:8000/v1"}
    return AiServer.model_validate({**doc, **fields})


def test_the_file_prices_each_class_and_star_prices_only_models_without_an_entry() -> None:
    provider = api_key(
        pricing={
            "*": {"input": 0.15, "output": 0.60, "cached_input": 0.075},
            "gpt-4o": {"input": 2.50, "output": 10.00, "cache_write": 3.125},
        }
    )
    pricing = Pricing()
    rate = pricing.rate(provider, "gpt-4o")
    tokens = Tokens(input=1_000_000, cached_input=1_000_000, cache_write=1_000_000, output=1_000_000)
    cost, priced = rate.cost(tokens)
    # input 2.50 + cached 2.50 (its own input: never "*"'s 0.075) + cache writes 3.125 + output 10.00
    assert cost == Decimal("18.125") and priced
    other, _ = pricing.rate(provider, "mini").cost(Tokens(input=1000, cached_input=1000, output=1000))
    assert other == Decimal("0.000825")  # "*": 0.15 + 0.075 + 0.60 per million


def test_a_cache_class_an_entry_leaves_out_comes_from_litellms_map_then_reads_from_input() -> None:
    pricing = Pricing(bundled())
    own = {
        "gpt-4o": {"input": 2.00, "output": 8.00},
        "*": {"input": 0.1, "output": 0.1, "cached_input": 0.01},
    }
    vendor = pricing.rate(api_key("openai", pricing=own), "gpt-4o")
    assert vendor.input == Decimal("0.000002") and vendor.cached_input == Decimal("0.00000125")  # the map's
    served = pricing.rate(server(pricing=own), "gpt-4o")  # a server is never priced from the map
    assert served.cached_input == served.input == Decimal("0.000002")
    assert served.cache_write is None  # at `cache_write` only: none here, nor in the map
    claude = pricing.rate(api_key("anthropic", pricing={"*": {"input": 2, "output": 8}}), "claude-sonnet-4-5")
    assert claude.input == Decimal("0.000002") and claude.cache_write == Decimal("0.00000375")  # the map's


def test_money_is_exact_never_a_sum_of_floats() -> None:
    rate = Pricing().rate(api_key(pricing={"*": {"input": "0.1", "output": "0.2"}}), "m")
    total = sum((rate.cost(Tokens(input=1, output=1))[0] for _ in range(10)), Decimal(0))
    assert total == Decimal("0.000003")  # 10 x (0.1 + 0.2) per million; in floats 3.0000000000000004e-06


def test_cache_writes_are_priced_at_cache_write_only() -> None:
    rate = Pricing().rate(api_key(pricing={"*": {"input": 1, "output": 1, "cache_write": 10}}), "m")
    cost, _ = rate.cost(Tokens(input=0, cache_write=1_000_000))
    assert cost == Decimal(10)


def test_cache_writes_without_a_cache_write_price_are_unpriced_never_priced_as_input() -> None:
    """Cache writes are priced at `cache_write` only (reference §13.1); with no such price in the file or the
    map they cost nothing here and the record says `priced: false`."""
    for provider in (api_key(pricing={"*": {"input": 1, "output": 1}}), server(pricing={"*": {"input": 1}})):
        rate = Pricing(bundled()).rate(provider, "no-such-model-xyz")
        assert rate.cache_write is None and rate.cached_input == Decimal("0.000001")
        tokens = Tokens(input=1_000_000, cached_input=1_000_000, cache_write=1_000_000, output=0)
        assert rate.cost(tokens) == (Decimal(2), False)  # input 1 + cache reads as input 1 + writes 0
        assert rate.cost(Tokens(input=1_000_000, cached_input=1_000_000)) == (Decimal(2), True)


def test_litellms_map_prices_an_api_key_provider_as_litellm_names_its_models() -> None:
    pricing = Pricing(bundled())
    gpt = pricing.rate(api_key("openai"), "gpt-4o")
    assert gpt.input == Decimal("0.0000025") and gpt.cached_input == Decimal("0.00000125")
    claude = pricing.rate(api_key("anthropic"), "claude-sonnet-4-5")
    assert claude.cache_write == Decimal("0.00000375") and claude.max_output == 64000
    mistral = pricing.rate(api_key("mistral"), "mistral-large-latest")  # `mistral/mistral-large-latest`
    assert mistral.known("chat")
    # the file wins, class by class
    mine = pricing.rate(api_key("openai", pricing={"gpt-4o": {"input": 1}}), "gpt-4o")
    assert mine.input == Decimal("0.000001") and mine.output == gpt.output


def test_a_model_map_prices_what_is_sent_upstream() -> None:
    provider = api_key("openai", model_map={"smart": "gpt-4o"})
    assert Pricing(bundled()).rate(provider, "smart").input == Decimal("0.0000025")


def test_an_ai_server_is_never_priced_from_litellms_map() -> None:
    pricing = Pricing(bundled())
    rate = pricing.rate(server(), "gpt-4o")
    assert not rate.known("chat")
    cost, priced = rate.cost(Tokens(input=100, output=100))
    assert cost == 0 and priced is False
    free = pricing.rate(server(pricing={"*": {"input": 0, "output": 0}}), "x")
    assert free.cost(Tokens(input=100, output=100)) == (Decimal(0), True)


def test_an_unknown_model_is_unpriced() -> None:
    rate = Pricing(bundled()).rate(api_key("openai"), "no-such-model-xyz")
    assert not rate.known("chat")
    assert rate.cost(Tokens(input=5)) == (Decimal(0), False)


def test_a_rerank_is_priced_per_query_where_the_vendor_prices_queries() -> None:
    rate = Pricing(bundled()).rate(api_key("cohere"), "rerank-english-v3.0")
    assert rate.known("reranking")
    assert rate.cost(Tokens(input=500), queries=1) == (Decimal("0.002"), True)


def test_the_bound_prices_each_prompt_token_at_the_dearest_input_class_there_is() -> None:
    """`Rate` keeps its dearest input price (issue 22); it is no part of what a rate is equal to."""
    assert Rate(Decimal(1), Decimal(2), Decimal(3), Decimal(5)).bound(prompt=10, completion=3) == 56
    assert Rate(Decimal(4), Decimal(2), Decimal(3)).bound(prompt=10, completion=3) == 46
    assert Rate(None, Decimal(2)).bound(prompt=10, completion=3) == 6
    assert Rate().bound(prompt=10, completion=3) == 0 and Rate().dearest_input is None
    assert Rate(Decimal(1), cache_write=Decimal(7)) == Rate(Decimal(1), cache_write=Decimal(7))


def _cost_as_it_was(rate: Rate, tokens: Tokens) -> tuple[Decimal, bool]:
    priced, total = True, Decimal(0)
    for count, price in (
        (tokens.input, rate.input),
        (tokens.cached_input, rate.cached_input),
        (tokens.cache_write, rate.cache_write),
        (tokens.output, rate.output),
    ):
        if count:
            if price is None:
                priced = False
            else:
                total = EXACT.add(total, EXACT.multiply(price, count))
    return total, priced and rate.any


@pytest.mark.parametrize(
    "rate",
    [
        Rate(Decimal("1.5E-7"), Decimal("6E-7")),
        Rate(Decimal("2E+1"), Decimal(3), Decimal("0.5"), Decimal("7.25")),
        Rate(None, Decimal(2)),
        Rate(),
    ],
)
def test_a_cost_is_the_same_decimal_class_by_class(rate: Rate) -> None:
    """`Rate.cost` unrolled (issue 22): the same amount, written the same, and the same `priced`."""
    for tokens in (Tokens(), Tokens(9, 0, 0, 12), Tokens(5, 3, 2, 7, 1), Tokens(output=4), Tokens(0, 8)):
        got, expected = rate.cost(tokens), _cost_as_it_was(rate, tokens)
        assert (str(got[0]), got[1]) == (str(expected[0]), expected[1])


def test_the_bound_covers_any_split_of_the_prompt_between_classes() -> None:
    rate = Pricing().rate(api_key(pricing={"*": {"input": 1, "output": 2, "cache_write": 5}}), "m")
    bound = rate.bound(prompt=100, completion=10)
    for tokens in (Tokens(input=100, output=10), Tokens(cache_write=100, output=10)):
        assert rate.cost(tokens)[0] <= bound


def test_the_map_is_read_from_the_installed_package_without_importing_litellm() -> None:
    code = (
        "import sys; from service.usage.pricing import bundled; m = bundled(); "
        "assert m.entries and m.version; assert 'litellm' not in sys.modules; print(m.version)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip()
    path = bundled_map()
    assert path is not None and path.name == "model_prices_and_context_window_backup.json"


def test_a_broken_map_is_an_empty_one(tmp_path: Path) -> None:
    broken = tmp_path / "map.json"
    broken.write_text("{not json")
    assert PriceMap.load(broken).entries == {}
    odd = tmp_path / "odd.json"
    odd.write_text(
        json.dumps({"m": {"input_cost_per_token": "free"}, "n": [1], "o": {"input_cost_per_token": 1e-6}})
    )
    assert set(PriceMap.load(odd).entries) == {"o"}


@pytest.mark.parametrize("model", [None, ""])
def test_a_request_without_a_model_takes_star(model: str | None) -> None:
    rate = Pricing().rate(api_key(pricing={"*": {"input": 1, "output": 1}}), model)
    assert rate.known("chat")


# -- amounts in whole atto-dollars (issue 22) ------------------------------------------------------

_PER_MILLION = st.decimals(min_value=0, max_value=10**6, places=12, allow_nan=False, allow_infinity=False)
_PRICE = st.none() | _PER_MILLION.map(lambda p: EXACT.divide(p, Decimal(1_000_000)))
_COUNT = st.integers(min_value=0, max_value=10**12)


@settings(max_examples=300, deadline=None)
@given(
    prices=st.tuples(_PRICE, _PRICE, _PRICE, _PRICE, _PRICE),
    counts=st.tuples(_COUNT, _COUNT, _COUNT, _COUNT, _COUNT),
    queries=st.integers(min_value=0, max_value=3),
)
def test_the_integer_path_prices_as_the_decimal_path(
    prices: tuple[Decimal | None, ...], counts: tuple[int, ...], queries: int
) -> None:
    """Any price a file can write (USD per million tokens, 12 decimals at most) is whole
    atto-dollars per token: `amount` and `bound_amount` are the exact `cost` and `bound`, and
    write the same text."""
    rate = Rate(*prices)
    tokens = Tokens(*counts)
    assert rate.atto is not None
    amount, priced = rate.amount(tokens, queries)
    cost, priced_as_decimal = rate.cost(tokens, queries)
    assert type(amount) is int and priced == priced_as_decimal
    assert to_usd(amount) == cost and amount_text(amount) == money(cost)
    prompt, completion = counts[0], counts[3]
    bound = rate.bound_amount(prompt, completion, queries)
    assert type(bound) is int and to_usd(bound) == rate.bound(prompt, completion, queries)
    assert amount_text(bound) == money(rate.bound(prompt, completion, queries))


def test_a_price_finer_than_an_atto_dollar_keeps_its_rate_exact_in_decimals() -> None:
    """litellm's map writes a few prices with 16 significant digits (`1.142857142857143E-7`):
    not whole atto-dollars, so their rate is priced in `Decimal`s, never rounded."""
    fine = Decimal("1.142857142857143E-7")
    rate = Rate(fine, Decimal("3E-7"))
    assert rate.atto is None
    amount, priced = rate.amount(Tokens(input=7, output=3))
    assert type(amount) is Decimal and priced
    assert amount == fine * 7 + Decimal("9E-7")
    assert amount_text(amount) == "0.0000017000000000000001"
    bound = rate.bound_amount(10, 2)
    assert type(bound) is Decimal and bound == rate.bound(10, 2)
    assert Rate(Decimal("1E-18")).atto is not None and Rate(Decimal("1E-19")).atto is None


def test_the_bundled_map_s_finer_prices_are_kept_exact() -> None:
    """Every rate of the installed map prices as its decimals do, whole atto-dollars or not."""
    entries = [e for e in bundled().entries.values() if e.input is not None and e.output is not None]
    assert entries
    tokens = Tokens(input=123, cached_input=7, output=45)
    for entry in entries:
        rate = Rate(entry.input, entry.output, entry.cached_input or entry.input, entry.cache_write)
        amount, _ = rate.amount(tokens)
        assert to_usd(amount) == rate.cost(tokens)[0]


@pytest.mark.parametrize(
    ("amount", "written"),
    [
        (0, "0"),
        (1, "0.000000000000000001"),
        (750_000_000_000, "0.00000075"),
        (10**18, "1"),
        (15 * 10**17, "1.5"),
        (10**24 + 10**17, "1000000.1"),
        (-750_000_000_000, "-0.00000075"),
        (Decimal("7.5E-7"), "0.00000075"),
        (Decimal("0E-30"), "0"),
        (Decimal("1.500"), "1.5"),
        (Decimal("1E+3"), "1000"),
        (Decimal("-0"), "0"),
    ],
)
def test_an_amount_is_written_as_plain_digits(amount: Amount, written: str) -> None:
    """Never in exponent notation, no trailing zero, whether atto-dollars or a decimal of USD."""
    assert amount_text(amount) == written
    assert to_usd(amount) == Decimal(written)

"""Prices, budgets and limits as files declare them (docs/reference.md §13): exact decimals,
bounded, strict."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from service.config.metering import Budget, Limits, Price
from service.config.models import ApiKey, Clients

SEALED = "ENC[AES256_GCM,data:AAAA,iv:AAAA,tag:AAAA,type:str]"


def test_a_yaml_number_is_read_through_its_decimal_text_not_its_float_value() -> None:
    price = Price.model_validate({"input": 0.15, "output": "0.60", "cached_input": 3})
    assert price.input == Decimal("0.15")
    assert price.output == Decimal("0.60")
    assert price.cached_input == Decimal(3)
    assert price.model_dump(mode="json")["input"] == "0.15"


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("1e3", "1000"),
        ("1E+11", "100000000000"),
        ("0.0000001", "0.0000001"),
        (1e-7, "0.0000001"),
        ("0.000000000000", "0.000000000000"),
        ("-0", "0"),
        ("100.000", "100.000"),
        (1000.0, "1000.0"),
    ],
)
def test_an_amount_is_answered_in_digits_never_in_exponent_notation(given: object, shown: str) -> None:
    """`str(Decimal("1e3"))` is `1E+3`: the console read it as no amount (a budget of 1e3 was shown
    as $0.00 and exhausted), and it is not an amount by the JSON Schema's own pattern."""
    assert Budget.model_validate({"usd": given, "period": "day"}).model_dump(mode="json")["usd"] == shown
    assert Price.model_validate({"input": given}).model_dump(mode="json")["input"] == shown


@pytest.mark.parametrize(
    "bad", [True, -1, "-0.01", "1e30", 1e30, "1e400", "nan", "inf", "abc", [1], "0.0000000000001", 10**13]
)
def test_an_amount_that_is_not_a_sane_usd_figure_is_refused(bad: object) -> None:
    with pytest.raises(ValidationError):
        Budget.model_validate({"usd": bad, "period": "month"})


@pytest.mark.parametrize("bad", [{"rpm": 0}, {"rpm": -5}, {"tpm": 10**13}, {"rpm": "5"}, {"burst": 3}])
def test_limits_are_positive_whole_numbers_and_nothing_else(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Limits.model_validate(bad)


def test_a_client_and_a_provider_carry_their_limits_and_budget() -> None:
    clients = Clients.model_validate(
        {
            "kind": "clients",
            "clients": [
                {
                    "name": "ops",
                    "token_sha256": "0" * 64,
                    "scopes": ["completions", "usage:read"],
                    "limits": {"rpm": 600, "max_parallel": 16, "budget": {"usd": "50", "period": "month"}},
                }
            ],
        }
    )
    limits = clients.clients[0].limits
    assert limits is not None and limits.budget == Budget(usd=Decimal(50), period="month")
    key = ApiKey.model_validate(
        {
            "kind": "api_key",
            "id": "vendor",
            "provider": "openai",
            "api_key": SEALED,
            "pricing": {"*": {"input": 0.15, "output": 0.6}},
            "budget": {"usd": 200, "period": "week"},
        }
    )
    described = key.describe()
    assert described["pricing"] == {
        "*": {"input": "0.15", "output": "0.6", "cached_input": None, "cache_write": None}
    }
    assert described["budget"] == {"usd": "200", "period": "week"}


def test_a_provider_without_prices_or_budget_describes_as_before() -> None:
    key = ApiKey.model_validate({"kind": "api_key", "id": "v", "provider": "openai", "api_key": SEALED})
    assert "pricing" not in key.describe() and "budget" not in key.describe()

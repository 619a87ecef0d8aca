"""What every transport shares: the key as a header can carry it, and the headers passed back."""

from __future__ import annotations

import pytest

from service.config.models import ApiKey
from service.config.secret import Secret
from service.gateway.transports.base import pass_back, sendable_key


def _vendor(key: str | None) -> ApiKey:
    provider = ApiKey.model_validate(
        {
            "kind": "api_key",
            "id": "v",
            "provider": "openai",
            "api_key": "ENC[AES256_GCM,data:,iv:AA==,tag:AA==,type:str]",
        }
    )
    return provider.model_copy(update={"api_key": Secret(key)}) if key is not None else provider


def test_a_key_is_sent_without_the_line_break_it_was_pasted_with() -> None:
    assert sendable_key(_vendor("sk-abc\n")) == "sk-abc"


@pytest.mark.parametrize("key", ["sk-a\r\nX-Evil: 1", "sk-\x00nul", "sk-\x7fdel"])
def test_a_key_no_header_can_carry_fails_its_provider_not_the_request(key: str) -> None:
    """Files with such keys are refused at load; this is the second line, should one get through."""
    with pytest.raises(ValueError, match="control character"):
        sendable_key(_vendor(key))


def test_a_sealed_key_is_no_key() -> None:
    assert sendable_key(_vendor(None)) is None


def test_only_request_ids_retry_after_and_rate_limits_are_passed_back() -> None:
    headers: dict[str, str] = {}
    upstream = {
        "X-Request-Id": "r1",
        "Retry-After": "3",
        "x-ratelimit-remaining-requests": "9",
        "Set-Cookie": "s",
    }
    pass_back(upstream, headers)
    assert headers == {
        "x-request-id": "r1",
        "retry-after": "3",
        "retry-after-ms": "3000",  # sent exactly when Retry-After is
        "x-ratelimit-remaining-requests": "9",
    }


@pytest.mark.parametrize(
    ("upstream", "passed"),
    [
        ({"Retry-After": "2", "retry-after-ms": "1500"}, ("2", "1500")),
        ({"retry-after-ms": "1500"}, ("2", "1500")),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, ("Wed, 21 Oct 2015 07:28:00 GMT", "0")),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "soon", "retry-after-ms": "1.5"}, None),
        ({"retry-after-ms": "-5"}, None),
    ],
)
def test_retry_after_and_retry_after_ms_are_passed_back_as_a_pair(
    upstream: dict[str, str], passed: tuple[str, str] | None
) -> None:
    headers: dict[str, str] = {}
    pass_back(upstream, headers)
    pair = (headers["retry-after"], headers["retry-after-ms"]) if "retry-after" in headers else None
    assert pair == passed and ("retry-after" in headers) == ("retry-after-ms" in headers)

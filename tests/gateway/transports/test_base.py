"""What every transport shares: the key as a header can carry it, and the headers passed back."""

from __future__ import annotations

import re

import pytest

from service.config.models import ApiKey
from service.config.secret import Secret
from service.gateway.transports.base import pass_back, sane_request_id, sendable_key, wait_ms


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
    upstream = {  # in lower case, as an answer's headers are kept
        "x-request-id": "r1",
        "retry-after": "3",
        "x-ratelimit-remaining-requests": "9",
        "set-cookie": "s",
    }
    pass_back(upstream, headers)
    assert headers == {
        "x-request-id": "r1",
        "retry-after": "3",
        "retry-after-ms": "3000",  # sent exactly when Retry-After is
        "x-ratelimit-remaining-requests": "9",
    }


def test_anthropics_request_id_is_passed_back_as_x_request_id_unless_one_came() -> None:
    named = {"x-request-id": "ours"}
    pass_back({"request-id": "req_1"}, named)
    both = {"x-request-id": "ours"}
    pass_back({"request-id": "req_1", "x-request-id": "r2"}, both)
    assert named == {"x-request-id": "req_1"}
    assert both == {"x-request-id": "r2"}


@pytest.mark.parametrize(
    ("upstream", "passed"),
    [
        ({"retry-after": "2", "retry-after-ms": "1500"}, ("2", "1500")),
        ({"retry-after-ms": "1500"}, ("2", "1500")),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, ("Wed, 21 Oct 2015 07:28:00 GMT", "0")),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "soon", "retry-after-ms": "1.5"}, None),
        ({"retry-after-ms": "-5"}, None),
        # digits str.isdigit takes but int() does not, or reads as another number: no time said
        ({"retry-after": "\u00b2"}, None),
        ({"retry-after": "\u0665"}, None),
        ({"retry-after": "7", "retry-after-ms": "\u00b2"}, ("7", "7000")),
        ({"retry-after-ms": "\u0665"}, None),
        # an HTTP date whose year or zone is too large to hold (OverflowError): no time said
        ({"retry-after": "Wed, 21 Oct 99999999999999999999 07:28:00 GMT"}, None),
        ({"retry-after": "1 Jan 2015 07:28:00 +99999999999999"}, None),
    ],
)
def test_retry_after_and_retry_after_ms_are_passed_back_as_a_pair(
    upstream: dict[str, str], passed: tuple[str, str] | None
) -> None:
    headers: dict[str, str] = {}
    pass_back(upstream, headers)
    pair = (headers["retry-after"], headers["retry-after-ms"]) if "retry-after" in headers else None
    assert pair == passed and ("retry-after" in headers) == ("retry-after-ms" in headers)
    assert wait_ms(upstream) == (int(passed[1]) if passed is not None else None)


@pytest.mark.parametrize(
    "value",
    ["", " ", "a b", "a\tb", "r\x7f", "r\x00", "é", "r\udce9", "\u0660", "x" * 129, "r1\n", "\uff41"],
)
def test_a_request_id_that_is_no_run_of_visible_ascii_is_not_passed_back(value: str) -> None:
    """`[!-~]{1,128}`, as the regular expression it replaced said."""
    assert re.fullmatch(r"[!-~]{1,128}", value) is None and not sane_request_id(value)
    headers: dict[str, str] = {}
    pass_back({"x-request-id": value}, headers)
    assert headers == {}


@pytest.mark.parametrize(
    "value", ["r", "!", "~", "req-a_1.B:2/3+4=5", "x" * 128, "".join(map(chr, range(33, 127)))]
)
def test_a_run_of_visible_ascii_is_a_request_id(value: str) -> None:
    assert re.fullmatch(r"[!-~]{1,128}", value) is not None and sane_request_id(value)
    headers: dict[str, str] = {}
    pass_back({"x-request-id": value}, headers)
    assert headers == {"x-request-id": value}

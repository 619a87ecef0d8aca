"""A record as a spool line and back (`service.usage.encoding`): what any database stores."""

from __future__ import annotations

from service.usage.encoding import TEXT_LIMIT, decode, encode, text
from tests.usage.conftest import record


def test_a_plain_text_is_kept_as_it_is() -> None:
    """The common case (an id, a client's name, a model) is returned as it is, not copied."""
    plain = "gpt-4o-mini-2024-07-18"
    assert text(plain) is plain
    assert text(None) is None
    assert text(42) == "42"


def test_a_text_loses_nuls_and_lone_surrogates_and_is_cut() -> None:
    assert text("a\x00b") == "ab"
    assert text("caf\u00e9\x00") == "caf\u00e9"
    assert text("x\ud800y") == "x?y"  # no UTF-8 for a lone surrogate: replaced
    assert text("m" * (TEXT_LIMIT + 5)) == "m" * TEXT_LIMIT
    assert text("\u00e9" * (TEXT_LIMIT + 5)) == "\u00e9" * TEXT_LIMIT


def test_a_record_comes_back_from_its_line() -> None:
    sent = record(id="r-1", client="caf\u00e9\x00", model="m\ud800")
    back = decode(encode(sent))
    assert back.id == "r-1" and back.client == "caf\u00e9" and back.model == "m?"
    assert back.cost_usd == sent.cost_usd and back.ts == sent.ts

"""A record as a spool line and back (`service.usage.encoding`): what any database stores."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.usage import encoding
from service.usage import values as bounds
from service.usage.encoding import MAX_OPENINGS, MAX_QUICK_BYTES, BadLine, decode, encode, loads
from service.usage.record import amount_text, to_usd
from service.usage.values import TEXT_LIMIT, text
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


def test_a_text_of_wide_characters_is_cut_to_twice_its_limit_in_bytes() -> None:
    """Names of 3- and 4-byte characters are cut between characters at 512 bytes, so that a
    rollup's key (four names) stays within what a PostgreSQL index holds; 2-byte ones are not."""
    assert text("é" * 300) == "é" * TEXT_LIMIT
    for wide in ("😀" * 300, "a" + "😀" * 300, "中" * 300, "ab" + "中" * 300):
        cut = text(wide)
        assert cut is not None and len(cut.encode()) <= 2 * TEXT_LIMIT
        assert wide.startswith(cut) and len(cut.encode()) > 2 * TEXT_LIMIT - 4


def test_a_record_comes_back_from_its_line() -> None:
    sent = record(id="r-1", client="caf\u00e9\x00", model="m\ud800")
    back = decode(encode(sent))
    assert back.id == "r-1" and back.client == "caf\u00e9" and back.model == "m?"
    assert back.cost_usd == sent.cost_usd and back.ts == sent.ts


def test_a_line_is_the_one_jsons_module_writes_and_reads_back_the_same() -> None:
    """orjson writes and reads the spool (issue 22): the line means what json's module made of it
    (the same values, in the same order), for plain and non-ASCII records, and a line of the
    previous writer reads back as before."""
    for sent in (
        record(id="r-2", ttfb_ms=0.001, latency_ms=123456.789),
        record(client="caf\u00e9 \u65e5\u672c", model="m\ud800", upstream_model=None, ttfb_ms=None),
        record(status=429, cost_usd=Decimal("0.000000001"), attempts=2**70),
    ):
        line = encode(sent)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        values = json.loads(line)
        assert line == json.dumps(values, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        assert decode(line) == decode(json.dumps(values, ensure_ascii=True).encode() + b"\n")


def test_a_line_orjson_refuses_is_judged_by_jsons_module() -> None:
    """An escaped lone surrogate is JSON that orjson will not read: json's module reads it, as it
    did (and the text is then cleaned as a request's is: no database binds a lone surrogate)."""
    line = encode(record(id="r-3", client="x")).replace(b'"x"', b'"\\ud800"')
    assert decode(line).client == "?"
    with pytest.raises(BadLine):
        decode(b"[1,NaN")


def test_a_value_orjson_refuses_is_written_by_jsons_module_as_ascii_and_read_back_the_same() -> None:
    """`dumps`' fallback (a lone surrogate, an integer past 64 bits: what a line read from a file
    may hold, written again when it is set aside) writes a line UTF-8 can hold, read back the same."""
    values = encoding.values_of(record(id="r-4"))
    values[5], values[13] = "gpt\ud800é", 10**30
    line = encoding.dumps(values)
    assert b"\\ud800" in line and line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.isascii()
    assert encoding.loads(line) == values


def test_json_reads_as_jsons_module_reads_it() -> None:
    """orjson reads request bodies and spool lines (issue 22); what it refuses or reads otherwise,
    json's module reads or refuses as before: NaN, UTF-16, a BOM, an escaped lone surrogate,
    integers past 64 bits (orjson makes floats of them), deep nesting (some orjson versions crash)."""
    for raw in (
        b'{"model": "m", "messages": [{"role": "user", "content": "caf\\u00e9 \xe6\x97\xa5 \\"u\\""}]}',
        b' {"temperature": 0.1, "top_p": 1e-7, "big": 1.7976931348623157e308, "neg": -0, "x": [true, null]} ',
        b'{"a": 1, "a": 2}',  # the last one wins, as before
        b'{"seed": 123456789012345678901234567890, "max_tokens": 18446744073709551615}',
        b'{"seed": -9223372036854775808, "max_tokens": 9999999999999999999, "t": 0.10000000000000000000001}',
        b'{"seed": -9223372036854775809}',  # past 64 bits in 19 digits: a float in orjson
        b"[-9999999999999999999, 1]",
        '{"model": "m"}'.encode("utf-16"),
        b'\xef\xbb\xbf{"model": "m"}',
        b'{"model": "\\ud800"}',
        b"[" * MAX_OPENINGS + b"]" * MAX_OPENINGS,
        b"[" * (MAX_OPENINGS + 1) + b"]" * (MAX_OPENINGS + 1),
        b'{"seed": 123456789012345678901234567890, "pad": "' + b"x" * MAX_QUICK_BYTES + b'"}',
        b'{"n": 1, "pad": "' + b"\\u00e9" * MAX_QUICK_BYTES + b'"}',
    ):
        assert repr(loads(raw)) == repr(json.loads(raw)), raw[:40]  # the types too: 1 is not 1.0
    assert math.isnan(loads(b'{"t": NaN}')["t"])
    for bad in (b"", b"{", b'{"a": 1,}', b"\xff", b'{"a": "\x01"}'):
        with pytest.raises(ValueError):
            loads(bad)
    for deep in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        with pytest.raises(RecursionError):  # json's verdict, not a crash of the process
            loads(deep)


def test_a_damaged_line_is_a_bad_line_not_a_crash() -> None:
    for damaged in (b"[" * 100_000 + b"\n", b"[1," + b"9" * 30 + b"]\n", b"\xff\n"):
        with pytest.raises(BadLine):
            decode(damaged)


def test_a_text_past_the_quick_size_is_not_checked_or_read_by_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `MAX_QUICK_BYTES` the checks cost more than orjson saves (an 11 MB body took 133 ms
    to search for long numbers, json's module reads it in 20): json's module reads it alone."""

    class Untouchable(bytes):
        def count(self, *args: object) -> int:
            raise AssertionError("checked")

        def translate(self, *args: object) -> bytes:
            raise AssertionError("checked")

    def refused(data: bytes) -> object:
        raise AssertionError("read by orjson")

    monkeypatch.setattr(encoding.orjson, "loads", refused)
    big = b'{"pad": "' + b"x" * MAX_QUICK_BYTES + b'"}'
    assert loads(Untouchable(big)) == {"pad": "x" * MAX_QUICK_BYTES}
    with pytest.raises(AssertionError, match="read by orjson"):
        loads(b'{"pad": "x"}')


def test_what_the_ledger_keeps_in_memory_is_what_it_would_read_back_from_the_line() -> None:
    """The ledger stores the values a line was made of, not the line read back (issue 22): for
    plain and hostile records alike they are the ones the line gives back, as a row and as a record."""
    for sent in (
        record(),
        record(client="caf\u00e9\x00", model="m\ud800" + "x" * 300, upstream_model=None, ttfb_ms=1.5),
        record(status=429, provider=None, cost_usd=Decimal(0), attempts=0),
        record(latency_ms=math.nan, ttfb_ms=math.inf, prompt_tokens=-3, completion_tokens=2**70),
        record(cost_usd=Decimal("1e-13"), stream=True, estimated=True, priced=False, limited=True),
        record(cost_usd=Decimal(10) ** 9, status=10_000, reasoning_tokens=True),  # type: ignore[arg-type]
    ):
        kept = encoding.values_of(sent)
        read = encoding.decode_values(encode(sent))
        assert read == kept
        assert encoding.row(read) == encoding.row(kept)
        assert encoding.record_of(kept) == decode(encode(sent))
        assert encoding.dumps(kept) == encode(sent)


def test_a_line_written_otherwise_comes_back_bounded_as_fields_bounds_a_request() -> None:
    """A line of an older version or written by hand: its values of another type are made what
    `fields` writes (what every database binds); its cost is kept, or the line refused."""
    values = encoding.values_of(record(id="r-5"))
    values[1], values[3], values[5], values[8], values[9] = 7, ["a"], "m\x00\ud800", True, "yes"
    values[11], values[13], values[14], values[22] = "abc", 10**30, "12", None
    line = json.dumps(values).encode() + b"\n"
    read = encoding.decode_values(line)
    assert read[1:10] == ["7", values[2], "['a']", "chat", "m?", "openai", "gpt-4o-2024-08-06", 1, True]
    assert read[11] == 0.0 and read[13:15] == [bounds.MAX_COUNT, 12] and read[22] is False
    assert read[18] == "0.000825"
    assert encoding.dumps(read) == encoding.dumps(encoding.decode_values(encoding.dumps(read)))
    for cost in (b'"-1"', b'"NaN"', b'"1e30"', b"true", b'"-0.000001"'):
        with pytest.raises(BadLine, match=r"^a cost out of bounds"):
            decode(encode(record()).replace(b'"0.000825"', cost))


def _bounded(value: object) -> Decimal:
    """`bounds.cost` as it was before its fast path (issue 22): what it must still give."""
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except (ArithmeticError, ValueError):
        return Decimal(0)
    if not amount.is_finite() or amount < 0:
        return Decimal(0)
    return min(amount, bounds.MAX_COST)


@pytest.mark.parametrize(
    "value",
    [
        Decimal("0.00000795"),
        Decimal(0),
        Decimal("-0"),
        Decimal("0E-30"),
        Decimal("-0.5"),
        Decimal("1E-30"),
        Decimal(1_000_000),
        Decimal("1000000.000001"),
        Decimal("1E+40"),
        Decimal("NaN"),
        Decimal("-NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        0.25,
        -3,
        "12.5",
        "junk",
        None,
    ],
)
def test_a_cost_is_bounded_as_before_its_fast_path(value: object) -> None:
    got, expected = bounds.cost(value), _bounded(value)
    assert str(got) == str(expected) and type(got) is Decimal


@pytest.mark.parametrize(
    "names",
    [
        ("bench", "chat", "gpt-4o", "openai-main", "gpt-4o-2024", "r1"),
        (None, "", None, None, None, ""),
        ("a\x00b", "chat", "m" * 300, "p", "\ud800x", "r1"),
        (7, "chat", 7.5, True, b"m", "r1"),
        (["unhashable"], "chat", {"a": 1}, "p", "m", "r1"),
        (str.__new__(type("Sub", (str,), {}), "bench"), "chat", "m", "p", "m", "r1"),
    ],
)
def test_a_records_names_are_cleaned_the_same_when_remembered(names: tuple[object, ...]) -> None:
    """`fields` remembers the cleaned client, purpose, model, provider, upstream model and
    replica of strings (issue 22): the line is the same the first time and every time after."""
    client, purpose, model, provider, upstream, replica = names
    expected = [text(client), text(purpose) or "-", text(model), text(provider), text(upstream)]
    for _ in range(3):
        values = encoding.fields(
            "id", 0, client, purpose, model, provider, upstream, 200, False, 1, 1.0, None,
            0, 0, 0, 0, 0, Decimal(0), True, False, replica, False,
        )  # fmt: skip
        assert values[3:8] == expected and values[21] == (text(replica) or "-")


@pytest.mark.parametrize(
    ("id_", "ttfb"),
    [
        ("0123456789abcdef0123456789abcdef", 12.345),
        ("", 0.0),
        ("a\x00b", -1.0),
        ("é" * 10, float("nan")),
        ("x" * 300, float("inf")),
        (7, 1e12),
        (None, None),
        (str.__new__(type("Sub", (str,), {}), "req-1"), "12.5"),
        ("req-2", True),
    ],
)
def test_a_records_id_and_ttfb_are_bounded_as_text_and_a_time_are(id_: object, ttfb: object) -> None:
    """`fields` takes an id and a first-byte time that need no cleaning as they are (issue 22, its
    common case inline); any other is what `text` and the bounds of a time make of it."""
    values = encoding.fields(
        id_, 0, "c", "chat", "m", "p", None, 200, False, 1, 1.0, ttfb,
        0, 0, 0, 0, 0, 0, True, False, "r", False,
    )  # fmt: skip
    assert values[1] == (text(id_) or "-") and type(values[1]) is str
    assert values[12] == encoding._float(ttfb) and type(values[12]) is type(encoding._float(ttfb))


def test_a_huge_name_is_cleaned_but_never_remembered() -> None:
    """A client's `model` of megabytes is cut to `TEXT_LIMIT` in the record, and the names
    remembered for the next request are only those kept as they are: 4,096 requests with
    distinct huge names must not hold gigabytes."""
    huge = "m" * (1 << 20)
    values = encoding.fields(
        "id", 0, "c", "chat", huge, "p", None, 200, False, 1, 1.0, None,
        0, 0, 0, 0, 0, Decimal(0), True, False, "r", False,
    )  # fmt: skip
    assert values[5] == "m" * TEXT_LIMIT
    assert not any(huge in key for key in encoding._NAMES)


# -- the cost as plain digits (issue 22) ------------------------------------------------------------


def test_a_cost_in_atto_dollars_is_written_as_plain_digits_within_bounds() -> None:
    """The gateway hands `fields` its cost as an `int` of atto-dollars: written once, as the
    decimal amount of USD it is, held between 0 and `MAX_COST`; a `Decimal` is USD, written the
    same way (no exponent: `1E-13` is `0.0000000000001`)."""
    for amount, written in (
        (750_000_000_000, "0.00000075"),
        (0, "0"),
        (-5, "0"),
        (10**30, "1000000"),
        (Decimal("7.5E-7"), "0.00000075"),
        (Decimal("1E-13"), "0.0000000000001"),
        (Decimal("-0"), "0"),
        (Decimal("1E+40"), "1000000"),
        (True, "0"),
    ):
        values = encoding.fields(
            "id", 0, "c", "chat", "m", "p", None, 200, False, 1, 1.0, None,
            1, 0, 0, 1, 0, amount, True, False, "r", False,
        )  # fmt: skip
        assert values[18] == written == bounds.cost_text(amount)
        assert b"E" not in encoding.dumps(values).split(b",")[18]
        assert encoding.record_of(values).cost_usd == Decimal(written)
        made = encoding.fields(
            "id", 0, "c", "chat", "m", "p", None, 200, False, 1, 1.0, None,
            1, 0, 0, 1, 0, amount, True, False, "r", False, bounds.cost_text(amount),
        )  # fmt: skip
        assert made == values  # the text the gateway made already (its header's) is the same


def test_a_line_of_an_earlier_version_with_an_exponent_is_read_the_same() -> None:
    """Lines written before issue 22 hold `str(Decimal)`: `"7.5E-7"`, `"1E-13"`. They are read
    back as the same record, and stored as the same pico-dollars."""
    for cost_text, pico in (
        ("7.5E-7", 750_000),
        ("1E-13", 0),
        ("6E-13", 1),
        ("0E-18", 0),
        ("2.5E+1", 25 * 10**12),
    ):
        sent = record(cost_usd=Decimal(cost_text))
        values = encoding.values_of(sent)
        values[18] = cost_text  # as the earlier `fields` wrote it
        line = json.dumps(values, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        assert cost_text.encode() in line
        back = decode(line)
        assert back.cost_usd == Decimal(cost_text) and back == sent
        assert encoding.row(encoding.decode_values(line))[17] == pico


@pytest.mark.parametrize(
    "written",
    [
        "0", "1", "0.5", "0.000000000001", "0.0000000000005", "0.0000000000015", "0.0000000000025",
        "0.00000000000050000001", "0.000000000002500000000000001", "123456.123456789012345678",
        "1000000", "7.5E-7", "1E-13", "5E-13", "1.5E-12", "0E-30", "12.", ".5", "0.000000000000499999",
    ],
)  # fmt: skip
def test_a_cost_s_pico_dollars_are_those_of_its_decimal(written: str) -> None:
    """`pico_text` reads plain digits in whole numbers, rounding half to even past 12 decimals
    as `pico` does with the decimal; any other form through `Decimal`."""
    assert bounds.pico_text(written) == bounds.pico(Decimal(written))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10**24 + 10**6))
def test_any_amount_s_text_gives_the_pico_dollars_of_its_decimal(atto: int) -> None:
    written = amount_text(atto)
    assert "E" not in written and Decimal(written) == to_usd(atto)
    assert bounds.pico_text(written) == bounds.pico(to_usd(atto))

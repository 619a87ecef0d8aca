"""The fast path's read of a request head (`FastConnection._head`), by C-level passes over the
whole head and its lines, against the line-by-line loop it replaced (kept here as the reference): for every
head, hostile or ordinary, the same decision (taken or aiohttp's) and the same fields, in order
and case, with the same values."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import httptools
import pytest
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

from service.http import fast
from service.http.fast import _VERSIONS, MAX_FIELD, MAX_HEAD, MAX_HEADERS, FastConnection

MAX_BODY = 1_000_000
_FOLDED = (" ", "\t")
CHAT = "/v1/chat/completions"


def _reference(self: Any) -> Any:
    """`FastConnection._head` as it was before its fields were read by C-level passes (a loop)."""
    pending = self.pending
    if not pending.startswith(b"POST /"):
        return None
    end = pending.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD:
        return None
    lines = pending[:end].decode("utf-8", "surrogateescape").split("\r\n")
    if len(lines) > MAX_HEADERS:
        return None
    first = lines[0].split(" ")
    if len(first) != 3:
        return None
    target, version = first[1], _VERSIONS.get(first[2])
    if version is None or len(target) > MAX_FIELD or "%" in target or "#" in target:
        return None
    found = self.site.endpoints.get(target.partition("?")[0])
    if found is None:
        return None
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if len(line) > MAX_FIELD or line[:1] in _FOLDED:
            return None
        fields.append((name, value.strip(" \t")))
    headers = CIMultiDict(fields)
    if len({*map(str.lower, headers)}) != len(headers):
        return None
    if (
        hdrs.EXPECT in headers
        or hdrs.TRANSFER_ENCODING in headers
        or hdrs.CONTENT_ENCODING in headers
        or hdrs.UPGRADE in headers
        or hdrs.HOST not in headers
    ):
        return None
    length = headers.get(hdrs.CONTENT_LENGTH, "")
    if not (length.isascii() and length.isdigit()) or not 0 < int(length) <= self.site.gateway.max_body_bytes:
        return None
    keep_alive = self.parser.should_keep_alive()
    return found, CIMultiDictProxy(headers), version, keep_alive, end + 4, end + 4 + int(length)


def _connection(pending: bytes) -> Any:
    site = SimpleNamespace(
        endpoints={CHAT: ("chat", "match", "endpoint"), "/v1/embeddings": ("emb", "m", "e")},
        gateway=SimpleNamespace(max_body_bytes=MAX_BODY),
    )
    return SimpleNamespace(
        pending=bytearray(pending), site=site, parser=SimpleNamespace(should_keep_alive=lambda: True)
    )


def _comparable(head: Any) -> Any:
    if head is None:
        return None
    found, headers, version, keep_alive, start, end = head
    assert type(headers) is CIMultiDictProxy
    return found, [*headers.items()], [*map(type, headers.values())], version, keep_alive, start, end


def _same(request: bytes) -> Any:
    new, old = FastConnection._head(_connection(request)), _reference(_connection(request))  # type: ignore[arg-type]
    assert _comparable(new) == _comparable(old), request[:300]
    return new


BASE = [
    "Host: 127.0.0.1:8000",
    "User-Agent: python-requests/2.32",
    "Accept: */*",
    "Authorization: Bearer sk-abc",
    "Content-Type: application/json",
    "Content-Length: 42",
]


def _head(*fields: str, line: str = f"POST {CHAT} HTTP/1.1", base: list[str] | None = None) -> bytes:
    return ("\r\n".join([line, *(BASE if base is None else base), *fields]) + "\r\n\r\n").encode(
        "utf-8", "surrogateescape"
    ) + b"x" * 42


def _raw(*fields: bytes, line: bytes = b"POST " + CHAT.encode() + b" HTTP/1.1") -> bytes:
    return b"\r\n".join([line, *(f.encode() for f in BASE), *fields]) + b"\r\n\r\n"


CASES: dict[str, bytes] = {
    "ordinary": _head(),
    "http-1.0": _head(line=f"POST {CHAT} HTTP/1.0"),
    "http-0.9": _head(line=f"POST {CHAT} HTTP/0.9"),
    "http-2": _head(line=f"POST {CHAT} HTTP/2.0"),
    "http-lower": _head(line=f"POST {CHAT} http/1.1"),
    "get": _head(line=f"GET {CHAT} HTTP/1.1"),
    "post-lower": _head(line=f"post {CHAT} HTTP/1.1"),
    "two-spaces": _head(line=f"POST  {CHAT} HTTP/1.1"),
    "tab-in-line": _head(line=f"POST\t{CHAT} HTTP/1.1"),
    "line-extra": _head(line=f"POST {CHAT} HTTP/1.1 x"),
    "query": _head(line=f"POST {CHAT}?a=b HTTP/1.1"),
    "percent": _head(line="POST /v1/chat%2Fcompletions HTTP/1.1"),
    "fragment": _head(line=f"POST {CHAT}#x HTTP/1.1"),
    "unknown-path": _head(line="POST /v1/other HTTP/1.1"),
    "embeddings": _head(line="POST /v1/embeddings HTTP/1.1"),
    "long-target": _head(line=f"POST {CHAT}?{'a' * MAX_FIELD} HTTP/1.1"),
    "target-at-limit": _head(line=f"POST {CHAT}?{'a' * (MAX_FIELD - len(CHAT) - 1)} HTTP/1.1"),
    "absolute-target": _head(line=f"POST http://h{CHAT} HTTP/1.1"),
    "repeated-host": _head("Host: other"),
    "repeated-case": _head("host: 127.0.0.1:8000"),
    "repeated-length": _head("content-LENGTH: 42"),
    "repeated-other": _head("X-A: 1", "x-a: 2"),
    "repeated-same": _head("X-A: 1", "X-A: 1"),
    "names-differ-in-case-only-once": _head("X-Abc: 1", "X-Abd: 2"),
    "transfer-encoding": _head("Transfer-Encoding: chunked"),
    "transfer-encoding-lower": _head("transfer-encoding: identity"),
    "content-encoding": _head("Content-Encoding: gzip"),
    "expect": _head("Expect: 100-continue"),
    "upgrade": _head("Upgrade: websocket"),
    "no-host": _head(base=BASE[1:]),
    "host-empty": _head(base=["Host:", *BASE[1:]]),
    "no-length": _head(base=BASE[:-1]),
    "length-zero": _head(base=[*BASE[:-1], "Content-Length: 0"]),
    "length-negative": _head(base=[*BASE[:-1], "Content-Length: -1"]),
    "length-plus": _head(base=[*BASE[:-1], "Content-Length: +42"]),
    "length-hex": _head(base=[*BASE[:-1], "Content-Length: 0x2a"]),
    "length-spaces": _head(base=[*BASE[:-1], "Content-Length:   42  \t"]),
    "length-inner-space": _head(base=[*BASE[:-1], "Content-Length: 4 2"]),
    "length-two": _head(base=[*BASE[:-1], "Content-Length: 42, 42"]),
    "length-leading-zeros": _head(base=[*BASE[:-1], "Content-Length: 00042"]),
    "length-too-large": _head(base=[*BASE[:-1], f"Content-Length: {MAX_BODY + 1}"]),
    "length-at-limit": _head(base=[*BASE[:-1], f"Content-Length: {MAX_BODY}"]),
    "length-huge": _head(base=[*BASE[:-1], "Content-Length: " + "9" * 40]),
    "length-unicode-digits": _head(base=[*BASE[:-1], "Content-Length: ٤٢"]),
    "length-superscript": _head(base=[*BASE[:-1], "Content-Length: ²"]),
    "length-empty": _head(base=[*BASE[:-1], "Content-Length:"]),
    "folded": _head("X-A: 1", " continued"),
    "folded-tab": _head("X-A: 1", "\tcontinued"),
    "folded-first": _head(base=[" Host: x", *BASE[1:]]),
    "empty-value": _head("X-Empty:"),
    "empty-value-spaces": _head("X-Empty:   \t "),
    "no-colon": _head("X-NoColon"),
    "empty-name": _head(": value"),
    "colon-in-value": _head("X-Url: http://a:b@c:80/"),
    "colons": _head("X-A:::"),
    "space-before-colon": _head("X-A : 1"),
    "tab-before-colon": _head("X-A\t: 1"),
    "space-in-name": _head("Bad Name: 1"),
    "value-inner-spaces": _head("X-A:  a  b \t c \t "),
    "value-other-whitespace": _head("X-A: \x0ba\x0c \xa0"),
    "value-vtab-only": _head("X-A:\x0b"),
    "utf8-value": _head("X-Name: Zoë ☃"),
    "utf8-name": _head("X-Zoë: 1"),
    "sigma-names": _head("XΣ: 1", "XΣY: 2", "x\u03c3: 3"),
    "kelvin": _head("\u212a: 1", "k: 2"),
    "sharp-s": _head("ß: 1", "SS: 2"),
    "dz": _head("ǅ: 1", "ǆ: 2"),
    "latin-1-value": _raw(b"X-A: caf\xe9", b"X-B: \xff\xfe"),
    "latin-1-name": _raw(b"X-\xe9: 1"),
    "latin-1-names-repeated": _raw(b"X-\xc9: 1", b"x-\xe9: 2"),
    "nul-value": _head("X-A: a\x00b"),
    "nul-name": _head("X-\x00: b"),
    "cr-alone-value": _head("X-A: a\rb"),
    "cr-alone-end": _head("X-A: a\r"),
    "cr-alone-name": _head("X-\rA: 1"),
    "lf-alone-value": _head("X-A: a\nb"),
    "lf-alone-smuggled-field": _head("X-A: a\nTransfer-Encoding: chunked"),
    "lf-alone-smuggled-length": _head("X-A: a\nContent-Length: 5", base=BASE[:-1]),
    "lf-alone-line-end": _head("X-A: 1\nX-B: 2"),
    "lf-alone-folded": _head("X-A: 1\n continued"),
    "lf-in-request-line": _head(line=f"POST {CHAT} HTTP/1.1\nX: y"),
    "crcr": _head("X-A: 1\r\rX-B: 2"),
    "lfcr": _head("X-A: 1\n\rX-B: 2"),
    "cr-before-crlf": _head("X-A: 1\r"),
    "long-field": _head("X-Long: " + "x" * MAX_FIELD),
    "field-at-limit": _head("X-Long: " + "x" * (MAX_FIELD - 8)),
    "field-over-limit": _head("X-Long: " + "x" * (MAX_FIELD - 7)),
    "long-fields-each-under": _head(*(f"X-{i}: " + "x" * 7000 for i in range(3))),
    "long-utf8-field": _head("X-Long: " + "é" * (MAX_FIELD - 8)),
    "long-utf8-field-over": _head("X-Long: " + "é" * (MAX_FIELD - 7)),
    "long-name": _head("X" * (MAX_FIELD + 1) + ": 1"),
    "98-fields": _head(*(f"X-{i}: {i}" for i in range(92))),
    "99-fields": _head(*(f"X-{i}: {i}" for i in range(93))),
    "100-fields": _head(*(f"X-{i}: {i}" for i in range(94))),
    "100-fields-utf8": _head(*(f"X-{i}: é" for i in range(94))),
    "head-too-long": _head(*(f"X-{i}: " + "x" * 7000 for i in range(10))),
    "no-end": _head()[:-50],
    "lf-lf-end": _head().replace(b"\r\n\r\n", b"\n\n"),
    "lone-crlf-end": _head().replace(b"\r\n\r\n", b"\r\n"),
    "empty": b"",
    "leading-empty-line": b"\r\n" + _head(),
    "request-line-only": f"POST {CHAT} HTTP/1.1\r\n\r\n".encode(),
    "pipelined": _head() + _head(),
    "body-with-crlfcrlf": _head(base=[*BASE[:-1], "Content-Length: 8"]) + b"\r\n\r\nabcd",
    "trailing-space-in-name-host": _head(base=["Host : x", *BASE[1:]]),
    "transfer-encoding-space-before-colon": _head("Transfer-Encoding : chunked"),
    "transfer-encoding-tab-before-colon": _head("Transfer-Encoding\t: chunked"),
    "content-length-space-before-colon": _head(base=[*BASE[:-1], "Content-Length : 42"]),
    "host-in-value": _head("X-A: Host: y"),
}


@pytest.mark.parametrize("keys_once", [True, False])
@pytest.mark.parametrize("request_bytes", CASES.values(), ids=CASES.keys())
def test_a_head_is_read_as_the_loop_read_it(
    request_bytes: bytes, keys_once: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And so with a multidict whose keys count a name in two cases twice (`_KEYS_ONCE` off)."""
    monkeypatch.setattr(fast, "_KEYS_ONCE", keys_once)
    _same(request_bytes)


def test_the_multidict_counts_a_name_once_in_its_keys() -> None:
    """What the repeated-field check counts on (multidict 7); without it, the names are lowered."""
    assert fast._KEYS_ONCE
    headers = CIMultiDict([("Host", "a"), ("X-A", "1"), ("host", "b"), ("HOST", "c"), ("x-a", "2")])
    assert (len(headers), len(headers.keys())) == (5, 2)


def test_the_table_holds_heads_taken_and_heads_handed_off() -> None:
    taken = {label for label, request in CASES.items() if _same(request) is not None}
    assert {
        "ordinary",
        "http-1.0",
        "query",
        "utf8-value",
        "latin-1-value",
        "colon-in-value",
        "99-fields",
    } <= taken
    assert not taken & {"100-fields", "repeated-case", "transfer-encoding", "folded", "long-field", "percent"}
    # as before, read as the loop read them: the parser refuses them first (below)
    assert {"lf-alone-smuggled-field", "cr-alone-value", "nul-value", "space-before-colon"} <= taken
    assert len(taken) < len(CASES) / 2


ALPHABET = [
    "a", "B", "x", "-", ":", " ", "\t", "\r", "\n", "\r\n", "\r\n", "\r\n ", "\x00", "é", "Σ", "\udce9",
    "Host", "host", "Content-Length", "content-length", "Transfer-Encoding", "Expect", "Upgrade",
    "Content-Encoding", ": ", ":", "42", "0", "9" * 7, "\x0b",
]  # fmt: skip


@pytest.mark.parametrize("keys_once", [True, False])
def test_random_heads_are_read_as_the_loop_read_them(
    keys_once: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast, "_KEYS_ONCE", keys_once)
    chance = random.Random(20261207)
    taken = 0
    for _ in range(20000):
        fields = []
        for _ in range(chance.randrange(0, 6)):
            fields.append("".join(chance.choice(ALPHABET) for _ in range(chance.randrange(0, 6))))
        if chance.random() < 0.7:
            fields += chance.sample(BASE, chance.randrange(len(BASE) - 2, len(BASE) + 1))
        chance.shuffle(fields)
        taken += _same(_head(*fields, base=[])) is not None
    assert 2000 < taken < 18000  # both decisions, many times over


class _Parsed:
    complete = False

    def on_headers_complete(self) -> None:
        self.complete = True


@pytest.mark.parametrize(
    "label",
    ["nul-value", "cr-alone-value", "lf-alone-value", "lf-alone-smuggled-field", "lf-alone-line-end", "crcr",
     "space-before-colon", "transfer-encoding-space-before-colon", "latin-1-name", "value-vtab-only"],
)  # fmt: skip
def test_the_parser_refuses_what_the_head_read_would_read_oddly(label: str) -> None:
    """`_head` runs from the parser's `on_headers_complete`: these never reach it (aiohttp's)."""
    parsed = _Parsed()
    with pytest.raises(httptools.HttpParserError):
        httptools.HttpRequestParser(parsed).feed_data(CASES[label])
    assert not parsed.complete

"""A whole answer of the fast path (`fast_request.serialized`) against aiohttp's own writing of
it: the same `web.Response` prepared and ended by aiohttp's `Response.prepare` and `write_eof`,
onto a recorder, byte for byte but the `Date` (its second may turn between the two)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

from service.http import fast_request
from service.http.fast_check import Recorder
from service.http.fast_request import FastRequest, Outlet, serialized
from service.metrics import Cuts

RELAYED = {
    "x-switchboard-provider": "upstream",
    "x-switchboard-attempts": "1",
    "X-Content-Type-Options": "nosniff",
    "x-request-id": "req-1",
    "Content-Type": "application/json; charset=utf-8",
    "x-ratelimit-remaining-requests": "998",
}
"""An answer's fields as the relay sets them (before the metering's)."""
BODY = b'{"id": "chatcmpl-1", "choices": []}'


def _request(version: HttpVersion, keep_alive: bool, outlet: Outlet | None = None) -> FastRequest:
    fields = CIMultiDictProxy(CIMultiDict({"Host": "h", "Content-Length": "2"}))
    path, none = "/v1/chat/completions", cast(Any, None)
    return FastRequest(none, path, fields, b"{}", none, version, keep_alive, outlet)


async def _aiohttps(make: Callable[[], web.Response], version: HttpVersion, keep_alive: bool) -> bytes:
    """What aiohttp's own `Response.prepare` and `write_eof` write of `make()`."""
    outlet = Outlet()
    outlet.transport = cast(asyncio.Transport, recorder := Recorder())
    outlet.loop, outlet.blocked, outlet.drained = asyncio.get_running_loop(), False, None
    outlet.send_timeout_s, outlet.cuts = 60.0, Cuts()
    request = _request(version, keep_alive, outlet)
    response = make()
    await response.prepare(cast(web.Request, request))
    await response.write_eof()
    return bytes(recorder.written)


def _dateless(answer: bytes) -> bytes:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = [b"Date: -" if line.startswith(b"Date: ") else line for line in head.split(b"\r\n")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _with(**fields: str) -> Callable[[], web.Response]:
    return lambda: web.Response(body=BODY, headers={**RELAYED, **fields})


def _closed() -> web.Response:
    response = web.Response(body=BODY, headers=RELAYED)
    response.force_close()
    return response


ANSWERS: dict[str, Callable[[], web.Response]] = {
    "relayed": _with(),
    "metered": _with(**{"x-switchboard-cost-usd": "0.00000195", "x-switchboard-remaining-tokens": "99"}),
    "4xx": lambda: web.Response(body=b'{"error": {}}', status=422, headers=RELAYED),
    "5xx": lambda: web.Response(body=b'{"error": {}}', status=502, headers=RELAYED),
    "no content type": lambda: web.Response(body=BODY, headers={"x-a": "1"}),
    "no field": lambda: web.Response(body=BODY),
    "content length": _with(**{"Content-Length": str(len(BODY))}),
    "date": _with(Date="Thu, 01 Jan 1970 00:00:00 GMT"),
    "server": _with(Server="upstream/1"),
    "connection": _with(Connection="keep-alive"),
    "transfer encoding": _with(**{"Transfer-Encoding": "identity"}),
    "a tab": _with(**{"x-a": "a\tb"}),
    "not ascii": _with(**{"x-a": "é ✓ \U0001f600"}),
    "a lone surrogate": _with(**{"x-a": "a\udc80b"}),
    "force closed": _closed,
    "no body": lambda: web.Response(status=200, headers=RELAYED),
    "empty body": lambda: web.Response(body=b"", headers=RELAYED),
    "204": lambda: web.Response(status=204, headers=RELAYED),
    "304": lambda: web.Response(status=304, headers=RELAYED),
    "101": lambda: web.Response(body=BODY, status=101, headers=RELAYED),
    "an unknown status": lambda: web.Response(body=BODY, status=599, headers=RELAYED),
    "a reason": lambda: web.Response(body=BODY, status=200, reason="Fine", headers=RELAYED),
    "a reason not ascii": lambda: web.Response(body=BODY, status=200, reason="Très bien", headers=RELAYED),
}
CONNECTIONS = [(HttpVersion11, True), (HttpVersion11, False), (HttpVersion10, True), (HttpVersion10, False)]


@pytest.mark.parametrize("version, keep_alive", CONNECTIONS)
@pytest.mark.parametrize("label", ANSWERS)
async def test_a_whole_answer_is_what_aiohttp_writes_of_it(
    label: str, version: HttpVersion, keep_alive: bool
) -> None:
    make = ANSWERS[label]
    ours = serialized(_request(version, keep_alive), make())
    assert ours is not None
    assert _dateless(ours) == _dateless(await _aiohttps(make, version, keep_alive)), label


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: x=1", "a\nb", "a\x00b", "a\x7fb", "a\x1bb"])
@pytest.mark.parametrize("where", ["name", "value", "reason"])
async def test_a_control_character_is_refused_as_aiohttp_refuses_it(value: str, where: str) -> None:
    if where == "reason":
        make: Callable[[], web.Response] = lambda: web.Response(body=BODY, reason=value, headers=RELAYED)  # noqa: E731
    else:
        fields = {**RELAYED, **({value: "1"} if where == "name" else {"x-a": value})}
        make = lambda: web.Response(body=BODY, headers=fields)  # noqa: E731
    with pytest.raises(ValueError) as aiohttps:
        await _aiohttps(make, HttpVersion11, True)
    with pytest.raises(ValueError) as ours:
        serialized(_request(HttpVersion11, True), make())
    assert str(ours.value) == str(aiohttps.value)


def test_a_relayed_answer_keeps_its_fields_as_they_were() -> None:
    """The relay's usual answer is written without a field added to its headers (`_plain`)."""
    response = _with()()
    assert serialized(_request(HttpVersion11, True), response) is not None
    assert list(response.headers.items()) == list(RELAYED.items())


def test_status_lines_are_kept_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_request, "_LINES", {})
    request = _request(HttpVersion11, True)
    for n in range(fast_request._MAX_LINES + 10):
        answer = serialized(request, web.Response(body=BODY, reason=f"R{n}", headers=RELAYED))
        assert answer is not None and answer.startswith(f"HTTP/1.1 200 R{n}\r\n".encode())
    assert len(fast_request._LINES) == fast_request._MAX_LINES

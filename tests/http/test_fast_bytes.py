"""The fast path's prepared bytes (`serialized`/`_plain`) are aiohttp's, byte for byte."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

from service.http.fast_request import FastRequest, serialized
from tests.support.upstreams import serving


def _answers() -> list[tuple[str, web.Response]]:
    def r429() -> web.Response:
        return web.Response(
            body=b'{"error":1}',
            status=429,
            headers={
                "Retry-After": "3",
                "retry-after-ms": "3000",
                "x-request-id": "abc",
                "x-switchboard-provider": "p",
                "Content-Type": "application/json",
            },
        )

    def text() -> web.Response:
        return web.json_response({"a": "é"}, status=400, headers={"x-switchboard-attempts": "1"})

    def charset() -> web.Response:
        return web.Response(text="hi", content_type="text/plain", charset="utf-8", status=404)

    def untyped() -> web.Response:
        return web.Response(body=b"raw", status=200, headers={"X-A": "1"})

    def closed() -> web.Response:
        r = web.Response(body=b"{}", status=200, headers={"Content-Type": "application/json"})
        r.force_close()
        return r

    def reason() -> web.Response:
        return web.Response(
            body=b"{}", status=599, reason="Upstream Failed", headers={"Content-Type": "application/json"}
        )

    def odd() -> web.Response:
        return web.Response(
            body=b"{}",
            status=422,
            headers={"content-type": "application/json", "x-ratelimit-remaining-requests": "0"},
        )

    return [
        ("429", r429),
        ("json", text),
        ("charset", charset),
        ("untyped", untyped),
        ("closed", closed),
        ("reason", reason),
        ("odd", odd),
    ]


async def _raw(url: str, version: str, keep: str | None) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST /x HTTP/{version}\r\nHost: localhost\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 2\r\n"
    if keep:
        head += f"Connection: {keep}\r\n"
    writer.write(head.encode() + b"\r\n{}")
    await writer.drain()
    data = b""
    while b"\r\n\r\n" not in data:
        data += await reader.read(65536)
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head_bytes)[1])
    while len(rest) < length:
        rest += await reader.read(65536)
    writer.close()
    return head_bytes + b"\r\n\r\n" + rest


def _undated(data: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"", data)


@pytest.mark.parametrize("name", [name for name, _ in _answers()])
@pytest.mark.parametrize(
    ("version", "keep"), [("1.1", None), ("1.1", "close"), ("1.0", None), ("1.0", "keep-alive")]
)
async def test_a_whole_answer_is_aiohttps_bytes(name: str, version: str, keep: str | None) -> None:
    make = dict(_answers())[name]

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return make()

    app = web.Application()
    app.router.add_post("/x", handler)
    async with serving(app) as url:
        theirs = await _raw(url, version, keep)
    fields = {"Host": "localhost", "Content-Type": "application/json", "Content-Length": "2"}
    if keep:
        fields["Connection"] = keep
    v = HttpVersion11 if version == "1.1" else HttpVersion10
    keep_alive = (keep != "close") if version == "1.1" else (keep == "keep-alive")
    request = FastRequest(app, "/x", CIMultiDictProxy(CIMultiDict(fields)), b"{}", None, v, keep_alive)  # type: ignore[arg-type]
    ours = serialized(request, make())
    assert ours is not None
    assert _undated(ours) == _undated(theirs)

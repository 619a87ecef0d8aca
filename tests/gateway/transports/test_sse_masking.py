"""The key masking of a stream never alters, reorders, loses or delays a normal stream."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from aiohttp import web

from tests.gateway.transports.test_openai import keyed, relaying
from tests.support.gateway import CANARY
from tests.support.upstreams import serving


def _pieces_upstream(pieces: list[bytes], pause: float = 0.003) -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(pause)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    return app


def _ev(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


NORMAL = (
    _ev({"id": "c", "model": "m", "choices": [{"delta": {"content": "this is s"}}]})
    + _ev(
        {
            "id": "c",
            "model": "m",
            "choices": [{"delta": {"content": "sk-can sk- s sk-canary-5e1f0c9a7b3d2e4f6a8"}}],
        }
    )
    + _ev({"id": "c", "model": "m", "choices": [{"delta": {"content": "end s"}, "finish_reason": "stop"}]})
)
USAGE = _ev({"id": "c", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})


def _splits(wire: bytes, rng: random.Random, n: int) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(wire)), n))
    return [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(
    "tail", [b"data: [DONE]\n\n", b"data: [DONE]", b"data: [DONE]\n\ns", b"data: [DONE]\n\nsk-canary-5e"]
)
@pytest.mark.parametrize("client_usage", [True, False])
async def test_a_stream_without_the_key_comes_out_as_it_went_in(
    seed: int, tail: bytes, client_usage: bool
) -> None:
    wire = NORMAL + USAGE + tail
    rng = random.Random(seed)
    pieces = _splits(wire, rng, rng.randint(1, 25))
    body: dict = {"model": "m", "messages": [], "stream": True}
    if client_usage:
        body["stream_options"] = {"include_usage": True}
    async with serving(_pieces_upstream(pieces)) as url, relaying(keyed(f"{url}/v1")) as harness:
        status, _, relayed = await harness.post("/chat/completions", body)
    assert status == 200
    expected = wire if client_usage else wire.replace(USAGE, b"")
    assert relayed == expected, pieces
    assert harness.calls[0].usage == {"prompt_tokens": 3, "completion_tokens": 4}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("client_usage", [True, False])
async def test_a_key_torn_in_three_or_at_the_start_never_reaches_the_client(
    seed: int, client_usage: bool
) -> None:
    key = CANARY.encode()
    wire = (
        key
        + b"\n\n"
        + _ev({"choices": [{"delta": {"content": f"a{CANARY}b{CANARY}"}}]})
        + USAGE
        + b"data: "
        + key
    )
    rng = random.Random(seed)
    pieces = _splits(wire, rng, rng.randint(3, 40))
    body: dict = {"model": "m", "messages": [], "stream": True}
    if client_usage:
        body["stream_options"] = {"include_usage": True}
    async with serving(_pieces_upstream(pieces)) as url, relaying(keyed(f"{url}/v1")) as harness:
        _, _, relayed = await harness.post("/chat/completions", body)
    masked = wire.replace(key, b"****")
    assert key[:12] not in relayed
    assert relayed == (masked if client_usage else masked.replace(USAGE, b"")), pieces

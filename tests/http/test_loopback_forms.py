"""Every legal loopback form of Host passes the 421, on every endpoint, both paths."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import Service

HOSTS = [
    "localhost",
    "localhost.",
    "localhost.:8080",
    "LOCALHOST",
    "LocalHost.:1",
    "127.0.0.1",
    "127.0.0.1:80",
    "[::1]",
    "[::1]:8080",
    "127.0.0.1.",
    "[0:0:0:0:0:0:0:1]:9",
]


async def _raw(service: Service, head: str, body: bytes = b"") -> tuple[int, bytes]:
    port = int(service.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("path", ["/readyz", "/healthz", "/metrics", "/ui/", "/api/v1/llm-config/active"])
async def test_a_loopback_host_is_served_on_get(running_service: Service, host: str, path: str) -> None:
    status, data = await _raw(
        running_service, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    assert status != 421, data[:300]


@pytest.mark.parametrize("host", HOSTS)
async def test_a_loopback_host_is_served_on_the_fast_path(running_service: Service, host: str) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    status, data = await _raw(running_service, head, body)
    assert status != 421, data[:300]


@pytest.mark.parametrize("path", ["/readyz", "/healthz"])
async def test_an_http_1_0_probe_without_host_is_served(running_service: Service, path: str) -> None:
    """HTTP/1.0 has no Host: a probe (`printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080`)
    reaches the service only from where it listens (loopback)."""
    status, data = await _raw(running_service, f"GET {path} HTTP/1.0\r\n\r\n")
    assert status != 421, data[:300]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ),
        (
            "POST",
            "/v1/messages",
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("POST", "/v1/embeddings", {"input": "x"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/chat/completions", None),
        ("OPTIONS", "/v1/chat/completions", None),
        ("POST", "/v1/chat/completions", "not json"),
        ("PUT", "/readyz", None),
    ],
)
async def test_another_host_is_421_on_the_gateways_endpoints(
    running_service: Service, method: str, path: str, body: object
) -> None:
    raw = b"" if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
    head = f"{method} {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
    if method == "OPTIONS":
        head += "Origin: http://evil.example\r\nAccess-Control-Request-Method: POST\r\n"
    status, data = await _raw(running_service, head + "\r\n", raw)
    assert status == 421, data[:400]

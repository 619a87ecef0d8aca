"""The server's own answers to what it refuses before any route (service/http/malformed.py):
shaped by the path of the request line that came, as the app reads that path."""

from __future__ import annotations

import pytest

from service.http.malformed import path_of


@pytest.mark.parametrize(
    ("start", "path"),
    [
        (b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: x\r\n", "/v1/messages"),
        (b"POST /v1/%6Dessages HTTP/1.1\r\n", "/v1/messages"),  # the app decodes it so
        (b"POST http://host:8080/v1/messages?x=1 HTTP/1.1\r\n", "/v1/messages"),  # absolute form
        (b"POST https://host HTTP/1.1\r\n", "/"),
        (b"POST /v1/messagesX HTTP/1.1\r\n", "/v1/messagesX"),
        (b"POST /v1/mess", ""),  # its target has not ended
        (b"OPTIONS * HTTP/1.1\r\n", "*"),
    ],
)
def test_the_path_is_the_one_the_app_routes_by(start: bytes, path: str) -> None:
    assert path_of(start) == path

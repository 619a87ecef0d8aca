"""A request aiohttp's parser refuses (a NUL or a line break in a header, a line over 8190
bytes, a request line that is not HTTP): answered as every error is, and logged as one line.

aiohttp answers such a request itself, before any handler or middleware sees it
(`RequestHandler.handle_error`): a `text/plain` body quoting the bytes it could not parse, an
`Authorization` header's token among them. Here the answer is the service's JSON error
(`{"error": {"type", "message"}}`, `X-Content-Type-Options: nosniff`, the connection closed)
whose message names the fault, never the bytes; the log's line says the same (`ProtocolLog`).
Each such answer is `refused`: the connection (`connections.Handler`) counts it in the metrics.

When the refused request's line came (its connection kept its first bytes: `path`), the answer
is `shaped` as the app's errors are: in Anthropic's shape on its Messages paths, with the
gateway's headers on a gateway path (docs/reference.md §14). So is the receive timeout's 408.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from service.errors import BadRequest, HTTPError, PayloadTooLarge
from service.gateway.account import REQUEST_ID
from service.gateway.call import ATTEMPTS_HEADER, PROVIDER_HEADER
from service.gateway.protocols import messages
from service.gateway.relay import NO_PROVIDER

NOSNIFF = {"X-Content-Type-Options": "nosniff"}
_ERRORS: dict[int, type[HTTPError]] = {400: BadRequest, 413: PayloadTooLarge}
GATEWAY = "/v1/"
"""The gateway's paths: every answer there carries the gateway's headers, the router's too."""
MESSAGES = "/v1/messages"
"""Anthropic's Messages paths begin so: their errors come in Anthropic's shape."""


def path_of(start: bytes) -> str:
    """The path of the request line `start` begins with (empty while its target has not ended),
    as the app routes by it: percent-decoded, an absolute-form target's (`http://host/v1/...`)."""
    parts = start.lstrip(b"\r\n").split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) != 3:
        return ""
    target = parts[1].split(b"?", 1)[0]
    scheme, found, rest = target.partition(b"://")
    if found and not scheme.startswith(b"/"):  # absolute form: its path follows the authority
        target = b"/" + rest.partition(b"/")[2]
    return unquote_to_bytes(target).decode("utf-8", "replace")


def on_path(path: str, status: int, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """An error's `body` (answered `status`) and the headers it adds, as answered on `path`: on
    the gateway's paths with the gateway's headers (no provider, no attempt, a new
    `x-request-id`: every gateway answer has one, docs/reference.md §13), on Anthropic's
    Messages paths in Anthropic's shape, what ours adds (attempts, limits...) kept beside the
    message (docs/reference.md §7, §14). The app's errors (`middleware.failure_answer`) and the
    server's own (`shaped`) alike."""
    if not path.startswith(GATEWAY):
        return body, {}
    if path == MESSAGES or path.startswith(MESSAGES + "/"):
        error = body["error"]
        extra = {k: v for k, v in error.items() if k not in ("type", "message")}
        body = messages.error(status, error["message"], **extra)
    return body, {PROVIDER_HEADER: NO_PROVIDER, ATTEMPTS_HEADER: "0", REQUEST_ID: uuid.uuid4().hex}


def shaped(error: HTTPError, status: int, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and headers of `error` (answered `status`) when the server answers it itself on
    `path` (empty when unknown), as the app answers its own errors (`on_path`)."""
    return on_path(path, status, error.body())


class JsonErrors(RequestHandler):
    """aiohttp's connection whose own answers to what it cannot parse are JSON errors, each one
    `refused`."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own first: its log (through `ProtocolLog`), and its refusal once some of an
        # answer went out already (the connection is broken then)
        super().handle_error(request, status, exc, message)
        if isinstance(exc, HttpProcessingError):
            error = _ERRORS.get(status, BadRequest)(f"malformed request: {fault(exc)}")
            self.refused()
        else:
            error = HTTPError("the request could not be answered")
        body, headers = shaped(error, status, self.path())
        answer = web.json_response(body, status=status, headers={**headers, **NOSNIFF})
        answer.force_close()
        return answer

    def path(self) -> str:
        """The path of the request it refused, when its request line came (`connections.Handler`)."""
        return ""

    def refused(self) -> None:
        """A request the parser refused is answered (its connection closed after): nothing to
        do here; `connections.Handler` counts it (`switchboard_http_cut_total{reason="malformed"}`)."""


class ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log, where a request too malformed to parse (a NUL or a line break in a
    header, a line too long) is one warning line, not a traceback: the client's mistake, not the
    service's. Its text names the fault, never the bytes, which may hold a token.

    So is a body aiohttp could not decode (`Content-Encoding: gzip` that is not), found once its
    request was answered without it (aiohttp reads what is left of it, and logs what stops that as
    an unhandled exception); and a request line that is not HTTP at all, which aiohttp logs at
    debug level only, its traceback quoting the line."""

    def exception(self, msg: object, *args: object, exc_info: object = True, **kwargs: Any) -> None:
        malformed = _malformed(exc_info)
        if malformed is not None:
            self.warning(*_line(malformed, args))
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]

    def debug(self, msg: object, *args: object, exc_info: object = None, **kwargs: Any) -> None:
        malformed = _malformed(exc_info)
        if malformed is not None:
            super().debug(*_line(malformed, args))
            return
        super().debug(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]


def _malformed(exc: object) -> HttpProcessingError | None:
    """The parser's error that `exc` is, or that made it (a body's `RequestPayloadError`)."""
    if isinstance(exc, web.RequestPayloadError):
        exc = exc.__cause__
    return exc if isinstance(exc, HttpProcessingError) else None


def _line(exc: HttpProcessingError, args: tuple[object, ...]) -> tuple[object, ...]:
    """The log line of a malformed request: its client's address (aiohttp's first argument, when
    it gives one), and its fault."""
    remote = args[0] if args else "?"
    return "malformed request from %s: %s (%s)", remote, fault(exc), exc.code


def fault(exc: HttpProcessingError) -> str:
    """What the parser found wrong, without what it quotes: `Invalid header value char`."""
    lines = str(exc.message).strip().splitlines()
    said = lines[0].split(":", 1)[0] if lines else ""
    for quote in (" b'", ' b"', " '", ' "'):
        said = said.split(quote, 1)[0]
    return f"{type(exc).__name__}: {said[:100]}" if said else type(exc).__name__

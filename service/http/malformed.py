"""A request aiohttp's parser refuses (a NUL or a line break in a header, a line over 8190
bytes, a request line that is not HTTP): answered as every error is, and logged as one line.

aiohttp answers such a request itself, before any handler or middleware sees it
(`RequestHandler.handle_error`): a `text/plain` body quoting the bytes it could not parse, an
`Authorization` header's token among them. Here the answer is the service's JSON error
(`{"error": {"type", "message"}}`, `X-Content-Type-Options: nosniff`, the connection closed)
whose message names the fault, never the bytes; the log's line says the same (`ProtocolLog`).
Each such answer is `refused`: the connection (`stalls.Handler`) counts it in the metrics.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from service.errors import BadRequest, HTTPError, PayloadTooLarge

NOSNIFF = {"X-Content-Type-Options": "nosniff"}
_ERRORS: dict[int, type[HTTPError]] = {400: BadRequest, 413: PayloadTooLarge}


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
        answer = web.json_response(error.body(), status=status, headers=NOSNIFF)
        answer.force_close()
        return answer

    def refused(self) -> None:
        """A request the parser refused is answered (its connection closed after): nothing to
        do here; `stalls.Handler` counts it (`switchboard_http_cut_total{reason="malformed"}`)."""


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

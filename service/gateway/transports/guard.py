"""What keeps upstream connections where the configuration says (docs/reference.md §7).

Two rules hold for every request the upstream session makes (the gateway's, the health
checks', the models lists', and litellm's through `transports.bridge`):

- **No redirect is followed.** A 3xx is an answer. aiohttp drops only `Authorization` when
  a redirect leaves the origin, so following one would carry `x-api-key` or
  `x-goog-api-key` to whatever host the upstream names. Every call passes
  `allow_redirects=False`; a redirect about to be followed all the same (a call that
  forgot it) is stopped by `refuse_redirects`, before anything is sent to the new host.
- **Only allowed addresses are connected to** (`SWITCHBOARD_ALLOWED_UPSTREAMS`,
  `config.upstreams`). `GuardedResolver` filters what a name resolves to, at connect time,
  so a name cannot be re-pointed past the rule; `check_literal` refuses an address written
  in the URL itself, which aiohttp connects to without asking the resolver. A refused
  connection fails at once, as a connection error whose reason names the setting.

The gateway's own requests to OpenAI-protocol upstreams (`transports.openai`, every request
of a busy gateway) hold both rules without the session at all: they go through
`transports.wire`, whose pool resolves names with the session's own `GuardedResolver` and
follows no redirect, and the host of each provider's URL is checked once per version of its
file, with `literal_refusal`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
from collections.abc import Callable
from types import SimpleNamespace

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from service.config.upstreams import (
    LINK_LOCAL,
    SETTING,
    UNLISTED,
    AllowedUpstreams,
    Lookup,
    address,
    numeric_spelling,
    system_lookup,
)

_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_LEGACY = "the upstream's host spells an address in a legacy form (write it in dotted decimal)"


def _refused(why: str) -> str:
    """A refusal as attempts and checks report it: naming the setting, and no address (a client
    may read it in a 502, and what a provider's host resolves to is not the client's to learn)."""
    return f"refused by {SETTING}: {why}"


class UpstreamRefused(OSError):
    """A connection the allowed upstreams refuse; its `strerror` says why, naming the setting."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, reason)


class RedirectRefused(aiohttp.ClientError):
    """A redirect was about to be followed: none is (docs/reference.md §7)."""


class GuardedResolver(AbstractResolver):
    """Resolves a name with `lookup` (off the loop) and keeps only the addresses `allowed` lets
    it reach; `UpstreamRefused` when none is left."""

    def __init__(self, allowed: AllowedUpstreams, lookup: Lookup = system_lookup) -> None:
        self.allowed = allowed
        self.lookup = lookup

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if numeric_spelling(host):
            raise UpstreamRefused(_refused(_LEGACY))
        found = await asyncio.to_thread(self.lookup, host)
        results: list[ResolveResult] = []
        refusal = None
        for text in found:
            parsed = address(text)
            reason = self.allowed.refusal(parsed, host) if parsed is not None else UNLISTED
            if reason is not None:
                refusal = LINK_LOCAL if LINK_LOCAL in (refusal, reason) else reason
                continue
            kind = socket.AF_INET6 if ":" in text else socket.AF_INET
            if family not in (socket.AF_UNSPEC, kind):
                continue
            results.append(
                ResolveResult(hostname=host, host=text, port=port, family=kind, proto=0, flags=_NUMERIC)
            )
        if not results:
            if refusal is not None:
                raise UpstreamRefused(_refused(f"the upstream's address is {refusal}"))
            raise OSError(errno.EHOSTUNREACH, "the upstream's name resolves to no address")
        return results

    async def close(self) -> None:
        """Nothing to release: lookups run in worker threads."""


def literal_refusal(allowed: AllowedUpstreams) -> Callable[[str], str | None]:
    """Why a URL whose host (`URL.raw_host`) is an address written out (`169.254.169.254`,
    `[::ffff:a9fe:a9fe]`, `2852039166`) is refused, or None: aiohttp connects to those without
    asking the resolver. A name is None here: the resolver checks what it resolves to."""

    @functools.lru_cache(maxsize=4096)  # a few hosts, asked on every request: read each once
    def refusal(host: str) -> str | None:
        if numeric_spelling(host):
            return _refused(_LEGACY)
        found = address(host)
        why = allowed.refusal(found) if found is not None else None
        return _refused(f"the upstream's address is {why}") if why else None

    return refusal


def check_literal(allowed: AllowedUpstreams) -> aiohttp.ClientMiddlewareType:
    """A session middleware refusing, before any connection, a URL whose host is an address the
    allowed upstreams refuse (`literal_refusal`)."""
    refusal = literal_refusal(allowed)

    async def guard(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        reason = refusal(request.url.raw_host or "")
        if reason is not None:
            raise aiohttp.ClientConnectorDNSError(request.connection_key, UpstreamRefused(reason))
        return await handler(request)

    return guard


def refuse_redirects() -> aiohttp.TraceConfig:
    """A trace that stops any redirect before it is followed (`RedirectRefused`)."""

    async def on_redirect(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestRedirectParams
    ) -> None:
        raise RedirectRefused(f"the upstream answered {params.response.status}, a redirect: not followed")

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(on_redirect)
    return trace


def refusal_of(exc: BaseException) -> str | None:
    """The reason of an `UpstreamRefused` somewhere in `exc`'s chain (None when there is none)."""
    current: BaseException | None = exc
    for _ in range(16):
        if current is None:
            return None
        if isinstance(current, UpstreamRefused):
            return current.strerror
        if isinstance(current, aiohttp.ClientConnectorError) and isinstance(
            current.os_error, UpstreamRefused
        ):
            return current.os_error.strerror
        current = current.__cause__ or current.__context__
    return None

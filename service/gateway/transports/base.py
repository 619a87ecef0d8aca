"""The interface every transport implements, and what they share: the pooled session, errors.

A transport takes one `Call` to one provider and relays the answer to the client. It builds
the upstream request itself, from the provider's file alone (URL, key, timeouts): routing
only chooses which provider, and the client's body never chooses where it goes or with
which credentials. A failure the next candidate may fix raises `Failure`, as long as nothing
has reached the client.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from service.config.models import Provider
from service.config.secret import Secret
from service.gateway.call import Call

CONNECTIONS_PER_HOST = 1024
"""Connections open at once to one upstream (host and port); more wait for one to free up.

The limit is per upstream, with none across them: a client holding an upstream's every
connection with slow streams makes that upstream's requests wait, never another's (a pool
shared by all would let one slow vendor starve every provider, and open their circuits)."""


class Transport(abc.ABC):
    """One way of relaying a request to a provider (OpenAI's protocol, litellm, TEI...)."""

    @abc.abstractmethod
    async def send(self, call: Call, provider: Provider, headers: dict[str, str]) -> web.StreamResponse:
        """Relay `call` to `provider`; `headers` go on the answer. Raises `Failure` to move on."""


def open_session() -> aiohttp.ClientSession:
    """The pooled client session for upstream calls (call inside a running loop)."""
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=CONNECTIONS_PER_HOST,
        ttl_dns_cache=300,
        keepalive_timeout=60,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
        trust_env=False,
    )


def sendable_key(provider: Provider) -> str | None:
    """The provider's decrypted key as it can go in a header (None without one).

    Surrounding whitespace (a newline pasted with the key) is removed; a key that still holds
    a control character cannot be sent (aiohttp refuses it as header injection) and raises
    `ValueError`, so the provider fails instead of the request.
    """
    key = provider.api_key
    if not isinstance(key, Secret):
        return None
    value = key.reveal().strip()
    if not value.isprintable():
        raise ValueError("the provider's key holds a control character; fix its file")
    return value


_PASSED_BACK = frozenset(("x-request-id", "retry-after"))


def pass_back(upstream: Mapping[str, str], headers: dict[str, str]) -> None:
    """Copy the upstream's `x-request-id`, `retry-after` and `x-ratelimit-*` onto the answer
    (docs/reference.md §7)."""
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _PASSED_BACK or lower.startswith("x-ratelimit-"):
            headers[lower] = value


class TooLarge(Exception):
    """An upstream's answer is over the limit of what is read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer over {limit} bytes")
        self.limit = limit


async def read_within(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The rest of `response`'s body, or `TooLarge` as soon as it passes `limit` bytes."""
    if response.content_length is not None:
        if response.content_length > limit:
            raise TooLarge(limit)
        if "Content-Encoding" not in response.headers:  # compressed, it may inflate past `limit`
            return await response.read()  # aiohttp reads no more than the length it was given
    content = response.content
    chunks = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def describe_error(exc: BaseException) -> str:
    """A short reason for an attempt list: the kind of failure, never a URL's credentials or a key."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the upstream closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the upstream broke off its answer"
    return type(exc).__name__

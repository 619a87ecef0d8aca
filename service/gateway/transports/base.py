"""The interface every transport implements, and what they share: the pooled session, errors.

A transport takes one `Call` to one provider and relays the answer to the client. It builds
the upstream request itself, from the provider's file alone (URL, key, timeouts): routing
only chooses which provider, and the client's body never chooses where it goes or with
which credentials. A failure the next candidate may fix raises `Failure`, as long as nothing
has reached the client.
"""

from __future__ import annotations

import abc
import email.utils
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import BytesPayload

from service.config.models import Provider
from service.config.secret import Secret
from service.config.upstreams import AllowedUpstreams, Lookup, system_lookup
from service.gateway.call import Call
from service.gateway.transports.errors import TooLarge, WireError
from service.gateway.transports.guard import (
    GuardedResolver,
    RedirectRefused,
    UpstreamRefused,
    check_literal,
    refuse_redirects,
)
from service.gateway.transports.wire import Pool

__all__ = ["TooLarge"]  # the answer's bound is the same on both clients

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


def open_session(
    allowed: AllowedUpstreams | None = None, lookup: Lookup = system_lookup
) -> aiohttp.ClientSession:
    """The pooled client session for upstream calls (call inside a running loop).

    Its connections reach only what `allowed` lets them (SWITCHBOARD_ALLOWED_UPSTREAMS, checked
    on the addresses `lookup` resolves names to, at connect time), and it follows no redirect
    (`transports.guard`); every call passes `allow_redirects=False` as well.
    """
    allowed = allowed or AllowedUpstreams()
    connector = _Connector(
        resolver=GuardedResolver(allowed, lookup),
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
        middlewares=(check_literal(allowed),),
        trace_configs=[refuse_redirects()],
    )


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, owning the direct path's `wire.Pool` on the same guarded resolver;
    closing the session closes both."""

    def __init__(self, *, resolver: GuardedResolver, **options: Any) -> None:
        super().__init__(resolver=resolver, **options)
        self.wire = Pool(resolver, CONNECTIONS_PER_HOST)

    async def close(self, *, abort_ssl: bool = False) -> None:
        self.wire.close()
        await super().close(abort_ssl=abort_ssl)


def wire_pool(session: aiohttp.ClientSession) -> Pool:
    """The direct path's connections beside `session`'s (`open_session`'s only): the same
    resolver (SWITCHBOARD_ALLOWED_UPSTREAMS after DNS), closed when `session` is."""
    connector = session.connector
    if not isinstance(connector, _Connector):
        raise TypeError("the session was not opened by open_session")
    return connector.wire


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


class Delivered(BytesPayload):
    """A request's body that marks its call `delivered` once the whole of it is written to the
    upstream's connection: the upstream has the request, and may bill it from then on.

    aiohttp wraps a body of bytes in a `BytesPayload` anyway; this one only adds the mark."""

    def __init__(self, body: bytes, call: Call) -> None:
        super().__init__(body, content_type="application/json")
        self._call = call

    async def write(self, writer: AbstractStreamWriter) -> None:
        await super().write(writer)
        self._call.delivered = True

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        await super().write_with_length(writer, content_length)
        self._call.delivered = True


MIN_REFLECTED = 8
"""A key shorter than this is a placeholder (`EMPTY`, `ollama`, `none`: what a local server
takes or ignores), not a secret: an answer is not searched for it, since masking a common word
would change what a model wrote (docs/reference.md §2.4)."""


def reflected(key: str | None) -> str:
    """The provider's key as looked for in what its upstream sends back: empty for none or a
    placeholder shorter than `MIN_REFLECTED`."""
    return key if key is not None and len(key) >= MIN_REFLECTED else ""


def masked(data: bytes, key: bytes) -> bytes:
    """`data` from an upstream with the provider's `key` (as `reflected` gives it; empty: none)
    replaced by `****` (docs/reference.md §2.4). One search (a memmem) when there is a key."""
    return data.replace(key, b"****") if key and key in data else data


_PASSED_BACK = frozenset(("x-request-id", "request-id", "retry-after", "retry-after-ms"))
_MAX_REQUEST_ID = 128


def sane_request_id(value: str) -> bool:
    """Whether an upstream's request id may name the answer and its ledger record: 1 to 128
    visible ASCII characters, `[!-~]{1,128}` (a longer or stranger one keeps the gateway's own
    id). Three string tests: a third of the regular expression's time."""
    return 0 < len(value) <= _MAX_REQUEST_ID and value.isascii() and value.isprintable() and " " not in value


def pass_back(
    upstream: Mapping[str, str],
    headers: dict[str, str],
    key: str = "",
    said: Callable[[str], bool] | None = None,
) -> None:
    """Copy the upstream's `x-request-id`, `retry-after` and `x-ratelimit-*` onto the answer
    (docs/reference.md §7), `retry-after` with its `retry-after-ms` (`retry_after`). Anthropic names its
    request id `request-id`: passed back as `x-request-id`, as litellm's answers from it are,
    when the upstream sent no `x-request-id`.

    A header whose value holds the provider's `key` (an upstream that reflects the request's
    headers) is not passed back (docs/reference.md §2.4): an `x-request-id` holding it leaves
    the gateway's own id on the answer, and on its ledger record. Nor is an `x-request-id` the
    client's request holds (`said`: `Call.said`, as it is or as its JSON escaped it): a word of the
    prompt reflected would name the record, which holds no prompt (docs/reference.md §13).

    The upstream's header names are in lower case, as `response.Response.headers` keeps them."""
    for name, value in upstream.items():
        if name in _PASSED_BACK or name.startswith("x-ratelimit-"):
            if key and key in value:
                continue
            if name == "request-id":
                if "x-request-id" in upstream:
                    continue
                name = "x-request-id"
            if name == "x-request-id" and (not sane_request_id(value) or (said is not None and said(value))):
                continue
            headers[name] = value
    if "retry-after" in headers or "retry-after-ms" in headers:
        retry_after(headers)


_MAX_RETRY_MS = 10**12


def retry_after(headers: dict[str, str]) -> None:
    """Make an upstream's `retry-after` and `retry-after-ms` a pair (docs/reference.md §13.3):
    `retry-after-ms` is a whole number, sent exactly when `Retry-After` is. One the upstream did
    not send is derived from the other (seconds, or an HTTP date, as milliseconds from now); a
    pair that says no time is dropped."""
    seconds = headers.pop("retry-after", "").strip()
    given = headers.pop("retry-after-ms", "").strip()
    # ASCII digits only: str.isdigit takes a superscript two (which int refuses) and an Arabic-Indic
    # five (which it reads as 5)
    ms = int(given) if given.isascii() and given.isdigit() and len(given) <= 12 else None
    if seconds.isascii() and seconds.isdigit() and len(seconds) <= 9:
        headers["retry-after"] = seconds
        headers["retry-after-ms"] = str(ms if ms is not None else int(seconds) * 1000)
        return
    if seconds and ms is None:
        try:  # a year or a zone too large to hold is OverflowError: no time said, as garbage
            when = email.utils.parsedate_to_datetime(seconds)
            if when.tzinfo is None:
                return
            ms = max(0, min(_MAX_RETRY_MS, int((when.timestamp() - time.time()) * 1000 + 0.999)))
        except (TypeError, ValueError, IndexError, OverflowError):
            return
    if ms is None:
        return
    headers["retry-after"] = seconds if seconds else str(-(-ms // 1000))
    headers["retry-after-ms"] = str(ms)


def wait_ms(upstream: Mapping[str, str]) -> int | None:
    """The milliseconds an upstream's `retry-after` (or `retry-after-ms`) asks a client to wait,
    read as `retry_after` reads them; None when it says no time. Names in lower case."""
    given = {name: upstream[name] for name in ("retry-after", "retry-after-ms") if name in upstream}
    if not given:
        return None
    retry_after(given)
    ms = given.get("retry-after-ms")
    return int(ms) if ms is not None else None


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
    if isinstance(exc, WireError):
        return str(exc)
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, UpstreamRefused):
        return str(exc.os_error.strerror)
    if isinstance(exc, RedirectRefused):
        return str(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the upstream closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the upstream broke off its answer"
    return type(exc).__name__

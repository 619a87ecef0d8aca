"""The direct path: requests relayed to upstreams that speak OpenAI's HTTP API.

Upstream calls go over the lean client of `transports.wire`: kept-alive HTTP/1.1 connections
pooled beside the app's `aiohttp.ClientSession`, on the same guarded resolver and closed with
it (`base.wire_pool`); aiohttp's client cost about a third of the loop's time per request. The client's body
goes out as the same bytes unless the provider renames the model (`model_map`) or a stream
is asked for its usage (below); the URL and headers come from the provider's file alone.
The answer comes back as it arrives: a JSON answer is read whole, within
`SWITCHBOARD_MAX_UPSTREAM_BYTES` (it is needed whole for its `usage`, and one write is the
fastest answer), an event stream is relayed chunk by chunk as it is read. Nothing here
imports litellm.

Every stream is counted (docs/reference.md §7): a client that did not ask for
`stream_options.include_usage` gets it asked for on its behalf, and the usage-only chunk is
dropped before it reaches the client. An upstream that refuses `stream_options` with a 400
is asked again without them, and once that worked it is not asked again.

Timeouts follow the kind of request (docs/reference.md §2.1). Connecting is bounded by
`connect_timeout_s`. A non-streaming request has `timeout_s` for its whole answer, which
comes at the end of the generation: no first-byte limit applies to it. A stream has no
total limit: its first body byte must come within `first_byte_timeout_s` (so a stalled
upstream falls back), then each chunk within `idle_timeout_s` of the last, or the stream
ends with an error event.

An attempt that fails in a way the next candidate may fix (no connection, a timeout, 408,
429, 5xx, a redirect, and 401 or 403: the provider's key refused) raises `Failure`, as long
as nothing has reached the client. Other answers are the client's, sent as they are. No
redirect is followed (docs/reference.md §7): the provider's key goes to its `base_url` and nowhere else.

The same path carries requests in the other protocols to providers that speak them natively
(docs/reference.md §14): Responses and legacy completions to `{base_url}/responses`, `/completions`, and
Messages to `{base_url}/messages`, or for an Anthropic provider, whose `base_url` is the API
root, to `{base_url}/v1/messages` with the key as `x-api-key`. A 404 there, from a provider
that speaks the protocol only by default, raises `NotSpoken` unless it names the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from yarl import URL

from service.config.models import Provider
from service.config.upstreams import AllowedUpstreams
from service.gateway.call import VIA_HEADER, Call, Failure, NotSpoken, falls_back
from service.gateway.protocols import usage as usages
from service.gateway.transports.base import (
    TooLarge,
    Transport,
    masked,
    pass_back,
    reflected,
    sendable_key,
    wait_ms,
    wire_pool,
)
from service.gateway.transports.errors import WireError
from service.gateway.transports.guard import literal_refusal
from service.gateway.transports.response import Response
from service.gateway.transports.scan import find_model, find_usage
from service.gateway.transports.sse import relay_events
from service.gateway.transports.wire import ConnectTimeout, Endpoint

_SSE = "text/event-stream"
_BODILESS = (204, 205)
"""2xx statuses whose answer has no body (RFC 9110 §15.3.5, §15.3.6): never relayed as a
stream, whose events (a translator's, an error event) would follow the head as the client's
next answer."""
MAX_PATHS = 64
"""Parsed URLs kept per upstream (the protocols' paths are a handful)."""
ANTHROPIC_VERSION = "2023-06-01"
"""Sent to Anthropic when the client names no `anthropic-version`."""


@dataclass(slots=True, eq=False)
class Upstream:
    """A provider made ready to receive requests: URL, headers and timeouts computed once."""

    provider: Provider
    base: str
    headers: Mapping[str, str]
    timeout_s: float
    """Non-streaming requests: the whole answer, connecting included."""
    connect_s: float
    """Connecting (streams: their first byte and silences are timed as they are read)."""
    first_byte_s: float
    idle_s: float
    names_models: bool
    """The provider declares no models: the metrics label tokens with the model answers name."""
    unusable: str | None = None
    """Why no request can be sent to this provider as its file stands (a key that is no header)."""
    stream_options: bool = True
    """The upstream takes `stream_options`; False once it refused them (400) and took the request without."""
    key: bytes = b""
    """The key as sent, to mask in an answer that echoes it (docs/reference.md §2.4); empty
    without one."""
    key_text: str = ""
    """`key` as text: a passed-back header holding it is dropped (`base.pass_back`)."""

    urls: dict[str, Endpoint] = field(default_factory=dict)
    """Path or URL -> where it is sent, parsed once."""

    @classmethod
    def of(
        cls, provider: Provider, via: str = "", refusal: Callable[[str], str | None] | None = None
    ) -> Upstream:
        """`provider` made ready; `refusal` (`guard.literal_refusal`) makes one whose URL's host
        is an address the allowed upstreams refuse unusable, with the reason it gives."""
        headers = {"Content-Type": "application/json"}
        if via:
            headers[VIA_HEADER] = via
        unusable = None
        try:
            key = sendable_key(provider)
        except ValueError as exc:
            key, unusable = None, str(exc)
        base = provider.endpoint.rstrip("/")
        if refusal is not None and unusable is None:
            try:
                unusable = refusal(URL(base).raw_host or "")
            except ValueError:  # not a URL: aiohttp's own error says so when it is sent
                unusable = None
        if provider.label == "anthropic" and provider.kind == "api_key":  # the API root: /v1 is ours
            base += "/v1"
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if key is not None:
                headers["x-api-key"] = key
        elif key is not None:
            headers["Authorization"] = f"Bearer {key}"
        connect = provider.connect_timeout_s
        return cls(
            provider=provider,
            base=base,
            headers=headers,
            timeout_s=provider.timeout_s,
            connect_s=connect,
            first_byte_s=provider.first_byte_timeout_s,
            idle_s=provider.idle_timeout_s,
            names_models=not provider.models,
            unusable=unusable,
            key=reflected(key).encode(),
            key_text=reflected(key),
        )

    def url(self, path: str) -> Endpoint:
        """Where `path` under the provider's base goes, with the head of a request sending the
        provider's `headers` (both made once per path); a whole URL (starting with `http`) is
        taken as it is."""
        found = self.urls.get(path)
        if found is None:
            endpoint = Endpoint.of(URL(path if path.startswith("http") else self.base + path))
            found = endpoint.with_headers(self.headers)
            if len(self.urls) < MAX_PATHS:
                self.urls[path] = found
        return found

    def masked(self, body: bytes) -> bytes:
        """`body` to relay: an answer of any status that echoes the provider's key (some servers
        quote the request's headers, in an error or a 200) has it replaced by `****`; it is the
        client's to read, not the key. One search of the body (a memmem) when there is a key."""
        return masked(body, self.key)

    def pass_back(
        self, upstream: Mapping[str, str], headers: dict[str, str], said: Callable[[str], bool]
    ) -> None:
        """The upstream's `Content-Type` (the key masked in it) and the headers `base.pass_back`
        passes back, none holding the key (nor a request id the client's request holds: `said`),
        onto the answer's `headers`."""
        content_type = upstream.get("Content-Type", "application/json")
        key = self.key_text
        if key and key in content_type:
            content_type = content_type.replace(key, "****")
        headers["Content-Type"] = content_type
        pass_back(upstream, headers, key, said)

    def __repr__(self) -> str:  # the headers hold the key
        return f"Upstream({self.provider.id!r})"


class OpenAITransport(Transport):
    """Forwards to providers that speak OpenAI's HTTP API, over `transports.wire`.

    Its connections are pooled beside `session`'s, on its guarded resolver (`base.wire_pool`);
    no redirect is followed, and each provider's host is checked against `allowed` once per
    version of its file (`guard.literal_refusal`)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        max_bytes: int = 64 << 20,
        via: str = "",
        allowed: AllowedUpstreams | None = None,
    ) -> None:
        self.pool = wire_pool(session)
        self.refusal = literal_refusal(allowed or AllowedUpstreams())
        self.max_bytes = max_bytes
        """The largest non-streamed answer read (`SWITCHBOARD_MAX_UPSTREAM_BYTES`); larger ones fail."""
        self.via = via
        """This gateway's token in `x-switchboard-via` (empty: none sent)."""
        self._upstreams: dict[str, Upstream] = {}
        """Provider id -> its prepared upstream, rebuilt when the provider object changes."""

    def upstream(self, provider: Provider) -> Upstream:
        """The prepared URL, headers and timeouts of `provider` (built once per version of its file)."""
        found = self._upstreams.get(provider.id)
        if found is None or found.provider is not provider:
            found = self._upstreams[provider.id] = Upstream.of(provider, self.via, self.refusal)
        return found

    async def send(self, call: Call, provider: Provider, headers: dict[str, str]) -> web.StreamResponse:
        """Send `call` to `provider` and relay its answer; raises `Failure` to move on."""
        target = self.upstream(provider)
        if target.unusable is not None:
            raise Failure(None, target.unusable)
        if call.stream:
            return await self._send_stream(call, target, headers)
        response, body = await self.exchange(call, target, call.path, call.body_for(provider))
        status = response.status
        if status == 404:
            _check_spoken(call, provider, body)
        if status < 300:
            call.usage = usages.as_chat(call.upstream_protocol, find_usage(body))
            if (target.names_models or call.trace_headers is not None) and call.usage is not None:
                call.answer_model = find_model(body)
        target.pass_back(response.headers, headers, call.said)
        return web.Response(body=body, status=status, headers=headers)

    async def exchange(self, call: Call, target: Upstream, path: str, body: bytes) -> tuple[Response, bytes]:
        """POST `body` to `path` under the provider's base (or a whole URL) and read the whole
        answer, within `timeout_s` and `max_bytes`.

        Returns the (read) response and its body; raises `Failure` to move on.
        """
        loop = self.pool.loop
        started = loop.time()
        deadline = started + target.timeout_s  # the whole exchange's, each wait bounded by it
        response: Response | None = None
        try:
            response = await self.pool.post(
                target.url(path),
                self._headers(call, target),
                body,
                connect_s=target.connect_s,
                deadline=deadline,
                sent=call,
                limit=self.max_bytes,
            )
            status = call.upstream_status = response.status
            if status >= 300 and falls_back(status):  # no status under 300 falls back
                raise Failure.of_status(status, wait_ms(response.headers))
            call.first_byte_s = loop.time() - started
            answer = await response.read(self.max_bytes, deadline)
        except TimeoutError as exc:
            _close(response)
            raise Failure(
                None, _timed_out(exc, target, f"no whole answer within {target.timeout_s:g} s")
            ) from None
        except TooLarge as exc:
            _close(response)
            raise Failure(None, str(exc)) from None
        except WireError as exc:
            _close(response)
            raise Failure(None, str(exc) if response is None else f"answer cut short: {exc}") from None
        except BaseException:
            _close(response)
            raise
        return response, target.masked(answer)

    async def _send_stream(self, call: Call, target: Upstream, headers: dict[str, str]) -> web.StreamResponse:
        loop = self.pool.loop
        started = loop.time()
        provider = target.provider
        # Every stream is counted: ask for its usage chunk, which the client did not ask for.
        asked = (
            not call.wants_usage
            and target.stream_options
            and call.purpose == "chat"
            and call.upstream_protocol in ("chat", "completions")
        )
        response: Response | None = None
        sent = self._headers(call, target)
        deadline = started + target.first_byte_s  # the first byte's, the second asking's too
        try:
            endpoint = target.url(call.path)  # an Unsendable URL is a failure like any other
            body = call.body_asking_usage(provider) if asked else call.body_for(provider)
            response = await self.pool.post(
                endpoint, sent, body, connect_s=target.connect_s, deadline=deadline, sent=call
            )
            status = call.upstream_status = response.status
            if status == 400 and asked:  # maybe `stream_options` itself: ask again without
                response.close()
                response = None
                call.delivered, call.upstream_status = False, None
                response = await self.pool.post(
                    endpoint,
                    sent,
                    call.body_for(provider),
                    connect_s=target.connect_s,
                    deadline=deadline,
                    sent=call,
                )
                status = call.upstream_status = response.status
                asked = False
                if status < 400:
                    target.stream_options = False
            if falls_back(status):
                raise Failure.of_status(status, wait_ms(response.headers))
            first = await response.readany(deadline=deadline)
        except TimeoutError as exc:
            _close(response)
            raise Failure(
                None, _timed_out(exc, target, f"no first byte within {target.first_byte_s:g} s")
            ) from None
        except WireError as exc:
            _close(response)
            raise Failure(None, str(exc)) from None
        except BaseException:
            _close(response)
            raise
        call.first_byte_s = loop.time() - started
        content_type = response.headers.get("Content-Type", "application/json")
        # a media type's name is not case-sensitive (RFC 9110 §8.3.1): `Text/Event-Stream` too
        is_stream = status < 300 and content_type[: len(_SSE)].lower() == _SSE and status not in _BODILESS
        if is_stream and not first:  # ended before its first byte: nothing sent yet, fall back
            response.close()
            raise Failure(None, "the stream ended before its first event")
        target.pass_back(response.headers, headers, call.said)
        if is_stream:
            return await relay_events(
                call,
                response,
                first,
                headers,
                target.idle_s,
                drop_usage=asked,
                name_model=target.names_models or call.trace_headers is not None,  # a span names it
                translator=call.translation.stream() if call.translation is not None else None,
                key=target.key,
            )
        # Not a stream after all (an error, or a server that ignores `stream`): read it whole.
        try:  # the wire bounds the whole answer, `first` too
            body = first + await response.read(self.max_bytes, loop.time() + target.idle_s)
            if len(body) > self.max_bytes:  # inflated past the bound
                raise TooLarge(self.max_bytes)
        except TooLarge as exc:
            response.close()
            raise Failure(None, str(exc)) from None
        except (WireError, TimeoutError) as exc:
            response.close()
            reason = f"no chunk within {target.idle_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            raise Failure(None, f"answer cut short: {reason}") from None
        except BaseException:
            response.close()
            raise
        body = target.masked(body)  # before the model it names is read: a label, a span's attribute
        if status == 404:
            _check_spoken(call, provider, body)
        if status < 300:
            call.usage = usages.as_chat(call.upstream_protocol, find_usage(body))
            if (target.names_models or call.trace_headers is not None) and call.usage is not None:
                call.answer_model = find_model(body)
        return web.Response(body=body, status=status, headers=headers)

    def _headers(self, call: Call, target: Upstream) -> Mapping[str, str]:
        """The upstream request's headers: the provider's, the protocol's the client sent (a
        native request), and the gateways it went through."""
        headers = {**call.protocol_headers, **target.headers} if call.protocol_headers else target.headers
        if "anthropic-version" in call.protocol_headers:  # the client's version wins over the default
            headers = {**headers, "anthropic-version": call.protocol_headers["anthropic-version"]}
        if call.trace_headers is not None:  # tracing on (docs/reference.md §14): the attempt's `traceparent`
            headers = {**headers, **call.trace_headers}
        inbound = call.request.headers.get(VIA_HEADER)
        if not inbound or not self.via:
            return headers
        return {**headers, VIA_HEADER: f"{inbound[:1000]}, {self.via}"}


def _check_spoken(call: Call, provider: Provider, body: bytes) -> None:
    """A 404 on a native request's path from a provider that speaks its protocol only by
    default: `NotSpoken`, unless the answer names the model (a model the server does not have
    is the client's error, returned as it is)."""
    if not call.by_default:
        return
    model = provider.upstream_model(call.model) if call.model else None
    if model and model.encode() in body:
        return
    raise NotSpoken(call.upstream_protocol, call.path)


def _timed_out(exc: TimeoutError, target: Upstream, otherwise: str) -> str:
    """Why an attempt timed out: connecting, or `otherwise` (the answer was too slow)."""
    if isinstance(exc, ConnectTimeout):
        return f"no connection within {target.connect_s:g} s"
    return otherwise


def _close(response: Response | None) -> None:
    if response is not None:
        response.close()

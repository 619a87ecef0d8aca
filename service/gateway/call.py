"""One client request on its way through the gateway, and how an attempt at it fails.

A `Call` is parsed once (its `model` and `stream`), then handed to one transport after
another until one answers. An attempt that fails in a way the next candidate may fix raises
`Failure`, as long as nothing has reached the client.

A call keeps the client's request in its protocol (`protocol`: chat, messages, responses,
completions, count_tokens). Before each attempt the gateway sets what is sent (`path`,
`body`, `data`, `upstream_protocol`): the request as it is, to a provider that speaks its
protocol, or translated to chat, with the `translation` that turns the answer back
(service/gateway/forms.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from service.config.models import Provider
from service.errors import BadRequest
from service.gateway.protocols.translation import Translation

PROVIDER_HEADER = "x-switchboard-provider"
ATTEMPTS_HEADER = "x-switchboard-attempts"
VIA_HEADER = "x-switchboard-via"
"""On requests forwarded directly: the gateways they went through, each by its random token,
so that a request that comes back (a `base_url` that points at the service) is refused."""


def came_back(via: str | None, token: str) -> bool:
    """Whether a request whose `x-switchboard-via` is `via` already went through gateway `token`."""
    return via is not None and token in (hop.strip() for hop in via.split(","))


class Failure(Exception):
    """An attempt failed before anything reached the client; the next candidate may serve.

    `blames_provider` is False when the provider was never reached (litellm could not translate
    the request): the next candidate is tried, but the provider's circuit does not hear of it,
    or a client could open the circuit of a healthy provider with a few malformed requests.
    """

    def __init__(
        self, status: int | None, reason: str, *, blames_provider: bool = True, wait_ms: int | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.blames_provider = blames_provider
        self.wait_ms = wait_ms
        """How long the upstream asked to be left alone (its `retry-after`), if it said."""
        super().__init__(reason)

    @classmethod
    def of_status(cls, status: int, wait_ms: int | None = None) -> Failure:
        """The failure an upstream's status means (one that `falls_back`); `wait_ms`, what its
        `retry-after` asked."""
        if refused(status):
            return cls(status, f"HTTP {status}: the upstream refused the provider's key")
        if redirect(status):
            return cls(status, f"HTTP {status}: a redirect, not followed")
        return cls(status, f"HTTP {status}", wait_ms=wait_ms)

    @property
    def refused(self) -> bool:
        """The upstream refused the provider's key: its circuit opens at once (docs/reference.md §7)."""
        return self.status is not None and refused(self.status)


class NotSpoken(Failure):
    """A 404 for a protocol's path that the provider speaks only by default (docs/reference.md §14): it does
    not speak it. The provider is skipped for the request, and remembered."""

    def __init__(self, protocol: str, path: str) -> None:
        super().__init__(404, f"does not speak {protocol} (404 at {path}); remembered", blames_provider=False)
        self.protocol = protocol


class NotTranslated(Failure):
    """litellm could not make the request its provider's (a field of the wrong kind, a `tools` of
    another shape), before anything was sent: not the provider's failure. When no candidate
    could take the request for this, it is the client's to mend: 400 (docs/reference.md §14)."""

    def __init__(self, cause: str) -> None:
        super().__init__(None, f"litellm could not translate the request ({cause})", blames_provider=False)


def retryable(status: int) -> bool:
    """Statuses the upstream may answer otherwise next time (docs/reference.md §7): 408, 429 and 5xx."""
    return status >= 500 or status in (408, 429)


def refused(status: int) -> bool:
    """401 and 403: the upstream refused the provider's own key, which the client cannot fix."""
    return status in (401, 403)


def redirect(status: int) -> bool:
    """3xx: an answer that names another place. None is followed (docs/reference.md §7): the provider's key
    goes only to its `base_url`, so for a request it is a failure of the provider."""
    return 300 <= status < 400


def falls_back(status: int) -> bool:
    """Statuses that move on to the next candidate: `retryable`, `refused` and `redirect` ones."""
    return status >= 500 or status in (401, 403, 408, 429) or 300 <= status < 400


class Call:
    """One client request being relayed: what every attempt needs, and what it learned."""

    __slots__ = (
        "_answer_model",
        "body",
        "broken",
        "by_default",
        "chat",
        "client",
        "client_body",
        "client_data",
        "data",
        "delivered",
        "first_byte_s",
        "metered",
        "model",
        "path",
        "pinned",
        "prepared",
        "protocol",
        "protocol_headers",
        "purpose",
        "request",
        "stream",
        "trace_headers",
        "translation",
        "upstream_protocol",
        "upstream_status",
        "usage",
        "wants_usage",
    )

    def __init__(
        self,
        request: web.Request,
        purpose: str,
        path: str,
        body: bytes,
        data: dict[str, Any],
        client: str = "anonymous",
        protocol: str = "chat",
    ) -> None:
        self.request = request
        self.client = client
        """The calling client's name, for the token metrics."""
        self.purpose = purpose
        self.path = path
        self.body = body
        self.data = data
        model = data.get("model")
        self.model: str | None = model if isinstance(model, str) else None
        self.stream = data.get("stream") is True
        self.wants_usage = False
        """The client asked for a stream's usage chunk (`stream_options.include_usage`)."""
        if self.stream:
            options = data.get("stream_options")
            self.wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.usage: dict[str, Any] | None = None
        self._answer_model: str | None = None
        self.broken: str | None = None
        """Why a stream ended early, after its first byte reached the client."""
        self.first_byte_s = 0.0
        self.delivered = False
        """The upstream has this attempt's whole request (written to its connection): from here on
        it may bill it, so a client that leaves is charged (docs/reference.md §13.2)."""
        self.upstream_status: int | None = None
        """The status this attempt's upstream answered with (None: no answer yet)."""
        self.prepared: web.StreamResponse | None = None
        """A stream's answer once its status and headers went to the client (None: not yet)."""
        self.protocol = protocol
        """The client's protocol: chat, messages, responses, completions, count_tokens."""
        self.client_body, self.client_data = body, data
        self.upstream_protocol = protocol
        """The protocol this attempt speaks to its upstream: the client's, or chat."""
        self.translation: Translation | None = None
        """How this attempt's answer becomes the client's (None: it goes as it is)."""
        self.by_default = False
        """This attempt goes natively to a provider that speaks the protocol only by default."""
        self.protocol_headers: dict[str, str] = {}
        """The client's protocol headers a native request keeps (`anthropic-version`...)."""
        self.chat: tuple[bytes, dict[str, Any]] | None = None
        """The request translated to chat, once translated (it is the same for every provider)."""
        self.pinned: str | None = None
        """`previous_response_id`: the provider that gave it serves the call, or none does."""
        self.metered = protocol != "count_tokens"
        """Whether the call is a completion to meter (a token count is not)."""
        self.trace_headers: dict[str, str] | None = None
        """With tracing on, the trace context this attempt sends upstream (`traceparent`,
        `tracestate`); None when tracing is off."""

    @property
    def answer_model(self) -> str | None:
        """The model the upstream's answer names (read only where the metrics and spans need it)."""
        return self._answer_model

    @answer_model.setter
    def answer_model(self, name: str | None) -> None:
        # A name the client's body holds, but the model it asked for, is its own words reflected
        # (a prompt), not a model's name: it would label the metrics and the spans (docs/reference.md §14).
        if name is not None and name != self.model and self.said(name):
            name = None
        self._answer_model = name

    def said(self, text: str) -> bool:
        """Whether the client's request holds `text` (its own words, when an upstream reflects
        them): in its bytes as they are, or in its strings as JSON reads them, whatever its
        encoder escaped (.NET's `\\u0027`, Go's `\\u003c`, anyone's `\\"`)."""
        return _quoted(text, self.client_body, self.client_data)

    def body_for(self, provider: Provider) -> bytes:
        """The bytes to send `provider`: the client's own, unless the provider renames the model."""
        model = self.model
        if model is None or model not in provider.model_map:
            return self.body
        return _encode({**self.data, "model": provider.model_map[model]})

    def send_as(self, path: str, body: bytes, data: dict[str, Any], upstream_protocol: str) -> None:
        """What the next attempt sends: `body` (parsed: `data`) to the upstream's `path`."""
        self.path, self.body, self.data, self.upstream_protocol = path, body, data, upstream_protocol

    def body_asking_usage(self, provider: Provider) -> bytes:
        """`body_for(provider)`, with `stream_options.include_usage` set so that a stream can be counted.

        Without `stream_options` and a model to rename (a stream's usual case), the member is
        put after the client's own bytes: the same object to the upstream, without encoding
        the whole body again before the first byte (a long conversation is tens of kilobytes,
        whose encoding takes longer than the gateway's own work on a request). Last, as the
        encoding put it: a parser that reads several names as one field (Go's, without case)
        keeps the last, so a client's `"STREAM_OPTIONS"` cannot override it.
        """
        data = dict(self.data)
        model = self.model
        renamed = model is not None and model in provider.model_map
        if not renamed and "stream_options" not in data and data:
            spliced = _with_member(self.body, _ASKING_USAGE)
            if spliced is not None:
                return spliced
        if renamed and model is not None:
            data["model"] = provider.model_map[model]
        options = data.get("stream_options")
        data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return _encode(data)


def _quoted(text: str, body: bytes, data: Any) -> bool:
    """Whether `body`, parsed as `data`, holds `text`. One search of the bytes (a memmem; a lone
    surrogate, `\\ud800` in an answer's JSON, looked for as the bytes Python would write for it);
    when `text` has a character some encoder escapes and the body escapes any, its strings are
    searched as JSON reads them."""
    if text.encode("utf-8", "surrogatepass") in body:
        return True
    if _UNESCAPED.fullmatch(text) is not None or b"\\" not in body:
        return False  # no encoder spells such text otherwise; a body without a backslash escapes nothing
    if _UNESCAPED.fullmatch(text.replace("/", "")) is not None:  # a model's path: `\\/` is PHP's spelling
        return text.replace("/", "\\/").encode() in body
    found: list[Any] = [data]
    while found:  # a loop, not a recursion: the body may be nested as deep as the parser allows
        value = found.pop()
        if isinstance(value, str):
            if text in value:
                return True
        elif isinstance(value, dict):
            found += value
            found += value.values()
        elif isinstance(value, list):
            found += value
    return False


_UNESCAPED = re.compile(r"[ !#$%()*,\-.0-9:;?@A-Z\[\]^_a-z{|}~]*")
"""Text no JSON encoder escapes: ASCII letters, digits and punctuation but `"`, `\\` and `/`, and
`<>&'+=` and the backtick, which the HTML-safe ones (Go's, .NET's, Gson's) write as `\\u003c`... A client that
escapes a letter hides its own prompt from itself alone."""


_ASKING_USAGE = b'"stream_options":{"include_usage":true}'
_SPACE = b" \t\n\r"  # JSON's whitespace
_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
"""A lone surrogate's bytes, which json reads (`surrogatepass`) but which are no UTF-8."""


def _with_member(body: bytes, member: bytes) -> bytes | None:
    """`body`, a JSON object with at least one member, with `member` (`"key":value`) last;
    None when `body` is not UTF-8 text that closes the object at its end (UTF-16 or 32, a
    BOM, a lone surrogate's bytes: encoded again, those go out as UTF-8)."""
    text = body.rstrip(_SPACE)
    if text[-1:] != b"}" or json.detect_encoding(body[:4]) != "utf-8":
        return None
    if b"\xed" in text and _SURROGATE.search(text) is not None:  # \xed also leads Hangul syllables
        return None
    return b"".join((memoryview(text)[:-1], b",", member, b"}"))


def encode(data: dict[str, Any]) -> bytes:
    """`data` as a request body (400 when it is nested too deep to encode)."""
    return _encode(data)


def _encode(data: dict[str, Any]) -> bytes:
    try:
        try:
            return json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate (`"\ud800"`) parses, but is no UTF-8
            return json.dumps(data).encode()
    except RecursionError:  # parsed near the stack's limit, encoded a little deeper
        raise BadRequest("the body is JSON nested too deep") from None


MAX_ANSWER_MODELS = 100
"""Distinct models per provider that name a metric label when the provider declares none."""
MAX_MODEL_LABEL = 200
"""A longer model name is labelled `other`."""


def encodable(text: str) -> bool:
    """Whether UTF-8 can encode `text`: a lone surrogate (`"\\ud800"` in an answer's JSON)
    parses, but is no UTF-8; kept as a metric label it would fail every later scrape of
    `/metrics`, as a span's attribute every export."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def model_label(provider: Provider, model: str | None) -> str:
    """The model as a metric label for a provider that declares its models: as named, when listed."""
    if model is not None and (model in provider.models or model in provider.model_map):
        return model
    return "other"

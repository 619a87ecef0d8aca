"""One client request on its way through the gateway, and how an attempt at it fails.

A `Call` is parsed once (its `model` and `stream`), then handed to one transport after
another until one answers. An attempt that fails in a way the next candidate may fix raises
`Failure`, as long as nothing has reached the client.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from service.config.models import Provider
from service.errors import BadRequest

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

    def __init__(self, status: int | None, reason: str, *, blames_provider: bool = True) -> None:
        self.status = status
        self.reason = reason
        self.blames_provider = blames_provider
        super().__init__(reason)

    @classmethod
    def of_status(cls, status: int) -> Failure:
        """The failure an upstream's status means (one that `falls_back`)."""
        if refused(status):
            return cls(status, f"HTTP {status}: the upstream refused the provider's key")
        return cls(status, f"HTTP {status}")

    @property
    def refused(self) -> bool:
        """The upstream refused the provider's key: its circuit opens at once (docs/reference.md §7)."""
        return self.status is not None and refused(self.status)


def retryable(status: int) -> bool:
    """Statuses the upstream may answer otherwise next time (docs/reference.md §7): 408, 429 and 5xx."""
    return status >= 500 or status in (408, 429)


def refused(status: int) -> bool:
    """401 and 403: the upstream refused the provider's own key, which the client cannot fix."""
    return status in (401, 403)


def falls_back(status: int) -> bool:
    """Statuses that move on to the next candidate: `retryable` ones and `refused` ones."""
    return status >= 500 or status in (401, 403, 408, 429)


class Call:
    """One client request being relayed: what every attempt needs, and what it learned."""

    __slots__ = (
        "answer_model",
        "body",
        "broken",
        "client",
        "data",
        "first_byte_s",
        "model",
        "path",
        "purpose",
        "request",
        "stream",
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
        self.answer_model: str | None = None
        """The model the upstream's answer names (read only where the metrics need it)."""
        self.broken: str | None = None
        """Why a stream ended early, after its first byte reached the client."""
        self.first_byte_s = 0.0

    def body_for(self, provider: Provider) -> bytes:
        """The bytes to send `provider`: the client's own, unless the provider renames the model."""
        model = self.model
        if model is None or model not in provider.model_map:
            return self.body
        return _encode({**self.data, "model": provider.model_map[model]})

    def body_asking_usage(self, provider: Provider) -> bytes:
        """`body_for(provider)`, with `stream_options.include_usage` set so that a stream can be counted."""
        data = dict(self.data)
        model = self.model
        if model is not None and model in provider.model_map:
            data["model"] = provider.model_map[model]
        options = data.get("stream_options")
        data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
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


def model_label(provider: Provider, model: str | None) -> str:
    """The model as a metric label for a provider that declares its models: as named, when listed."""
    if model is not None and (model in provider.models or model in provider.model_map):
        return model
    return "other"

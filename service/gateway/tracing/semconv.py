"""The names OpenTelemetry's GenAI semantic conventions give, and a gateway request mapped onto them.

Spans and metrics hold what a request *is* (operation, models, provider, host, token counts,
statuses), never what it *says*: no prompt, completion, tool argument, header or key is an
attribute. Values a client or an upstream chooses (the model names) are cut to a length, and
as metric attributes bounded in number, so that no client can grow the metrics.

Besides the conventions' own attributes, Switchboard's are under `switchboard.`:
`switchboard.client.name` (the calling client, by its name in the clients file),
`switchboard.provider.id`, `switchboard.protocol` (the client's), `switchboard.upstream.protocol`
(what the attempt spoke), `switchboard.attempt` (its number) and `switchboard.attempts` (how
many a request made), `switchboard.failure.reason` (why an attempt failed, as the 502's list
says it), `switchboard.estimated` (a token count answered by a local estimate).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from service.gateway.call import encodable

OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_STREAM = "gen_ai.request.stream"
RESPONSE_MODEL = "gen_ai.response.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TOKEN_TYPE = "gen_ai.token.type"  # noqa: S105  (a name, not a secret)
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
HTTP_STATUS = "http.response.status_code"

CLIENT = "switchboard.client.name"
PROVIDER_ID = "switchboard.provider.id"
PROTOCOL = "switchboard.protocol"
UPSTREAM_PROTOCOL = "switchboard.upstream.protocol"
ATTEMPT = "switchboard.attempt"
ATTEMPTS = "switchboard.attempts"
FAILURE = "switchboard.failure.reason"
ESTIMATED = "switchboard.estimated"

TOKEN_USAGE = "gen_ai.client.token.usage"  # noqa: S105
OPERATION_DURATION = "gen_ai.client.operation.duration"
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
"""The conventions' bucket boundaries of `gen_ai.client.token.usage`."""
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
"""The conventions' bucket boundaries of `gen_ai.client.operation.duration`, in seconds."""

MAX_VALUE = 256
"""A longer model name (a client's choice) is cut to this many characters in a span."""
MAX_REASON = 500
"""A longer failure reason is cut to this many characters."""

_PROVIDER_NAMES = {"mistral": "mistral_ai", "xai": "x_ai", "gemini": "gcp.gemini"}
"""Switchboard's vendor names that the conventions spell otherwise; the others are the same
(`openai`, `anthropic`, `cohere`, `groq`, `deepseek`, `perplexity`) or have no well-known
value, and keep their own name, as do server types (`vllm`, `ollama`...)."""


def operation(purpose: str, protocol: str) -> str:
    """`gen_ai.operation.name` of a request: `chat` (Chat Completions, Messages, Responses),
    `text_completion` (legacy completions), `embeddings`; `rerank` and `count_tokens`, which
    the conventions do not name, as themselves."""
    if protocol == "completions":
        return "text_completion"
    if protocol == "count_tokens":
        return "count_tokens"
    if purpose == "embeddings":
        return "embeddings"
    if purpose == "reranking":
        return "rerank"
    return "chat"


def provider_name(label: str) -> str:
    """`gen_ai.provider.name` of a provider, from its vendor or server type."""
    return _PROVIDER_NAMES.get(label, label)


def server(endpoint: str) -> tuple[str, int] | None:
    """`server.address` and `server.port` of a base URL: its host alone, never its userinfo,
    path or query (which may hold credentials); None when it has no host."""
    try:
        parts = urlsplit(endpoint)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return host, port if port is not None else 443 if parts.scheme == "https" else 80


def cut(value: str, limit: int = MAX_VALUE) -> str:
    """`value`, at most `limit` characters long, in characters UTF-8 can encode (a lone
    surrogate, which no exporter can, is `?`: the SDK would drop the attribute and log it)."""
    if len(value) > limit:
        value = value[:limit]
    return value if encodable(value) else value.encode(errors="replace").decode()


class Bounded:
    """Metric attribute values that the configuration does not fix (a requested model, the
    model an answer names): the first `limit` distinct ones as they are, then `other`."""

    OTHER = "other"

    def __init__(self, limit: int = 100, longest: int = 200) -> None:
        self.limit = limit
        self.longest = longest
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if value is None or len(value) > self.longest:
            return self.OTHER
        seen = self._seen
        if value not in seen:
            if len(seen) >= self.limit or not encodable(value):
                return self.OTHER  # a lone surrogate, kept, would fail every export of the metric
            seen.add(value)
        return value

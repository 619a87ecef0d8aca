"""An upstream's `usage`, normalised into `Tokens` so that each token is counted once (docs/reference.md §13).

The protocols count differently:

- OpenAI's Chat Completions (and every server that copies it): `prompt_tokens` include the
  cached ones (`prompt_tokens_details.cached_tokens`; DeepSeek's `prompt_cache_hit_tokens`),
  `completion_tokens` include the reasoning ones (`completion_tokens_details.reasoning_tokens`).
  litellm adds Anthropic's `cache_creation_input_tokens` beside them, inside `prompt_tokens`.
- OpenAI's Responses: `input_tokens` include the cached ones (`input_tokens_details`),
  `output_tokens` include reasoning (`output_tokens_details`).
- Anthropic's Messages: `input_tokens` exclude cache reads (`cache_read_input_tokens`) and
  cache writes (`cache_creation_input_tokens`); `output_tokens` are every output token.
- A rerank's `{"total_tokens"}` alone (Jina, Infinity) is all input; its `search_units` (what
  Cohere bills, `meta.billed_units`) are the queries a per-query price multiplies (`queries`).

A count that is missing, not a whole number, negative or a boolean is 0 (a hostile upstream
can make a request cost nothing it did not also report, but never raise); one larger than
`MAX_TOKENS` is taken as `MAX_TOKENS`. An explicit 0 is a zero, not a missing value: only
`None` (no usage at all) means the answer did not say.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.usage.record import Tokens

MAX_TOKENS = 10**12
"""No class of one request counts more (a reported 10**30 would overflow every counter)."""
DOCUMENTS_PER_QUERY = 100
"""A rerank query as the vendors that price queries bill it (Cohere's search unit, Bedrock's and
Vertex's query): one query of up to 100 documents."""


def normalise(usage: Mapping[str, Any] | None) -> Tokens | None:
    """`usage` as `Tokens` (None when there is no usage object to read)."""
    if not isinstance(usage, Mapping):
        return None
    size = len(usage)
    if size == 2 or (size == 3 and "total_tokens" in usage):
        # the common plain answer: {"prompt_tokens", "completion_tokens"[, "total_tokens"]}, nothing else
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and type(completion) is int and 0 <= prompt <= MAX_TOKENS >= completion >= 0:
            return Tokens(input=prompt, output=completion)
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return _chat(usage)
    if "input_tokens" in usage or "output_tokens" in usage:
        if "input_tokens_details" in usage or "output_tokens_details" in usage:
            return _responses(usage)
        return _messages(usage)
    if "total_tokens" in usage:
        return Tokens(input=_count(usage, "total_tokens"))
    return Tokens()


def queries(usage: Mapping[str, Any] | None) -> int:
    """The rerank queries an answer's usage says were billed (`search_units`), else one, as
    litellm prices them."""
    return max(1, _count(usage, "search_units")) if isinstance(usage, Mapping) else 1


def queries_asked(data: Mapping[str, Any]) -> int:
    """The rerank queries a request may be billed as: one for each 100 of its `documents`, at
    least one (a bound of its cost)."""
    documents = data.get("documents")
    count = len(documents) if isinstance(documents, list) else 0
    return max(1, -(-count // DOCUMENTS_PER_QUERY))


def _chat(usage: Mapping[str, Any]) -> Tokens:
    prompt = _count(usage, "prompt_tokens")
    cached = _count(_details(usage, "prompt_tokens_details"), "cached_tokens") or _count(
        usage, "prompt_cache_hit_tokens"
    )
    written = _count(usage, "cache_creation_input_tokens")
    cached = min(cached, prompt)
    written = min(written, prompt - cached)
    completion = _count(usage, "completion_tokens")
    reasoning = min(_count(_details(usage, "completion_tokens_details"), "reasoning_tokens"), completion)
    return Tokens(prompt - cached - written, cached, written, completion, reasoning)


def _responses(usage: Mapping[str, Any]) -> Tokens:
    prompt = _count(usage, "input_tokens")
    cached = min(_count(_details(usage, "input_tokens_details"), "cached_tokens"), prompt)
    output = _count(usage, "output_tokens")
    reasoning = min(_count(_details(usage, "output_tokens_details"), "reasoning_tokens"), output)
    return Tokens(prompt - cached, cached, 0, output, reasoning)


def _messages(usage: Mapping[str, Any]) -> Tokens:
    return Tokens(
        input=_count(usage, "input_tokens"),
        cached_input=_count(usage, "cache_read_input_tokens"),
        cache_write=_count(usage, "cache_creation_input_tokens"),
        output=_count(usage, "output_tokens"),
    )


def _details(usage: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    details = usage.get(name)
    return details if isinstance(details, Mapping) else {}


def _count(usage: Mapping[str, Any], name: str) -> int:
    value = usage.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return min(value, MAX_TOKENS)

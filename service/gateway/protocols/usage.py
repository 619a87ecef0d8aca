"""Usage between the protocols' shapes.

The gateway keeps a call's usage in Chat Completions' shape (`prompt_tokens` counting every
input token, cached ones in `prompt_tokens_details.cached_tokens`, cache writes as litellm
names them, `cache_creation_input_tokens`; `completion_tokens` counting reasoning tokens, in
`completion_tokens_details.reasoning_tokens`), whatever protocol the upstream answered in, so
that metering reads one shape. These functions go from each protocol's shape to it and back.
Counts that are not whole numbers (a hostile upstream) read as 0.
"""

from __future__ import annotations

from typing import Any


def count(value: object) -> int:
    """A token count: a non-negative whole number, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _details(usage: dict[str, Any], name: str, key: str) -> int:
    details = usage.get(name)
    return count(details.get(key)) if isinstance(details, dict) else 0


def from_messages(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's usage (`input_tokens` excludes cache reads and writes) in chat's shape."""
    cached = count(usage.get("cache_read_input_tokens"))
    writes = count(usage.get("cache_creation_input_tokens"))
    prompt = count(usage.get("input_tokens")) + cached + writes
    completion = count(usage.get("output_tokens"))
    chat: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if writes:
        chat["cache_creation_input_tokens"] = writes
    return chat


def from_responses(usage: dict[str, Any]) -> dict[str, Any]:
    """Responses' usage (OpenAI's counting, under other names) in chat's shape."""
    prompt = count(usage.get("input_tokens"))
    completion = count(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": _details(usage, "input_tokens_details", "cached_tokens")},
        "completion_tokens_details": {
            "reasoning_tokens": _details(usage, "output_tokens_details", "reasoning_tokens")
        },
    }


def to_messages(usage: dict[str, Any] | None) -> dict[str, int]:
    """Chat's usage as Anthropic's: input without the cached and cache-write tokens."""
    usage = usage or {}
    cached = _details(usage, "prompt_tokens_details", "cached_tokens") or count(
        usage.get("cache_read_input_tokens")
    )
    writes = count(usage.get("cache_creation_input_tokens"))
    prompt = count(usage.get("prompt_tokens"))
    return {
        "input_tokens": max(prompt - cached - writes, 0),
        "output_tokens": count(usage.get("completion_tokens")),
        "cache_creation_input_tokens": writes,
        "cache_read_input_tokens": cached,
    }


def to_responses(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Chat's usage as Responses'."""
    usage = usage or {}
    prompt = count(usage.get("prompt_tokens"))
    completion = count(usage.get("completion_tokens"))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _details(usage, "prompt_tokens_details", "cached_tokens")},
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": _details(usage, "completion_tokens_details", "reasoning_tokens")
        },
        "total_tokens": prompt + completion,
    }


def as_chat(protocol: str, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """An upstream's usage, given in `protocol`'s shape, in chat's."""
    if usage is None:
        return None
    if protocol == "messages":
        return from_messages(usage)
    if protocol == "responses":
        return from_responses(usage)
    return usage

"""The third-party vendors an `api_key` provider may name, how to reach each one, and the
protocols each vendor and server type speaks natively when its file does not say (docs/reference.md §14)."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("chat", "messages", "responses", "completions")
"""The client protocols (docs/reference.md §14): Chat Completions, Anthropic Messages, OpenAI
Responses, legacy completions."""

_CHAT = ("chat",)
_CHAT_COMPLETIONS = ("chat", "completions")
_OPENAI = ("chat", "responses", "completions")


@dataclass(frozen=True, slots=True)
class Vendor:
    """A vendor's default endpoint, whether it speaks OpenAI's HTTP API, and the protocols its
    API speaks natively."""

    name: str
    base_url: str
    openai_compatible: bool
    litellm_prefix: str
    protocols: tuple[str, ...] = _CHAT


VENDORS: dict[str, Vendor] = {
    v.name: v
    for v in (
        Vendor("openai", "https://api.openai.com/v1", True, "openai", _OPENAI),
        Vendor("openrouter", "https://openrouter.ai/api/v1", True, "openrouter", _CHAT_COMPLETIONS),
        Vendor("groq", "https://api.groq.com/openai/v1", True, "groq"),
        Vendor("together", "https://api.together.xyz/v1", True, "together_ai", _CHAT_COMPLETIONS),
        Vendor("mistral", "https://api.mistral.ai/v1", True, "mistral"),
        Vendor("deepseek", "https://api.deepseek.com/v1", True, "deepseek"),
        Vendor("fireworks", "https://api.fireworks.ai/inference/v1", True, "fireworks_ai", _CHAT_COMPLETIONS),
        Vendor("xai", "https://api.x.ai/v1", True, "xai"),
        Vendor("perplexity", "https://api.perplexity.ai", True, "perplexity"),
        Vendor("cerebras", "https://api.cerebras.ai/v1", True, "cerebras"),
        Vendor("anthropic", "https://api.anthropic.com", False, "anthropic", ("messages",)),
        Vendor("gemini", "https://generativelanguage.googleapis.com", False, "gemini"),
        Vendor("cohere", "https://api.cohere.com", False, "cohere"),
    )
}
"""Known vendors by name; `api_key.provider` must be one of these."""

SERVER_PROTOCOLS: dict[str, tuple[str, ...]] = {
    "vllm": _OPENAI,
    "llamacpp": _CHAT_COMPLETIONS,
    "ollama": _CHAT_COMPLETIONS,
    "lmstudio": _CHAT_COMPLETIONS,
    "tgi": _CHAT_COMPLETIONS,
    "openai_compatible": _CHAT_COMPLETIONS,
}
"""The protocols a server type speaks natively by default; any other (`tei`, `infinity`): chat."""

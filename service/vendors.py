"""The third-party vendors an `api_key` provider may name, and how to reach each one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Vendor:
    """A vendor's default endpoint and whether it speaks OpenAI's HTTP API."""

    name: str
    base_url: str
    openai_compatible: bool
    litellm_prefix: str


VENDORS: dict[str, Vendor] = {
    v.name: v
    for v in (
        Vendor("openai", "https://api.openai.com/v1", True, "openai"),
        Vendor("openrouter", "https://openrouter.ai/api/v1", True, "openrouter"),
        Vendor("groq", "https://api.groq.com/openai/v1", True, "groq"),
        Vendor("together", "https://api.together.xyz/v1", True, "together_ai"),
        Vendor("mistral", "https://api.mistral.ai/v1", True, "mistral"),
        Vendor("deepseek", "https://api.deepseek.com/v1", True, "deepseek"),
        Vendor("fireworks", "https://api.fireworks.ai/inference/v1", True, "fireworks_ai"),
        Vendor("xai", "https://api.x.ai/v1", True, "xai"),
        Vendor("perplexity", "https://api.perplexity.ai", True, "perplexity"),
        Vendor("cerebras", "https://api.cerebras.ai/v1", True, "cerebras"),
        Vendor("anthropic", "https://api.anthropic.com", False, "anthropic"),
        Vendor("gemini", "https://generativelanguage.googleapis.com", False, "gemini"),
        Vendor("cohere", "https://api.cohere.com", False, "cohere"),
    )
}
"""Known vendors by name; `api_key.provider` must be one of these."""

"""Other tools' formats for one provider: LiteLLM's `litellm_params` and a WilmerAI endpoint.

The input is a provider as the HTTP API describes it (`id`, `kind`, `provider` or
`server_type`, the resolved `base_url`, `models`, `model_map`, `purposes`, `name`,
`timeout_s`, `pricing` when the file prices it, and `api_key`: a mask, or null when there is
no key), so that the server
(`switchboard export`, `…/active/{purpose}/litellm`, the provider models) and the Python
client (`service.client`) build the same dictionaries from one definition. This module
imports nothing but `service.vendors`: the client ships it without the server.

A key is written as an environment reference (`os.environ/SWITCHBOARD_KEY_<ID>` for
LiteLLM, empty for WilmerAI) unless the decrypted value is passed as `key`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from service.vendors import VENDORS

NO_KEY = "no-key"
"""Sent to servers without a key: OpenAI clients refuse to run with none at all."""

ANY_MODEL = "*"
"""A `pricing` entry for the models without one of their own; in LiteLLM, the catch-all."""
_COSTS = (
    ("input", "input_cost_per_token"),
    ("output", "output_cost_per_token"),
    ("cached_input", "cache_read_input_token_cost"),
    ("cache_write", "cache_creation_input_token_cost"),
)
"""A `pricing` class (USD per million tokens) -> LiteLLM's name for it (USD per token)."""

WILMER_CONTEXT_TOKENS = 8192
"""`maxContextTokenSize` for WilmerAI, which requires one; provider files do not say."""


def key_variable(provider_id: str) -> str:
    """The environment variable a LiteLLM config reads a provider's key from."""
    return "SWITCHBOARD_KEY_" + re.sub(r"[^A-Z0-9]", "_", provider_id.upper())


def speaks_openai(provider: Mapping[str, Any]) -> bool:
    """Whether requests go to the provider as they are (every server, OpenAI-protocol vendors)."""
    if provider.get("kind") != "api_key":
        return True
    vendor = VENDORS.get(str(provider.get("provider")))
    return vendor is not None and vendor.openai_compatible


def upstream_model(provider: Mapping[str, Any], model: str) -> str:
    """The model name sent upstream for a requested model (`model_map` renames)."""
    renamed = (provider.get("model_map") or {}).get(model, model)
    return str(renamed)


def litellm_params(
    provider: Mapping[str, Any], model: str | None = None, *, key: str | None = None
) -> dict[str, Any]:
    """LiteLLM `litellm_params` for a request for `model`, mapped through `model_map` (None: any
    model, `<prefix>/*`: a wildcard deployment of a proxy config, never a model to send).

    `key` is the decrypted key; without it a provider that has one gets an env reference.
    """
    vendor = VENDORS.get(str(provider.get("provider"))) if provider.get("kind") == "api_key" else None
    prefix = vendor.litellm_prefix if vendor is not None else "openai"
    upstream = upstream_model(provider, model) if model is not None else "*"
    if key is None and provider.get("api_key") is not None:
        key = f"os.environ/{key_variable(str(provider['id']))}"
    return {
        "model": f"{prefix}/{upstream}",
        "api_base": provider["base_url"],
        "api_key": key if key is not None else NO_KEY,
        "timeout": provider["timeout_s"],
    }


def litellm_costs(provider: Mapping[str, Any], model: str | None) -> dict[str, float]:
    """The provider's prices for `model` (None: any) as LiteLLM names them, USD per token.

    A model with its own `pricing` entry (as clients name it, else as it is sent upstream) is
    priced by it alone, a model without one by `"*"` (docs/reference.md §13), as the gateway
    prices it; a class the entry leaves out is left out, for LiteLLM to price as Switchboard
    does. Each price (a string of decimals, as the API answers it) is divided by a million in
    decimal, exactly, then made the nearest binary number once: a YAML or JSON
    reader gets back the very number `Decimal` would give.
    """
    pricing: Mapping[str, Any] = provider.get("pricing") or {}
    names = (model, upstream_model(provider, model)) if model is not None else ()
    own = next((pricing[name] for name in names if name in pricing), None)
    entry: Mapping[str, Any] = (own if own is not None else pricing.get(ANY_MODEL)) or {}
    costs = {}
    for class_name, litellm_name in _COSTS:
        price = entry.get(class_name)
        if price is not None:
            costs[litellm_name] = float(Decimal(str(price)).scaleb(-6))
    return costs


def litellm_deployment(provider: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """A deployment's `litellm_params` in a LiteLLM proxy config, as `switchboard export litellm`
    writes it (but its route's `weight`): `litellm_params` and the provider's prices for `model`."""
    return litellm_params(provider, model) | litellm_costs(provider, model)


def wilmer_endpoint(provider: Mapping[str, Any], *, key: str | None = None) -> dict[str, Any] | None:
    """A WilmerAI endpoint for the provider, or None when WilmerAI has no API type for it.

    WilmerAI has no environment references: without `key` the `apiKey` is empty.
    """
    api_type = _wilmer_api_type(provider)
    if api_type is None:
        return None
    models = [upstream_model(provider, m) for m in provider.get("models") or []]
    models = models or [str(m) for m in (provider.get("model_map") or {}).values()]
    model = models[0] if models else ""
    endpoint: dict[str, Any] = {
        "modelNameForDisplayOnly": provider.get("name") or provider["id"],
        # WilmerAI appends `/v1/...` itself.
        "endpoint": str(provider["base_url"]).removesuffix("/v1"),
        "apiKey": key or "",
        "apiTypeConfigFileName": api_type,
        "modelNameToSendToAPI": model,
        "dontIncludeModel": not model,
    }
    if api_type.endswith("Embeddings"):
        return endpoint
    return endpoint | {
        "maxContextTokenSize": WILMER_CONTEXT_TOKENS,
        "promptTemplate": "_chatonly",
        "addGenerationPrompt": True,
        "trimBeginningAndEndLineBreaks": True,
        "removeThinking": False,
        "startThinkTag": "<think>",
        "endThinkTag": "</think>",
        "expectOnlyClosingThinkTag": False,
        "addTextToStartOfSystem": False,
        "textToAddToStartOfSystem": "",
        "addTextToStartOfPrompt": False,
        "textToAddToStartOfPrompt": "",
        "addTextToStartOfCompletion": False,
        "textToAddToStartOfCompletion": "",
        "ensureTextAddedToAssistantWhenChatCompletion": False,
    }


def _wilmer_api_type(provider: Mapping[str, Any]) -> str | None:
    # The names of the files in WilmerAI's Public/Configs/ApiTypes/.
    purposes = provider.get("purposes") or []
    if "chat" in purposes:
        if provider.get("kind") == "api_key" and provider.get("provider") == "anthropic":
            return "Claude"
        return "Open-AI-API" if speaks_openai(provider) else None
    if "embeddings" in purposes and speaks_openai(provider):
        return "OpenAI-Embeddings"
    return None

"""`switchboard export litellm|wilmer`: the configuration in other tools' formats.

- LiteLLM proxy `config.yaml`: one `model_list` deployment per provider and model. Every
  primary of a purpose serves the requested model name itself (LiteLLM load-balances a model
  name across its deployments, with Switchboard's weights); a fallback serves the name
  `<provider id>/<model>`, and `router_settings.fallbacks` maps each model to those names in
  routing order. A provider that lists no models becomes a wildcard (`*` or `<id>/*`).
- WilmerAI: one endpoint JSON per enabled provider (`Public/Configs/Endpoints/<id>.json`).

Keys are written as environment references (`os.environ/SWITCHBOARD_KEY_<ID>` for LiteLLM,
empty for WilmerAI, which has none) unless `--with-secrets` asks for the decrypted values.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from service.errors import ConfigError, FileRejected, Problem
from service.files import write_atomically
from service.loader import Loaded, config_files, decrypt, parse
from service.models import ApiKey, Provider, Routing
from service.secret import Secret
from service.settings import Settings
from service.snapshot import Snapshot
from service.sops import Sops
from service.vendors import VENDORS

NO_KEY = "no-key"
"""Sent to servers without a key: OpenAI clients refuse to run with none at all."""

WILMER_CONTEXT_TOKENS = 8192
"""`maxContextTokenSize` for WilmerAI, which requires one; provider files do not say."""

_LITELLM_MODE = {"chat": "chat", "embeddings": "embedding", "reranking": "rerank"}


def command(ns: argparse.Namespace, settings: Settings) -> int:
    """`switchboard export litellm [--out FILE]` / `export wilmer --out DIR` [`--with-secrets`]."""
    if ns.target == "wilmer" and ns.out is None:
        print("switchboard: error: export wilmer needs --out DIR", file=sys.stderr)
        return 2
    sops = None
    if ns.with_secrets:
        from service.cli import make_sops

        sops = make_sops(settings)
    snapshot = load(settings.providers_dir, settings.providers.as_posix(), sops)
    if ns.target == "litellm":
        text = litellm_yaml(snapshot, with_secrets=ns.with_secrets)
        if ns.out is None:
            print(text, end="")
        else:
            _write(ns.out, text, secret=ns.with_secrets)
            print(f"wrote {ns.out}", file=sys.stderr)
        return 0
    files = wilmer_endpoints(snapshot, with_secrets=ns.with_secrets)
    ns.out.mkdir(parents=True, exist_ok=True)
    for name, endpoint in files.items():
        _write(ns.out / name, json.dumps(endpoint, indent=2) + "\n", secret=ns.with_secrets)
    skipped = sorted(set(snapshot.providers) - {n.removesuffix(".json") for n in files})
    print(f"wrote {len(files)} endpoint file(s) to {ns.out}", file=sys.stderr)
    if skipped:
        print(f"skipped (disabled, or no WilmerAI API type): {', '.join(skipped)}", file=sys.stderr)
    return 0


def load(folder: Path, shown: str, sops: Sops | None) -> Snapshot:
    """The snapshot of the files in `folder`, decrypted when `sops` is given. Raises ConfigError."""
    files: dict[str, Loaded] = {}
    problems: list[Problem] = []
    for path in config_files(folder):
        name = f"{shown.rstrip('/')}/{path.name}"
        try:
            loaded = parse(name, path.read_bytes())
            files[name] = decrypt(loaded, sops) if sops is not None else loaded
        except FileRejected as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return Snapshot.build(files)


def _write(path: Path, text: str, *, secret: bool) -> None:
    write_atomically(path, text.encode("utf-8"), mode=0o600 if secret else 0o644)


# -- one provider ------------------------------------------------------------------------------


def key_variable(provider_id: str) -> str:
    """The environment variable a LiteLLM config reads a provider's key from."""
    return "SWITCHBOARD_KEY_" + re.sub(r"[^A-Z0-9]", "_", provider_id.upper())


def _key(provider: Provider, *, with_secrets: bool) -> str | None:
    """The key as written out: the value, an env reference, or None when there is no key."""
    if provider.api_key is None:
        return None
    if not with_secrets:
        return f"os.environ/{key_variable(provider.id)}"
    if not isinstance(provider.api_key, Secret):
        raise ConfigError([Problem(provider.id, 0, "the key was not decrypted; is a key at hand?")])
    return provider.api_key.reveal()


def litellm_params(
    provider: Provider, model: str | None = None, *, with_secrets: bool = False
) -> dict[str, Any]:
    """LiteLLM `litellm_params` for a request for `model` (None: any model, as a wildcard)."""
    prefix = VENDORS[provider.provider].litellm_prefix if isinstance(provider, ApiKey) else "openai"
    upstream = provider.upstream_model(model) if model is not None else "*"
    key = _key(provider, with_secrets=with_secrets)
    return {
        "model": f"{prefix}/{upstream}",
        "api_base": provider.endpoint,
        "api_key": key if key is not None else NO_KEY,
        "timeout": provider.timeout_s,
    }


def wilmer_endpoint(provider: Provider, *, with_secrets: bool = False) -> dict[str, Any] | None:
    """A WilmerAI endpoint for the provider, or None when WilmerAI has no API type for it."""
    api_type = _wilmer_api_type(provider)
    if api_type is None:
        return None
    models = [provider.upstream_model(m) for m in provider.models] or list(provider.model_map.values())
    model = models[0] if models else ""
    key = _key(provider, with_secrets=with_secrets)
    endpoint: dict[str, Any] = {
        "modelNameForDisplayOnly": provider.name or provider.id,
        # WilmerAI appends `/v1/...` itself.
        "endpoint": provider.endpoint.removesuffix("/v1"),
        "apiKey": key if with_secrets and key is not None else "",
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


def _wilmer_api_type(provider: Provider) -> str | None:
    # The names of the files in WilmerAI's Public/Configs/ApiTypes/.
    if "chat" in provider.purposes:
        if isinstance(provider, ApiKey) and provider.provider == "anthropic":
            return "Claude"
        return "Open-AI-API" if provider.speaks_openai else None
    if "embeddings" in provider.purposes and provider.speaks_openai:
        return "OpenAI-Embeddings"
    return None


# -- the whole configuration -------------------------------------------------------------------


def litellm_config(snapshot: Snapshot, *, with_secrets: bool = False) -> dict[str, Any]:
    """The LiteLLM proxy configuration: `model_list` and `router_settings`."""
    providers = {pid: p for pid, p in snapshot.providers.items() if p.enabled}
    builder = _Deployments(providers, with_secrets)
    fallbacks: dict[str, list[str]] = {}
    routing = snapshot.routing or Routing(kind="routing", purposes={})
    for purpose, route in routing.purposes.items():
        served: list[str] = []
        for pid in route.primary:
            weight = route.weight(pid) if route.weights else None
            for model in _names(providers[pid]):
                # One catch-all per config: chat's. Other purposes' any-model servers are `<id>/*`.
                name = f"{pid}/*" if model == "*" and purpose != "chat" else model
                served.append(builder.add(pid, model, name, purpose, weight))
        for model in dict.fromkeys(m for m in served if not m.endswith("*")):
            for pid in route.fallbacks:
                if providers[pid].serves(model):
                    target = builder.add(pid, model, f"{pid}/{model}", purpose)
                    fallbacks.setdefault(model, []).append(target)
    for pid, provider in providers.items():
        if pid not in builder.seen:
            for model in _names(provider):
                name = f"{pid}/{model}" if routing.purposes else model
                builder.add(pid, model, name, provider.purposes[0])
    settings: dict[str, Any] = {"routing_strategy": "simple-shuffle"}
    if fallbacks:
        settings["fallbacks"] = [{m: list(dict.fromkeys(t))} for m, t in fallbacks.items()]
    return {"model_list": builder.deployments, "router_settings": settings}


def _names(provider: Provider) -> list[str]:
    """The model names a provider answers to; `*` when it lists none (any model)."""
    return list(dict.fromkeys([*provider.models, *provider.model_map])) or ["*"]


class _Deployments:
    """`model_list` entries, each (provider, model name) once."""

    def __init__(self, providers: Mapping[str, Provider], with_secrets: bool) -> None:
        self.providers = providers
        self.with_secrets = with_secrets
        self.deployments: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self._names: set[tuple[str, str]] = set()

    def add(self, pid: str, model: str, name: str, purpose: str, weight: float | None = None) -> str:
        if (pid, name) not in self._names:
            provider = self.providers[pid]
            params = provider.to_litellm_config(
                None if model == "*" else model, with_secrets=self.with_secrets
            )
            if weight is not None:
                params["weight"] = weight
            info = {"id": f"{pid}:{name}", "mode": _LITELLM_MODE[purpose], "switchboard_provider": pid}
            self.deployments.append({"model_name": name, "litellm_params": params, "model_info": info})
            self._names.add((pid, name))
            self.seen.add(pid)
        return name


def litellm_yaml(snapshot: Snapshot, *, with_secrets: bool = False) -> str:
    """`litellm_config` as a LiteLLM proxy `config.yaml`, with a header naming what it needs."""
    config = litellm_config(snapshot, with_secrets=with_secrets)
    header = ["# LiteLLM proxy config, generated by `switchboard export litellm`; edit providers.d/ instead."]
    if not with_secrets:
        needed = sorted({key_variable(p.id) for p in snapshot.providers.values() if p.enabled and p.api_key})
        if needed:
            header.append(f"# Keys are read from the environment: {', '.join(needed)}")
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=1000)
    return "\n".join(header) + "\n" + body


def wilmer_endpoints(snapshot: Snapshot, *, with_secrets: bool = False) -> dict[str, dict[str, Any]]:
    """File name -> WilmerAI endpoint, for every enabled provider WilmerAI can talk to."""
    found = {}
    for pid, provider in snapshot.providers.items():
        endpoint = provider.to_wilmer_config(with_secrets=with_secrets) if provider.enabled else None
        if endpoint is not None:
            found[f"{pid}.json"] = endpoint
    return found

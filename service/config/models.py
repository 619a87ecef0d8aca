"""The documents of `providers.d/`: providers (`ai_server`, `api_key`), `routing` and `clients`.

Every model is frozen and strict: unknown fields are errors, types are not coerced, so a typo
in a pull request fails validation instead of passing silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

from service import formats
from service.config.fields import Seconds, SecretField, Url
from service.config.metering import Budget, Limits, Price
from service.config.secret import Secret
from service.errors import ConfigError, Problem
from service.vendors import SERVER_PROTOCOLS, VENDORS

ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
SECRET_FIELDS = ("api_key",)
"""Fields that must be SOPS-encrypted in git (the `encrypted_regex` of `.sops.yaml`)."""

Purpose = Literal["chat", "embeddings", "reranking"]
PURPOSES: tuple[Purpose, ...] = ("chat", "embeddings", "reranking")
ServerType = Literal["vllm", "ollama", "llamacpp", "tgi", "lmstudio", "tei", "infinity", "openai_compatible"]
Protocol = Literal["chat", "messages", "responses", "completions"]
"""A client protocol (docs/reference.md §14), as a provider file lists the ones its upstream
speaks natively."""
Scope = Literal["completions", "config:read", "config:write", "admin", "secrets:read", "usage:read"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
ProviderId = Annotated[str, Field(pattern=ID_PATTERN)]
CLIENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


_UNIQUE: dict[str, JsonValue] = {"uniqueItems": True}
"""A list that refuses a value twice says so in its JSON Schema too."""


# The JSON Schema says what the loader takes: one id, or a list naming each id once.
_Ids = Annotated[list[ProviderId], Field(json_schema_extra=_UNIQUE)]
_SomeIds = Annotated[list[ProviderId], Field(min_length=1, json_schema_extra=_UNIQUE)]
Primaries = Annotated[
    list[ProviderId],
    BeforeValidator(_one_or_many, json_schema_input_type=ProviderId | _SomeIds),
    Field(min_length=1),
]
"""One provider id, or a list of them (`primary: local-tei` is `primary: [local-tei]`)."""
Fallbacks = Annotated[
    list[ProviderId], BeforeValidator(_one_or_many, json_schema_input_type=ProviderId | _Ids)
]
Weight = Annotated[float, Field(gt=0)]


class _Document(BaseModel):
    # No `.inf` or `.nan`: a timeout or a weight must be a number, and the event log is strict JSON.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=True, allow_inf_nan=False
    )


class _Provider(_Document):
    kind: Literal["ai_server", "api_key"]
    id: ProviderId = Field(description="Unique id; equals the file name without extension.")
    name: str | None = Field(None, description="Display name.")
    enabled: bool = Field(True, description="Disabled providers are kept but never routed to.")
    models: list[str] = Field(default_factory=list, description="Models served; empty means any model.")
    model_map: dict[str, str] = Field(
        default_factory=dict, description="Requested model alias -> model name sent upstream."
    )
    purposes: list[Purpose] = Field(
        default_factory=lambda: list[Purpose](["chat"]), min_length=1, json_schema_extra=_UNIQUE
    )
    connect_timeout_s: Seconds = Field(
        5, description="Seconds to connect to the upstream; then it counts as a failure."
    )
    timeout_s: Seconds = Field(
        600,
        description="Seconds for the whole answer of a non-streaming request. A stream has no total limit.",
    )
    first_byte_timeout_s: Seconds = Field(
        15, description="Seconds to a stream's first body byte; none by then is a failure (it falls back)."
    )
    idle_timeout_s: Seconds = Field(
        60,
        description="Seconds of the longest silence between two chunks of a stream after the first; "
        "then the stream ends with an error event.",
    )
    pricing: dict[str, Price] = Field(
        default_factory=dict,
        description='USD per million tokens, per model as clients name it; "*" for every other model. '
        "Unpriced models take the price map bundled with litellm (api_key providers only), else cost 0.",
    )
    budget: Budget | None = Field(
        None, description="A spending cap for this provider (a vendor account's); when spent, it is skipped."
    )
    protocols: list[Protocol] | None = Field(
        None,
        min_length=1,
        json_schema_extra=_UNIQUE,
        description="The client protocols the upstream speaks natively (requests in them go as they "
        "are; others are translated to chat). Unset: the vendor's or server type's default "
        "(anthropic: messages; openai, vllm: chat, responses, completions; openrouter, together, "
        "fireworks, llamacpp, ollama, lmstudio, tgi, openai_compatible: chat, completions; others: chat).",
    )

    @field_validator("purposes", "protocols")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a value twice")
        return value

    @property
    def native_protocols(self) -> frozenset[str]:
        """The protocols the upstream speaks natively: as listed, or the default of its kind."""
        if self.protocols is not None:
            return frozenset(self.protocols)
        return frozenset(self._default_protocols())

    def _default_protocols(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The server type or vendor."""
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        """The base URL requests go to (the vendor's default when none is set)."""
        raise NotImplementedError

    @property
    def speaks_openai(self) -> bool:
        """True when requests are forwarded as they are; False when litellm translates them."""
        raise NotImplementedError

    def serves(self, model: str | None) -> bool:
        """Whether a request for `model` may go to this provider."""
        return not self.models or model is None or model in self.models or model in self.model_map

    def upstream_model(self, model: str) -> str:
        """The model name to send upstream for a requested model."""
        return self.model_map.get(model, model)

    def describe(self) -> dict[str, Any]:
        """The provider as the HTTP API shows it: masked (`api_key` is `****5d80` or null), URL resolved."""
        dumped = self.model_dump(mode="json")  # secrets serialize as their mask
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            **self._label_field(),
            "base_url": self.endpoint,
            "models": dumped["models"],
            "model_map": dumped["model_map"],
            "purposes": dumped["purposes"],
            "enabled": self.enabled,
            "api_key": dumped["api_key"],
            "connect_timeout_s": dumped["connect_timeout_s"],
            "timeout_s": dumped["timeout_s"],
            "first_byte_timeout_s": dumped["first_byte_timeout_s"],
            "idle_timeout_s": dumped["idle_timeout_s"],
            # Only when set: a view that gained empty fields would read as a change of every
            # provider in the event log of a service upgraded to this version.
            **{name: dumped[name] for name in ("pricing", "budget", "protocols") if dumped[name]},
        }

    def _label_field(self) -> dict[str, str]:
        raise NotImplementedError

    def revealed_key(self) -> str | None:
        """The decrypted key (None without one); ConfigError when it could not be decrypted here."""
        key = getattr(self, "api_key", None)
        if key is None:
            return None
        if not isinstance(key, Secret):
            raise ConfigError([Problem(self.id, 0, "the key was not decrypted; is a key at hand?")])
        return key.reveal()

    def to_litellm_config(self, model: str | None = None, *, with_secrets: bool = False) -> dict[str, Any]:
        """LiteLLM `litellm_params` for `model` (None: any); the key as an env reference unless asked."""
        key = self.revealed_key() if with_secrets else None
        return formats.litellm_params(self.describe(), model, key=key)

    def to_wilmer_config(self, *, with_secrets: bool = False) -> dict[str, Any] | None:
        """A WilmerAI endpoint file's content, or None when WilmerAI has no API type for this provider."""
        key = self.revealed_key() if with_secrets else None
        return formats.wilmer_endpoint(self.describe(), key=key)


class AiServer(_Provider):
    """A self-hosted model server (vLLM, Ollama, llama.cpp, TEI...)."""

    kind: Literal["ai_server"]
    server_type: ServerType
    base_url: Url
    api_key: SecretField | None = None

    @property
    def label(self) -> str:
        return self.server_type

    def _label_field(self) -> dict[str, str]:
        return {"server_type": self.server_type}

    @property
    def endpoint(self) -> str:
        return self.base_url

    @property
    def speaks_openai(self) -> bool:
        return True

    def _default_protocols(self) -> tuple[str, ...]:
        return SERVER_PROTOCOLS.get(self.server_type, ("chat",))


class ApiKey(_Provider):
    """A key for a third-party vendor (OpenRouter, OpenAI, Anthropic...)."""

    kind: Literal["api_key"]
    provider: str = Field(json_schema_extra={"enum": list[JsonValue](sorted(VENDORS))})
    base_url: Url | None = None
    api_key: SecretField

    @field_validator("provider")
    @classmethod
    def _known_vendor(cls, value: str) -> str:
        if value not in VENDORS:
            raise ValueError(f"unknown vendor; one of {', '.join(sorted(VENDORS))}")
        return value

    @property
    def label(self) -> str:
        return self.provider

    def _label_field(self) -> dict[str, str]:
        return {"provider": self.provider}

    @property
    def endpoint(self) -> str:
        return self.base_url or VENDORS[self.provider].base_url

    @property
    def speaks_openai(self) -> bool:
        return VENDORS[self.provider].openai_compatible

    def _default_protocols(self) -> tuple[str, ...]:
        return VENDORS[self.provider].protocols


Provider = AiServer | ApiKey


class Route(_Document):
    """Who serves one purpose: load-balanced primaries, then fallbacks in order."""

    primary: Primaries
    weights: dict[ProviderId, Weight] = Field(
        default_factory=dict, json_schema_extra={"propertyNames": {"pattern": ID_PATTERN}}
    )
    fallbacks: Fallbacks = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Route:
        named = self.primary + self.fallbacks
        twice = sorted({i for i in named if named.count(i) > 1})
        if twice:
            raise ValueError(f"names {', '.join(twice)} more than once")
        stray = sorted(set(self.weights) - set(self.primary))
        if stray:
            raise ValueError(f"weights name {', '.join(stray)}, which is not a primary")
        return self

    def weight(self, provider_id: str) -> float:
        return self.weights.get(provider_id, 1.0)


class Routing(_Document):
    """`providers.d/routing.yaml`: the active providers of each purpose."""

    kind: Literal["routing"]
    purposes: dict[Purpose, Route]


class Client(_Document):
    """A caller of the HTTP API, known by the sha256 of its bearer token."""

    name: str = Field(pattern=CLIENT_NAME_PATTERN)
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: list[Scope] = Field(min_length=1)
    limits: Limits | None = Field(
        None, description="Rate limits and a budget (docs/reference.md §13); none: unlimited."
    )


class Clients(_Document):
    """`providers.d/clients.yaml`: who may call the HTTP API, with which scopes."""

    kind: Literal["clients"]
    clients: list[Client] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Clients:
        names = [c.name for c in self.clients]
        hashes = [c.token_sha256 for c in self.clients]
        if len(set(names)) != len(names):
            raise ValueError("two clients have the same name")
        if len(set(hashes)) != len(hashes):
            raise ValueError("two clients have the same token")
        return self


Document = AiServer | ApiKey | Routing | Clients
MODELS: dict[str, type[AiServer] | type[ApiKey] | type[Routing] | type[Clients]] = {
    "ai_server": AiServer,
    "api_key": ApiKey,
    "routing": Routing,
    "clients": Clients,
}
"""The model of each `kind`."""


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of one kind, for editors (`yaml-language-server`) and CI."""
    schema = MODELS[kind].model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"{kind}.schema.json"
    # Files in git carry sops metadata beside the document; the loader sets it aside.
    schema.setdefault("properties", {})["sops"] = {
        "type": "object",
        "description": "SOPS metadata, written by sops. Do not edit.",
    }
    if "api_key" in schema["properties"]:  # an encrypted value needs the metadata sops wrote with it
        schema["if"] = {"properties": {"api_key": {"type": "string"}}, "required": ["api_key"]}
        schema["then"] = {"required": ["sops"]}
    return schema

"""What the Python client returns: providers, routes, health checks and events, as plain
frozen dataclasses read from the service's JSON answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service import formats

HEALTHY = ("healthy", "unknown")
"""Statuses a candidate may have to be offered: `unknown` is a provider not yet checked."""


@dataclass(frozen=True, slots=True)
class Health:
    """A provider's last known health, as the service reported it: the confirmed `status` and
    `reason` (shared between replicas), the last check's time and latency, and the `circuit` of
    the replica that answered (`closed`, `open` or `half_open`)."""

    status: str = "unknown"
    checked_at: str | None = None
    latency_ms: float | None = None
    reason: str | None = None
    circuit: str | None = None


@dataclass(frozen=True, slots=True)
class Provider:
    """One provider as the service describes it: masked key, health, and where it sits in a route.

    `stale` is true when the copy it comes from could not be refreshed (the service is away).
    """

    id: str
    kind: str
    base_url: str
    name: str | None = None
    provider: str | None = None
    server_type: str | None = None
    models: tuple[str, ...] = ()
    model_map: Mapping[str, str] = field(default_factory=dict)
    purposes: tuple[str, ...] = ()
    enabled: bool = True
    api_key: str | None = None
    """The key's mask (`****5d80`), or None when the provider has no key; never the key."""
    file: str | None = None
    commit: str | None = None
    """The commit served by the answer it was read from (None: its file was not committed there).
    From the client's copy, that answer may be older than the commit served now: a commit that
    touches nothing in `providers.d/` leaves the tag as it was, so the copy is not taken again
    (docs/reference.md §11). Its file at that commit is what the copy shows."""
    health: Health = Health()
    purpose: str | None = None
    role: str | None = None
    """`primary` or `fallback` in the route it was taken from."""
    stale: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], **extra: Any) -> Provider:
        health = data.get("health") or {}
        return cls(
            id=str(data["id"]),
            kind=str(data.get("kind", "")),
            base_url=str(data.get("base_url", "")),
            name=data.get("name"),
            provider=data.get("provider"),
            server_type=data.get("server_type"),
            models=tuple(data.get("models") or ()),
            model_map=dict(data.get("model_map") or {}),
            purposes=tuple(data.get("purposes") or ()),
            enabled=bool(data.get("enabled", True)),
            api_key=data.get("api_key"),
            file=data.get("file"),
            commit=data.get("commit"),
            health=Health(
                health.get("status", "unknown"),
                health.get("checked_at"),
                health.get("latency_ms"),
                health.get("reason"),
                health.get("circuit"),
            ),
            raw=dict(data),
            **extra,
        )

    @property
    def healthy(self) -> bool:
        """Whether it may be offered: enabled, and `healthy` or not checked yet (`unknown`)."""
        return self.enabled and self.health.status in HEALTHY

    def to_litellm_config(self, model: str | None = None) -> dict[str, Any]:
        """LiteLLM `litellm_params` for `model`, as `switchboard export litellm` writes the
        provider's deployment for it: the prices of its `pricing` as LiteLLM's per-token costs, the
        key as an `os.environ/SWITCHBOARD_KEY_<ID>` reference (`litellm_params()` has it); not the
        route's `weight`, which belongs to a route, not to the provider.

        Without `model`, its first declared model, as `litellm_params(purpose)` names it (an
        export lists no `*` for a provider that declares models); for a provider that declares
        none, `<prefix>/*`, the export's wildcard deployment, never a model to send
        (`Switchboard.litellm_params` refuses to)."""
        if model is None and self.models:
            model = self.models[0]
        return formats.litellm_deployment(self.raw, model)

    def to_wilmer_config(self) -> dict[str, Any] | None:
        """A WilmerAI endpoint, as `switchboard export wilmer` writes it (None: WilmerAI cannot use it)."""
        return formats.wilmer_endpoint(self.raw)


@dataclass(frozen=True, slots=True)
class Route:
    """Who serves one purpose: primaries in their listed order, then fallbacks."""

    purpose: str
    primary: tuple[Provider, ...]
    fallbacks: tuple[Provider, ...]
    weights: Mapping[str, float] = field(default_factory=dict)
    commit: str | None = None
    """As `Provider.commit`: the commit served by the answer the copy was taken from (None: a
    file was not committed there), whose `providers.d/` is what the copy shows."""
    generation: int | None = None
    """The generation of the replica that gave that answer (each replica counts its own)."""

    @property
    def candidates(self) -> tuple[Provider, ...]:
        return self.primary + self.fallbacks


@dataclass(frozen=True, slots=True)
class TestResult:
    """The answer of a health check run now."""

    __test__ = False  # not a pytest test class

    ok: bool
    latency_ms: float | None
    message: str


@dataclass(frozen=True, slots=True)
class Event:
    """One event of the service's log, as the stream delivered it."""

    seq: int
    type: str
    data: Mapping[str, Any]

    @property
    def subject(self) -> str | None:
        subject = self.data.get("subject")
        return subject if isinstance(subject, str) else None


def parse_routes(body: Mapping[str, Any]) -> dict[str, Route]:
    """Every purpose's route in an answer of `GET …/active`, its providers marked with where they sit."""
    routes = {}
    for purpose, route in (body.get("purposes") or {}).items():
        primary = tuple(
            Provider.from_json(p, purpose=purpose, role="primary") for p in route.get("primary", [])
        )
        fallbacks = tuple(
            Provider.from_json(p, purpose=purpose, role="fallback") for p in route.get("fallbacks", [])
        )
        routes[purpose] = Route(
            purpose,
            primary,
            fallbacks,
            dict(route.get("weights") or {}),
            route.get("commit"),
            route.get("generation"),
        )
    return routes

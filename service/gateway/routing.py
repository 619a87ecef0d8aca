"""Which providers a request may go to, in which order (docs/reference.md §7).

The candidates of a request are its purpose's primaries, in a weighted random order, then
its fallbacks in the order written; providers that are disabled, whose `models` exclude
the requested model, or whose circuit is open are skipped. Everything that depends only
on the configuration (targets with their headers, the routes, the `/v1/models` answer) is
computed once per snapshot in a `RoutingTable` (the `/v1/models` answer again only when a
health check found new models), so a request costs a few dictionary reads
and one random number per primary. Routing chooses providers; how a request reaches one is
its transport's business (`service.gateway.transports`), so nothing here holds a key.

The weighted order is Efraimidis-Spirakis sampling: each primary draws `u ** (1 / w)` with
`u` uniform in [0, 1), and the largest key goes first. The first pick is then each primary
with probability `w / sum(w)`, and the rest follow in the same way among those left.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from service.config.models import Provider
from service.config.snapshot import PerSnapshot, Snapshot
from service.gateway.health import Health


@dataclass(frozen=True, slots=True)
class Route:
    """One purpose's providers: primaries with their sampling exponents, then fallbacks."""

    primaries: tuple[Provider, ...]
    exponents: tuple[float, ...]
    fallbacks: tuple[Provider, ...]
    ordered: tuple[Provider, ...] = ()
    """Primaries then fallbacks, in the order the routing file names them (made with the route)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ordered", self.primaries + self.fallbacks)


class RoutingTable:
    """What routing needs from one snapshot, computed once when the snapshot is new."""

    __slots__ = ("_declared", "_listed", "_undeclared", "routes", "snapshot")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        providers = snapshot.providers
        routes: dict[str, Route] = {}
        if snapshot.routing is not None:
            for purpose, route in snapshot.routing.purposes.items():
                primaries = tuple(providers[i] for i in route.primary if i in providers)
                routes[purpose] = Route(
                    primaries=primaries,
                    exponents=tuple(1.0 / route.weight(p.id) for p in primaries),
                    fallbacks=tuple(providers[i] for i in route.fallbacks if i in providers),
                )
        self.routes: Mapping[str, Route] = routes
        enabled = [p for p in providers.values() if p.enabled]
        self._declared = _declared_models(enabled)
        self._undeclared = tuple(p.id for p in enabled if not p.models)
        """Enabled providers that declare no models: `/v1/models` lists what their checks found."""
        self._listed: tuple[int, bytes] | None = None

    def serves(self, purpose: str, model: str | None) -> bool:
        """Whether any enabled provider of the purpose's route serves `model`, now or later: when
        none does, asking again cannot help (404 `model_not_found`), unlike a provider skipped
        for now (503)."""
        route = self.routes.get(purpose)
        return route is not None and any(p.enabled and p.serves(model) for p in route.ordered)

    def models_answer(self, health: Health) -> bytes:
        """The encoded answer of `GET /v1/models`: the models enabled providers declare, and for
        those that declare none, the models their last successful health check listed."""
        version = health.models_version if self._undeclared else 0
        listed = self._listed
        if listed is not None and listed[0] == version:
            return listed[1]
        data = dict(self._declared)
        for provider_id in self._undeclared:
            for model in health.models(provider_id):
                data.setdefault(model, _model_entry(model, provider_id))
        encoded = json.dumps({"object": "list", "data": list(data.values())}).encode()
        self._listed = (version, encoded)
        return encoded


class Router:
    """Orders candidates; holds the plan of the last snapshot it saw."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random  # noqa: S311 - load balancing, not secrecy
        self._tables = PerSnapshot(RoutingTable)

    def table(self, snapshot: Snapshot) -> RoutingTable:
        """The routing table of `snapshot`, built on first sight of a new snapshot."""
        return self._tables.of(snapshot)

    def candidates(
        self, table: RoutingTable, purpose: str, model: str | None, health: Health
    ) -> list[Provider]:
        """The providers to try for one request, best first; empty when none may serve it."""
        route = table.routes.get(purpose)
        if route is None:
            return []
        ordered = route.ordered  # one primary (or none): the written order is the order
        primaries = route.primaries
        if len(primaries) > 1:
            draw = self._random
            keys = [draw() ** e for e in route.exponents]
            drawn = sorted(
                range(len(keys)), key=keys.__getitem__, reverse=True
            )  # stable: ties keep the order
            ordered = tuple(primaries[i] for i in drawn) + route.fallbacks
        return [p for p in ordered if p.enabled and p.serves(model) and not health.is_open(p.id)]


def skipped_now(table: RoutingTable, purpose: str, model: str | None, health: Health) -> list[dict[str, str]]:
    """Each provider of the route that serves `model` but whose circuit is open now (half-open
    with its trial out too), and why: the 503's `skipped` (docs/reference.md §6), with the
    provider's confirmed health reason when it is unhealthy (a refused key, an address outside
    the allowed upstreams), so the client learns why no provider was tried."""
    route = table.routes.get(purpose)
    found: list[dict[str, str]] = []
    for provider in route.ordered if route is not None else ():
        if provider.enabled and provider.serves(model) and health.is_open(provider.id):
            entry = {"provider": provider.id, "reason": "circuit_open"}
            state = health.get(provider.id)
            if state.status == "unhealthy" and state.reason:
                entry["health"] = state.reason
            found.append(entry)
    return found


def first_healthy(
    table: RoutingTable, purpose: str, health: Health, model: str | None = None
) -> Provider | None:
    """The first candidate, in the routing file's order, that is enabled, serves `model` (None:
    any) and is not known to be down."""
    route = table.routes.get(purpose)
    for provider in route.ordered if route is not None else ():
        if (
            provider.enabled
            and provider.serves(model)
            and not health.is_open(provider.id)
            and health.get(provider.id).status != "unhealthy"
        ):
            return provider
    return None


def _declared_models(providers: Iterable[Provider]) -> dict[str, dict[str, object]]:
    data: dict[str, dict[str, object]] = {}
    for provider in providers:
        for model in [*provider.models, *provider.model_map]:
            data.setdefault(model, _model_entry(model, provider.id))
    return data


def _model_entry(model: str, provider_id: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": 0, "owned_by": provider_id}

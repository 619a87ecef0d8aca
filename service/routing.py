"""Which providers a request may go to, in which order (SPEC 7).

The candidates of a request are its purpose's primaries, in a weighted random order, then
its fallbacks in the order written; providers that are disabled, whose `models` exclude
the requested model, or whose circuit is open are skipped. Everything that depends only
on the configuration (targets with their headers, the routes, the `/v1/models` answer) is
computed once per snapshot in a `Plan`, so a request costs a few dictionary reads and one
random number per primary.

The weighted order is Efraimidis-Spirakis sampling: each primary draws `u ** (1 / w)` with
`u` uniform in [0, 1), and the largest key goes first. The first pick is then each primary
with probability `w / sum(w)`, and the rest follow in the same way among those left.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from service.health import Health
from service.models import PURPOSES, Provider
from service.snapshot import PerSnapshot, Snapshot
from service.upstream import Target


@dataclass(frozen=True, slots=True)
class Route:
    """One purpose's targets: primaries with their sampling exponents, then fallbacks."""

    primaries: tuple[Target, ...]
    exponents: tuple[float, ...]
    fallbacks: tuple[Target, ...]

    @property
    def ordered(self) -> tuple[Target, ...]:
        """Primaries then fallbacks, in the order the routing file names them."""
        return self.primaries + self.fallbacks


class Plan:
    """What routing needs from one snapshot, computed once when the snapshot is new."""

    __slots__ = ("models_answer", "routes", "snapshot", "targets")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.targets: Mapping[str, Target] = {i: Target.of(p) for i, p in snapshot.providers.items()}
        routes: dict[str, Route] = {}
        if snapshot.routing is not None:
            for purpose, route in snapshot.routing.purposes.items():
                primaries = tuple(self.targets[i] for i in route.primary if i in self.targets)
                routes[purpose] = Route(
                    primaries=primaries,
                    exponents=tuple(1.0 / route.weight(t.id) for t in primaries),
                    fallbacks=tuple(self.targets[i] for i in route.fallbacks if i in self.targets),
                )
        self.routes: Mapping[str, Route] = routes
        self.models_answer = _models_answer(snapshot.providers.values())
        """The encoded answer of `GET /v1/models`."""


class Router:
    """Orders candidates; holds the plan of the last snapshot it saw."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random  # noqa: S311 - load balancing, not secrecy
        self._plans = PerSnapshot(Plan)

    def plan(self, snapshot: Snapshot) -> Plan:
        """The plan of `snapshot`, built on first sight of a new snapshot."""
        return self._plans.of(snapshot)

    def candidates(self, plan: Plan, purpose: str, model: str | None, health: Health) -> list[Target]:
        """The targets to try for one request, best first; empty when none may serve it."""
        route = plan.routes.get(purpose)
        if route is None:
            return []
        primaries = route.primaries
        if len(primaries) > 1:
            draw = self._random
            keys = [draw() ** e for e in route.exponents]
            primaries = tuple(
                t for _, t in sorted(zip(keys, primaries, strict=True), key=_first, reverse=True)
            )
        return [
            t
            for t in primaries + route.fallbacks
            if t.provider.enabled and t.provider.serves(model) and not health.is_open(t.id)
        ]


def first_healthy(plan: Plan, purpose: str, health: Health) -> Target | None:
    """The first candidate, in the routing file's order, that is enabled and not known to be down."""
    route = plan.routes.get(purpose)
    for target in route.ordered if route is not None else ():
        if (
            target.provider.enabled
            and not health.is_open(target.id)
            and health.get(target.id).status != "unhealthy"
        ):
            return target
    return None


def known_purpose(purpose: str) -> bool:
    """Whether `purpose` is one SPEC names."""
    return purpose in PURPOSES


def _first(pair: tuple[float, Target]) -> float:
    return pair[0]


def _models_answer(providers: Iterable[Provider]) -> bytes:
    data: dict[str, dict[str, object]] = {}
    for provider in providers:
        if not provider.enabled:
            continue
        for model in [*provider.models, *provider.model_map]:
            data.setdefault(model, {"id": model, "object": "model", "created": 0, "owned_by": provider.id})
    return json.dumps({"object": "list", "data": list(data.values())}).encode()

"""The configuration as the API shows it, rendered once per snapshot (`RENDERED`, `render`):
each provider masked, each routed purpose resolved, and the tags of both.

A provider's JSON is made once per snapshot, its health added per answer; a route keeps its
encoded answer and encodes it again only when the snapshot or its providers' health changed
(`Rendered.encoded_route`), so that `GET …/active/{purpose}`, the hot path, costs a few
dictionary reads. `write_api` answers a write with the same renderings (`provider_answer`,
`route_answer`, `answer_tag`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from service.config.models import AiServer, ApiKey
from service.config.snapshot import PerSnapshot, Snapshot
from service.gateway.health import Health, HealthState
from service.http import tags
from service.http.context import HEALTH
from service.vcs.gitrepo import blob_sha


@dataclass(slots=True)
class _Route:
    """One routed purpose: its answer without health, and the last encoding with health."""

    purpose: str
    primary: tuple[str, ...]
    fallbacks: tuple[str, ...]
    weights: dict[str, float]
    unavailable: tuple[str, ...] = ()
    """Ids the routing names whose files are refused with no good version: left out above."""
    health: tuple[HealthState, ...] | None = None
    encoded: bytes = b""
    confirmed: tuple[tuple[str, str | None], ...] | None = None
    etag: str = ""

    @property
    def ids(self) -> tuple[str, ...]:
        return self.primary + self.fallbacks


@dataclass(frozen=True, slots=True)
class Rendered:
    """The JSON-ready parts of one snapshot."""

    snapshot: Snapshot
    providers: Mapping[str, dict[str, Any]]
    routes: Mapping[str, _Route] = field(default_factory=dict)
    blobs: Mapping[str, str] = field(default_factory=dict)
    """Provider id -> the git blob id of its file: the first part of a provider's tag."""
    changed: Mapping[str, str | None] = field(default_factory=dict)
    """Provider id -> the commit where its file last changed (None: uncommitted, or no git):
    the second part of a provider's tag. Not the served commit, which moves with any commit."""
    routing_blob: str | None = None
    """The git blob id of the routing file: the first part of a route's tag."""
    routing_changed: str | None = None
    """The commit where the routing file last changed (None: uncommitted, no git, no file)."""
    meanings: dict[str, bytes] = field(default_factory=dict)
    """Provider id -> its configuration as a tag's hash covers it (rendered once)."""

    def provider(self, provider_id: str, health: Health) -> dict[str, Any]:
        return {**self.providers[provider_id], "health": health.get(provider_id).as_json()}

    def meaning(self, provider_id: str, health: Health) -> bytes:
        """What a tag covers of a provider (docs/reference.md §6): its configuration and its
        confirmed health status and reason; no measurement, no circuit."""
        config = self.meanings.get(provider_id)
        if config is None:
            # not the served `commit` shown beside it: it moves with commits of other files
            shown = {k: v for k, v in self.providers[provider_id].items() if k != "commit"}
            config = self.meanings[provider_id] = encode(shown)
        status, reason = health.get(provider_id).confirmed
        return config + encode([status, reason])

    def provider_tag(self, provider_id: str, health: Health) -> str:
        """The commit part is where the provider's file last changed: a commit of another file
        (or outside `providers.d/`) leaves the tag as it was, and wakes no held query."""
        changed = self.changed.get(provider_id)
        return tags.make(self.blobs[provider_id], changed, self.meaning(provider_id, health))

    def list_tag(self, ids: Iterable[str], health: Health, extra: Any = None) -> str:
        """The tag of a list of providers: `-` for its blob, and for its commit the last that
        touched `providers.d/` (a removal too: which of the files it showed went, and when, is
        not in the files left)."""
        meaning = b"\n".join(self.meaning(i, health) for i in ids) + encode(extra)
        return tags.make(None, self.snapshot.changed or self.snapshot.commit, meaning)

    def routes_tag(self, ids: Iterable[str], health: Health, shapes: Any) -> str:
        """The tag of every route at once (`GET …/active`): `-` for its blob, and for its commit
        the latest where the routing file or a provider it names changed, as a route's."""
        ids = list(ids)
        meaning = b"\n".join(self.meaning(i, health) for i in ids) + encode(shapes)
        commit = self.latest(self.routing_changed, *(self.changed.get(i) for i in ids))
        return tags.make(None, commit, meaning)

    def latest(self, *commits: str | None) -> str | None:
        """The latest of `commits` (where each of a route's files last changed: the routing
        file, the providers it names) on the served commit's first-parent line: a commit of a
        file the route does not show leaves its tag as it was. When one is not known there
        (uncommitted, no git), where the folder last changed. A provider the route names cannot
        go without the routing file changing, or the route showing it unavailable (its hash)."""
        order, latest, rank = self.snapshot.order, None, len(self.snapshot.order)
        for commit in commits:
            at = order.get(commit) if commit is not None else None
            if at is None:
                return self.snapshot.changed or self.snapshot.commit
            if at < rank:
                latest, rank = commit, at
        return latest or self.snapshot.changed or self.snapshot.commit

    def route(self, route: _Route, health: Health) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "purpose": route.purpose,
            "primary": [self.provider(i, health) for i in route.primary],
            "fallbacks": [self.provider(i, health) for i in route.fallbacks],
            "weights": route.weights,
            "commit": self.snapshot.commit,
            "generation": self.snapshot.generation,
        }
        if route.unavailable:
            answer["unavailable"] = list(route.unavailable)
        return answer

    def encoded_route(self, route: _Route, health: Health) -> tuple[bytes, str]:
        """The route's answer encoded, and its tag: each made again only when what it shows
        (measurements and circuits included) or what the tag covers changed."""
        states = tuple(health.get(i) for i in route.ids)
        if states != route.health:  # HealthState is a frozen value: equal means same answer
            route.encoded = encode(self.route(route, health))
            route.health = states
            confirmed = tuple(s.confirmed for s in states)
            if confirmed != route.confirmed:
                # If-None-Match compares the tag whole; If-Match on `PUT …/active/{purpose}`
                # (docs/reference.md §8) only its blob part, so a health change does not make an
                # edit of the route fail.
                route.etag = self.route_tag(route, health)
                route.confirmed = confirmed
        return route.encoded, route.etag

    def route_tag(self, route: _Route, health: Health) -> str:
        shape = [route.purpose, route.primary, route.fallbacks, route.weights, route.unavailable]
        meaning = b"\n".join(self.meaning(i, health) for i in route.ids) + encode(shape)
        # a route shows its routing and its providers whole: the latest where one of them changed
        commit = self.latest(self.routing_changed, *(self.changed.get(i) for i in route.ids))
        return tags.make(self.routing_blob, commit, meaning)


RENDERED = web.AppKey("llm_config_cache", PerSnapshot[Rendered])
"""The app's renderings, one per snapshot (made by `render`)."""


def render(snapshot: Snapshot) -> Rendered:
    """The JSON-ready parts of `snapshot`: its providers, masked, and its routed purposes."""
    providers: dict[str, dict[str, Any]] = {}
    blobs: dict[str, str] = {}
    changed: dict[str, str | None] = {}
    for path, loaded in snapshot.files.items():
        doc = loaded.document
        if isinstance(doc, AiServer | ApiKey):
            attribution = snapshot.attribution_of(path)
            providers[doc.id] = {**doc.describe(), "file": path, "commit": attribution.commit}
            blobs[doc.id] = blob_sha(loaded.data)
            changed[doc.id] = (attribution.changed or attribution.commit) if attribution.commit else None
    routes: dict[str, _Route] = {}
    routing_file = snapshot.file_of_kind("routing")
    routing_blob = blob_sha(snapshot.files[routing_file].data) if routing_file else None
    routing_changed = None
    if routing_file:
        attribution = snapshot.attribution_of(routing_file)
        routing_changed = (attribution.changed or attribution.commit) if attribution.commit else None
    if snapshot.routing is not None:
        for purpose, route in sorted(snapshot.routing.purposes.items()):
            primary = tuple(i for i in route.primary if i in providers)
            fallbacks = tuple(i for i in route.fallbacks if i in providers)
            missing = tuple(i for i in (*route.primary, *route.fallbacks) if i not in providers)
            weights = {i: route.weight(i) for i in primary}
            routes[purpose] = _Route(purpose, primary, fallbacks, weights, missing)
    return Rendered(
        snapshot,
        dict(sorted(providers.items())),
        routes,
        blobs,
        changed,
        routing_blob,
        routing_changed=routing_changed,
    )


def encode(body: Any) -> bytes:
    """`body` as compact JSON in UTF-8."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def provider_answer(app: web.Application, snapshot: Snapshot, provider_id: str) -> dict[str, Any] | None:
    """A provider of `snapshot` as the API shows it (masked, with health), or None."""
    rendered = app[RENDERED].of(snapshot)
    if provider_id not in rendered.providers:
        return None
    return rendered.provider(provider_id, app[HEALTH])


def answer_tag(
    app: web.Application, snapshot: Snapshot, *, provider: str = "", purpose: str = ""
) -> str | None:
    """The tag `GET …/providers/{provider}` (or `…/active/{purpose}`) gives for `snapshot` now."""
    rendered = app[RENDERED].of(snapshot)
    if provider in rendered.providers:
        return rendered.provider_tag(provider, app[HEALTH])
    route = rendered.routes.get(purpose)
    return rendered.route_tag(route, app[HEALTH]) if route is not None else None


def route_answer(app: web.Application, snapshot: Snapshot, purpose: str) -> dict[str, Any] | None:
    """A purpose's route in `snapshot` as `GET …/active/{purpose}` answers it, or None."""
    rendered = app[RENDERED].of(snapshot)
    route = rendered.routes.get(purpose)
    return rendered.route(route, app[HEALTH]) if route is not None else None

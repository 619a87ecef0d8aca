"""The masked configuration view, the difference between two views, and its replay.

A `ConfigView` is the configuration as the event log sees it: plain JSON, secrets masked.

    {"providers": {id: {field: value, ..., "file": "providers.d/x.yaml"}},
     "routing":   {purpose: {"primary": [...], "weights": {...}, "fallbacks": [...]}},
     "clients":   {name: {"scopes": [...], "limits"?: {...}, "token_sha256": "****9f86"}}}

A client's `token_sha256` is masked as a key is (`****` and its last four hex characters):
enough for the log to show that a token was replaced, never enough to use or look it up.
Logs written before it was recorded have client entries without it.

`diff_views(a, b)` lists the `Change`s that lead from `a` to `b`; applying them in order with
`apply_change` rebuilds `b` exactly. That is what lets the event log rebuild the configuration
as it stood at any time. Provider views are opaque here: whatever fields the models give them.

`apply_change` works in place: replaying a log of 100,000 events builds one view, instead
of a copy of the whole configuration per event.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

ConfigView = dict[str, Any]
"""{"providers": {...}, "routing": {...}, "clients": {...}}, JSON-serializable, masked."""

PROVIDER_ADDED: Final = "provider.added"
PROVIDER_UPDATED: Final = "provider.updated"
PROVIDER_REMOVED: Final = "provider.removed"
ROUTING_UPDATED: Final = "routing.updated"
CLIENTS_UPDATED: Final = "clients.updated"

VIEW_CHANGING_TYPES: Final = frozenset(
    {PROVIDER_ADDED, PROVIDER_UPDATED, PROVIDER_REMOVED, ROUTING_UPDATED, CLIENTS_UPDATED}
)
"""Event types that change the view; every other event type leaves it as it is."""


@dataclass(frozen=True, slots=True)
class Change:
    """One step from a view to the next: the payload of a configuration event.

    `changes` maps a field (or a purpose, or a client name) to `{"old": ..., "new": ...}`.
    In a `provider.updated` change a missing `"new"` means the field itself was removed;
    models give every provider every field, so this only happens when the models change.
    """

    type: str
    subject: str
    file: str | None
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)


def empty_view() -> ConfigView:
    """The view before anything was loaded: no providers, no routing, no clients."""
    return {"providers": {}, "routing": {}, "clients": {}}


def diff_views(
    old: ConfigView,
    new: ConfigView,
    secret_changed: frozenset[str] = frozenset(),
    *,
    routing_file: str | None,
    clients_file: str | None,
    token_changed: frozenset[str] = frozenset(),
) -> list[Change]:
    """The changes from `old` to `new`, in an order that replays validly.

    Order: providers added, providers updated, routing, providers removed (each by id), then
    clients. Added providers come before the routing that may name them, and removed ones
    after the routing that stops naming them, so no prefix of the list has routing naming a
    provider that does not exist.

    `secret_changed` holds the ids whose decrypted key changed: a key rotated to one with the
    same last four characters has the same mask, and is still recorded as a change.
    `token_changed` does the same for the names of clients whose token hash changed.
    `routing_file` and `clients_file` are the files the routing and clients changes name:
    whatever the files are called (any name counts by its kind), or None when there is none.
    """
    old_providers: Mapping[str, Any] = old.get("providers", {})
    new_providers: Mapping[str, Any] = new.get("providers", {})
    added: list[Change] = []
    updated: list[Change] = []
    removed: list[Change] = []
    for pid in sorted(old_providers.keys() | new_providers.keys()):
        before, after = old_providers.get(pid), new_providers.get(pid)
        if before is None and after is not None:
            changes = {k: {"old": None, "new": _copy(v)} for k, v in after.items()}
            added.append(Change(PROVIDER_ADDED, pid, after.get("file"), changes))
        elif after is None and before is not None:
            changes = {k: {"old": _copy(v), "new": None} for k, v in before.items()}
            removed.append(Change(PROVIDER_REMOVED, pid, before.get("file"), changes))
        elif before is not None and after is not None:
            changes = _provider_changes(before, after, rotated=pid in secret_changed)
            if changes:
                updated.append(Change(PROVIDER_UPDATED, pid, after.get("file"), changes))

    result = added + updated
    routing = _keyed_changes(old.get("routing", {}), new.get("routing", {}))
    if routing:
        result.append(Change(ROUTING_UPDATED, "routing", routing_file, routing))
    result += removed
    clients = _keyed_changes(old.get("clients", {}), new.get("clients", {}), always=token_changed)
    if clients:
        result.append(Change(CLIENTS_UPDATED, "clients", clients_file, clients))
    return result


def apply_change(
    view: ConfigView, event_type: str, subject: str | None, changes: Mapping[str, Mapping[str, Any]]
) -> ConfigView:
    """Apply one event to `view`, in place, and return `view`.

    Nothing of the view is copied: a replay builds one view whatever the length of the log.
    Values are taken from `changes` as they are, so the view may share them with the event
    it came from; neither is ever modified in place afterwards (a changed value is replaced,
    never edited). Events that do not change the configuration (service.started,
    config.rejected, provider.health_changed, secret.read, ...) leave it as it is.
    """
    for key in ("providers", "routing", "clients"):
        view.setdefault(key, {})
    if event_type not in VIEW_CHANGING_TYPES:
        return view
    if event_type == ROUTING_UPDATED:
        _apply_keyed(view["routing"], changes)
    elif event_type == CLIENTS_UPDATED:
        _apply_keyed(view["clients"], changes)
    elif subject is None:
        raise ValueError(f"a {event_type} event needs a subject")
    elif event_type == PROVIDER_REMOVED:
        view["providers"].pop(subject, None)
    else:
        providers = view["providers"]
        # A new dict, not an edit of the old one: an earlier caller may hold the old one.
        provider: dict[str, Any] = {} if event_type == PROVIDER_ADDED else dict(providers.get(subject, {}))
        for name, change in changes.items():
            if "new" in change:
                provider[name] = change["new"]
            else:
                provider.pop(name, None)
        providers[subject] = provider
    return view


def _provider_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], *, rotated: bool
) -> dict[str, dict[str, Any]]:
    changes: dict[str, dict[str, Any]] = {}
    for name in sorted(before.keys() | after.keys()):
        if name not in after:
            changes[name] = {"old": _copy(before[name])}
        elif name not in before or not _same(before[name], after[name]):
            changes[name] = {"old": _copy(before.get(name)), "new": _copy(after[name])}
    if rotated and "api_key" not in changes and "api_key" in after:
        changes["api_key"] = {"old": before.get("api_key"), "new": after["api_key"]}
    return changes


def _keyed_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], always: frozenset[str] = frozenset()
) -> dict[str, dict[str, Any]]:
    """Per key (purpose, client name): {"old": value-or-None, "new": value-or-None}; a key in
    `always` that is on both sides is listed even when its two values read the same."""
    changes: dict[str, dict[str, Any]] = {}
    for key in sorted(before.keys() | after.keys()):
        old_value, new_value = before.get(key), after.get(key)
        forced = key in always and old_value is not None and new_value is not None
        if forced or not _same(old_value, new_value):
            changes[key] = {"old": _copy(old_value), "new": _copy(new_value)}
    return changes


def _apply_keyed(target: dict[str, Any], changes: Mapping[str, Mapping[str, Any]]) -> None:
    for key, change in changes.items():
        new_value = change.get("new")
        if new_value is None:
            target.pop(key, None)
        else:
            target[key] = new_value


def _same(a: Any, b: Any) -> bool:
    # Compared as JSON text, not with ==: True == 1 == 1.0 in Python, but not in the log.
    return a is b or json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _copy(value: Any) -> Any:
    return copy.deepcopy(value)

"""The masked view: diffs, and their replay rebuilding the target view exactly."""

from __future__ import annotations

import copy
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from service.config.view import Change, ConfigView, apply_change, diff_views, empty_view
from tests.support.strategies import ids, views
from tests.support.views import provider_view as provider
from tests.support.views import view_of


def replayed(start: ConfigView, changes: list[Change]) -> ConfigView:
    view = copy.deepcopy(start)
    for change in changes:
        apply_change(view, change.type, change.subject, change.changes)
    return view


def diff(old: ConfigView, new: ConfigView, secret_changed: frozenset[str] = frozenset()) -> list[Change]:
    return diff_views(
        old,
        new,
        secret_changed,
        routing_file="providers.d/routing.yaml",
        clients_file="providers.d/clients.yaml",
    )


def as_json(view: ConfigView) -> str:
    return json.dumps(view, sort_keys=True)


def test_added_provider_lists_every_field_as_new() -> None:
    [change] = diff(empty_view(), view_of(provider("a")))

    assert change.type == "provider.added"
    assert change.subject == "a"
    assert change.file == "providers.d/a.yaml"
    assert change.changes["api_key"] == {"old": None, "new": "****5d80"}
    assert set(change.changes) == set(provider("a"))


def test_updated_provider_lists_only_the_fields_that_differ() -> None:
    old = view_of(provider("a"))
    new = view_of(provider("a", base_url="https://b/v1", api_key="****9a1c"))

    [change] = diff(old, new)

    assert change.type == "provider.updated"
    assert change.changes == {
        "api_key": {"old": "****5d80", "new": "****9a1c"},
        "base_url": {"old": "https://openrouter.ai/api/v1", "new": "https://b/v1"},
    }


def test_key_rotated_to_the_same_last_four_characters_is_still_a_change() -> None:
    view = view_of(provider("a"))

    assert diff(view, view) == []
    [change] = diff(view, view, secret_changed=frozenset({"a"}))
    assert change.changes == {"api_key": {"old": "****5d80", "new": "****5d80"}}


def test_removed_provider_lists_every_field_as_old() -> None:
    [change] = diff(view_of(provider("a")), empty_view())

    assert change.type == "provider.removed"
    assert change.changes["id"] == {"old": "a", "new": None}


def test_routing_and_clients_changes_are_per_purpose_and_per_client() -> None:
    chat = {"primary": ["a"], "weights": {}, "fallbacks": []}
    old = view_of(provider("a"), routing={"chat": chat}, clients={"ops": {"scopes": ["admin"]}})
    new = view_of(
        provider("a"),
        routing={"chat": chat, "embeddings": {"primary": ["a"], "weights": {}, "fallbacks": []}},
        clients={"ci": {"scopes": ["config:read"]}},
    )

    routing, clients = diff_views(old, new, routing_file="conf/routes.yaml", clients_file="conf/tokens.yaml")

    assert (routing.type, routing.subject, routing.file) == ("routing.updated", "routing", "conf/routes.yaml")
    assert (clients.type, clients.file) == ("clients.updated", "conf/tokens.yaml")
    assert list(routing.changes) == ["embeddings"]
    assert routing.changes["embeddings"]["old"] is None
    assert clients.changes == {
        "ci": {"old": None, "new": {"scopes": ["config:read"]}},
        "ops": {"old": {"scopes": ["admin"]}, "new": None},
    }


def test_a_token_replaced_to_one_with_the_same_mask_is_still_a_clients_change() -> None:
    """`token_changed` names the clients whose hash changed: listed even when the two masks read
    the same (the hashes end alike), as a rotated key is; one not on both sides adds nothing."""
    entry = {"scopes": ["admin"], "token_sha256": "****5d80"}
    old = view_of(clients={"ops": entry, "ci": {"scopes": ["admin"], "token_sha256": "****0001"}})
    new = view_of(clients={"ops": dict(entry)})

    [change] = diff_views(
        old,
        new,
        routing_file=None,
        clients_file="providers.d/clients.yaml",
        token_changed=frozenset({"ops", "x"}),
    )

    assert change.type == "clients.updated"
    assert change.changes == {
        "ci": {"old": {"scopes": ["admin"], "token_sha256": "****0001"}, "new": None},
        "ops": {"old": entry, "new": entry},
    }
    view = copy.deepcopy(old)
    assert apply_change(view, change.type, change.subject, change.changes) == new
    assert diff_views(old, new, routing_file=None, clients_file=None)[0].changes.keys() == {"ci"}


def test_order_keeps_every_prefix_naming_only_existing_providers() -> None:
    old = view_of(provider("gone"), provider("kept"), routing={"chat": {"primary": ["gone"]}})
    new = view_of(provider("kept", enabled=False), provider("new"), routing={"chat": {"primary": ["new"]}})

    changes = diff_views(old, new, routing_file="conf/routing.yaml", clients_file=None)

    assert [(c.type, c.subject) for c in changes] == [
        ("provider.added", "new"),
        ("provider.updated", "kept"),
        ("routing.updated", "routing"),
        ("provider.removed", "gone"),
    ]
    assert changes[2].file == "conf/routing.yaml"
    view = copy.deepcopy(old)
    for change in changes:
        apply_change(view, change.type, change.subject, change.changes)
        named = {pid for route in view["routing"].values() for pid in route["primary"]}
        assert named <= set(view["providers"])


def test_types_differ_even_when_python_calls_them_equal() -> None:
    old = view_of(provider("a", timeout_s=1, enabled=True))
    new = view_of(provider("a", timeout_s=1.0, enabled=1))

    assert as_json(replayed(old, diff(old, new))) == as_json(new)


def test_a_field_that_disappears_is_removed_on_replay() -> None:
    old = view_of(provider("a", legacy="x"))
    new = view_of(provider("a"))

    [change] = diff(old, new)

    assert change.changes == {"legacy": {"old": "x"}}
    assert replayed(old, [change]) == new


def test_apply_change_builds_in_place_and_never_edits_a_provider_someone_holds() -> None:
    old = view_of(provider("a"), routing={"chat": {"primary": ["a"]}})
    new = view_of(provider("a", models=["m"]), routing={"chat": {"primary": ["a", "b"]}})
    held = old["providers"]["a"]
    frozen = copy.deepcopy(held)

    changes = diff(old, new)
    result = old
    for change in changes:
        assert apply_change(old, change.type, change.subject, change.changes) is old  # in place

    assert result == new
    assert held == frozen  # the provider's old dict was replaced, not edited
    result["providers"]["a"]["models"].append("changed")
    assert new["providers"]["a"]["models"] == ["m"]  # diffs copy what they take from a view


def test_events_that_do_not_change_the_configuration_leave_the_view_alone() -> None:
    view = view_of(provider("a"))
    before = copy.deepcopy(view)
    for event_type in ("service.started", "config.rejected", "provider.health_changed", "secret.read"):
        changes = {"status": {"old": "unknown", "new": "healthy"}}
        assert apply_change(view, event_type, "a", changes) == before


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(views, min_size=1, max_size=5), st.frozensets(ids))
def test_replaying_diffs_rebuilds_each_view_exactly(
    sequence: list[ConfigView], rotated: frozenset[str]
) -> None:
    view = empty_view()
    for target in sequence:
        changes = diff(view, target, rotated)
        view = replayed(view, changes)
        assert as_json(view) == as_json(target)
        assert diff(view, target) == []

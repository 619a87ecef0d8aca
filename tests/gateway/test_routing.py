"""Candidate ordering (docs/reference.md §7): weighted primaries, fallbacks in order, what is skipped."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from service.config.models import AiServer, Routing
from service.config.snapshot import Snapshot
from service.gateway.health import CheckResult, Health
from service.gateway.routing import Router, first_healthy


def _server(provider_id: str, **fields: Any) -> AiServer:
    doc = {"kind": "ai_server", "id": provider_id, "server_type": "vllm", "base_url": "http://127.0.0.1:9/v1"}
    return AiServer.model_validate({**doc, **fields})


def _snapshot(routes: dict[str, Any], *servers: AiServer, generation: int = 1) -> Snapshot:
    routing = Routing.model_validate({"kind": "routing", "purposes": routes})
    return Snapshot(generation=generation, providers={s.id: s for s in servers}, routing=routing)


def _ids(
    router: Router, snapshot: Snapshot, model: str | None = None, health: Health | None = None
) -> list[str]:
    table = router.table(snapshot)
    return [p.id for p in router.candidates(table, "chat", model, health or Health())]


def test_primaries_come_first_then_fallbacks_in_order() -> None:
    snapshot = _snapshot({"chat": {"primary": ["a", "b"], "fallbacks": ["y", "x"]}}, *map(_server, "abxy"))
    router = Router(random.Random(1))
    orders = {tuple(_ids(router, snapshot)) for _ in range(50)}
    assert orders == {("a", "b", "y", "x"), ("b", "a", "y", "x")}


def test_weights_set_how_often_each_primary_goes_first() -> None:
    snapshot = _snapshot(
        {"chat": {"primary": ["a", "b", "c"], "weights": {"a": 6, "b": 3}}}, *map(_server, "abc")
    )
    router = Router(random.Random(42))
    firsts = Counter(_ids(router, snapshot)[0] for _ in range(20_000))
    shares = {k: v / 20_000 for k, v in firsts.items()}
    assert abs(shares["a"] - 0.6) < 0.02 and abs(shares["b"] - 0.3) < 0.02 and abs(shares["c"] - 0.1) < 0.02


def test_the_same_seed_gives_the_same_orders() -> None:
    snapshot = _snapshot({"chat": {"primary": ["a", "b", "c"]}}, *map(_server, "abc"))
    router_a, router_b = Router(random.Random(7)), Router(random.Random(7))
    assert [_ids(router_a, snapshot) for _ in range(20)] == [_ids(router_b, snapshot) for _ in range(20)]


def test_providers_that_exclude_the_model_are_skipped() -> None:
    snapshot = _snapshot(
        {"chat": {"primary": ["a"], "fallbacks": ["b", "c"]}},
        _server("a", models=["m1"]),
        _server("b", models=["m2"], model_map={"alias": "m2"}),
        _server("c"),
    )
    router = Router()
    assert _ids(router, snapshot, "m1") == ["a", "c"]
    assert _ids(router, snapshot, "alias") == ["b", "c"]
    assert _ids(router, snapshot, "other") == ["c"]
    assert _ids(router, snapshot, None) == ["a", "b", "c"]


def test_disabled_providers_and_open_circuits_are_skipped() -> None:
    # Routing refuses to name a disabled provider; the router still checks, as a second line.
    snapshot = _snapshot(
        {"chat": {"primary": ["a", "b"], "fallbacks": ["c"]}},
        _server("a"),
        _server("b", enabled=False),
        _server("c"),
    )
    health = Health(failures=1, cooldown_s=60)
    health.failed("a", "HTTP 500")
    assert _ids(Router(), snapshot, health=health) == ["c"]


def test_a_purpose_without_routing_has_no_candidates() -> None:
    snapshot = _snapshot({"chat": {"primary": "a"}}, _server("a", purposes=["chat", "embeddings"]))
    router = Router()
    assert router.candidates(router.table(snapshot), "embeddings", None, Health()) == []
    assert router.candidates(router.table(Snapshot()), "chat", None, Health()) == []


def test_the_table_is_built_once_per_snapshot() -> None:
    one = _snapshot({"chat": {"primary": "a"}}, _server("a"))
    two = _snapshot({"chat": {"primary": "a"}}, _server("a", base_url="http://127.0.0.1:10/v1"), generation=2)
    router = Router()
    table = router.table(one)
    assert router.table(one) is table
    assert router.table(two) is not table
    assert router.table(two).routes["chat"].primaries[0].endpoint == "http://127.0.0.1:10/v1"


def test_first_healthy_follows_the_written_order() -> None:
    snapshot = _snapshot({"chat": {"primary": ["a", "b"], "fallbacks": ["c"]}}, *map(_server, "abc"))
    table = Router().table(snapshot)
    health = Health(failures=1, cooldown_s=60)
    target = first_healthy(table, "chat", health)
    assert target is not None and target.id == "a"
    health.failed("a", "HTTP 500")
    health.checked("b", CheckResult(False, 1.0, "HTTP 401"))
    target = first_healthy(table, "chat", health)
    assert target is not None and target.id == "c"
    health.failed("c", "HTTP 500")
    assert first_healthy(table, "chat", health) is None


def test_the_weighted_order_is_efraimidis_spirakis_draw_for_draw() -> None:
    """Each primary draws `u ** (1 / w)` in the written order and the largest goes first (ties
    keep the written order); the same draws give the same order as this reference."""
    snapshot = _snapshot(
        {"chat": {"primary": ["a", "b", "c", "d"], "weights": {"a": 5, "b": 1, "c": 2}, "fallbacks": ["x"]}},
        *map(_server, "abcdx"),
    )
    router, reference = Router(random.Random(3)), random.Random(3)
    weights = {"a": 5.0, "b": 1.0, "c": 2.0, "d": 1.0}
    for _ in range(200):
        keys = [(reference.random() ** (1.0 / weights[p]), p) for p in "abcd"]
        expected = [p for _, p in sorted(keys, key=lambda pair: pair[0], reverse=True)] + ["x"]
        assert _ids(router, snapshot) == expected

"""Hypothesis strategies shared by the tests: configuration views made of arbitrary JSON."""

from __future__ import annotations

from hypothesis import strategies as st

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
ids = st.sampled_from(["a", "b", "c", "d"])
fields = st.dictionaries(st.sampled_from(["api_key", "base_url", "models", "enabled", "x"]), json_value)
providers = st.dictionaries(ids, fields.map(lambda f: {"kind": "api_key", **f}), max_size=4)
routes = st.dictionaries(
    st.sampled_from(["chat", "embeddings", "reranking"]),
    st.fixed_dictionaries(
        {"primary": st.lists(ids, max_size=2), "weights": st.dictionaries(ids, st.integers())}
    ),
    max_size=3,
)
clients = st.dictionaries(ids, st.fixed_dictionaries({"scopes": st.lists(st.text(max_size=6), max_size=2)}))
views = st.fixed_dictionaries({"providers": providers, "routing": routes, "clients": clients})
"""A masked configuration view (`service.config.view.ConfigView`) of arbitrary content."""

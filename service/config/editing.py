"""How a document of `providers.d/` is changed by a write over HTTP (docs/reference.md §8), as text.

A new file is written in the shape of the examples (the schema modeline, then the fields in
a fixed order); an existing one is edited as a YAML round trip (ruamel.yaml), so comments,
key order and the modeline a person wrote stay. Values are set through the YAML emitter,
never pasted into text, so no field can smuggle YAML (a newline and `kind: clients`, say)
into the file. Encryption is the caller's: these functions see the plaintext.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from typing import Any

import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.representer import RoundTripRepresenter

from service.config.models import MODELS

FIELD_ORDER = (
    "kind",
    "id",
    "name",
    "provider",
    "server_type",
    "base_url",
    "api_key",
    "models",
    "model_map",
    "purposes",
    "enabled",
    "connect_timeout_s",
    "timeout_s",
    "first_byte_timeout_s",
    "idle_timeout_s",
)
"""The order of a new provider file's fields; fields not listed follow in the order given."""

MAX_DEPTH = 32
"""Deeper JSON than any document needs is refused before it reaches YAML."""


class _Given(str):
    """A string a write sets, as opposed to one read from the file (which is written as it was)."""


_STR = "tag:yaml.org,2002:str"
_PYYAML = pyyaml.resolver.Resolver()
_NOT_PLAIN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff]")
"""Characters the service's reader (PyYAML, YAML 1.1) takes for line breaks or refuses unquoted."""


def _represent_given(representer: RoundTripRepresenter, data: _Given) -> ScalarNode:
    # ruamel writes YAML 1.2, the service reads 1.1: `yes`, `on`, `1:20` unquoted would come
    # back as true, true and 80, and a NEL (U+0085) as a space. Those are double-quoted.
    tag = _PYYAML.resolve(pyyaml.ScalarNode, data, (True, False))  # type: ignore[no-untyped-call]
    misread = _NOT_PLAIN.search(data) or tag != _STR
    return representer.represent_scalar(_STR, str(data), style='"' if misread else None)


def _represent_float(representer: RoundTripRepresenter, data: float) -> ScalarNode:
    # YAML 1.1 wants a dot in a float (`1e-05` is a string to PyYAML).
    text = repr(data).lower()
    if math.isfinite(data) and "e" in text and "." not in text:
        return representer.represent_scalar("tag:yaml.org,2002:float", text.replace("e", ".0e", 1))
    return representer.represent_float(data)


class _Representer(RoundTripRepresenter):
    """Values a write sets are written so that the service reads back exactly those values."""


_Representer.add_representer(_Given, _represent_given)
_Representer.add_representer(float, _represent_float)


def _given(value: Any) -> Any:
    """`value` (JSON data from a write) with its strings marked for `_represent_given`."""
    if isinstance(value, Mapping):
        return {_given(k): _given(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_given(v) for v in value]
    return _Given(value) if type(value) is str else value


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.Representer = _Representer
    yaml.width = 4096  # long URLs and keys stay on one line
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.preserve_quotes = True
    return yaml


def merge_patch(target: Any, patch: Any) -> Any:
    """`target` with a JSON merge patch (RFC 7386) applied; neither argument is modified."""
    if not isinstance(patch, Mapping):
        return patch
    result: dict[str, Any] = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply `value` nests (a scalar is 0); stops counting past `limit`."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        if isinstance(item, Mapping):
            stack += [(v, level + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, level + 1) for v in item]
    return deepest


def load(text: bytes) -> dict[str, Any]:
    """A document's plaintext as plain data (no sops block); {} for text that is not a mapping."""
    tree = _yaml().load(text)
    if not isinstance(tree, Mapping):
        return {}
    return {str(k): _plain(v) for k, v in tree.items() if k != "sops"}


def render_new(document: Mapping[str, Any]) -> bytes:
    """A new file for `document`: the schema modeline, then its fields in `FIELD_ORDER`."""
    kind = str(document.get("kind", ""))
    ordered = CommentedMap()
    for key in sorted(document, key=_position):
        ordered[key] = _given(document[key])
    header = ""
    if kind in MODELS:
        header = f"# yaml-language-server: $schema=../schemas/{kind}.schema.json\n"
    return header.encode() + _dump(ordered)


def render_edit(original: bytes, document: Mapping[str, Any]) -> bytes:
    """`original` (plaintext YAML) changed to hold exactly `document`: comments and order kept."""
    tree = _yaml().load(original)
    if not isinstance(tree, CommentedMap):
        return render_new(document)
    tree.pop("sops", None)
    _merge(tree, document)
    return _dump(tree)


def _merge(tree: CommentedMap, document: Mapping[str, Any]) -> None:
    """`tree` changed in place to hold exactly `document`, a mapping in it edited key by key, so
    that what did not change (another purpose of a route) keeps its comments and style."""
    for key in [k for k in tree if k not in document]:
        del tree[key]
    for key, value in document.items():
        if key not in tree:
            tree.insert(_insert_at(tree, key), key, _given(value))
        elif isinstance(tree[key], CommentedMap) and isinstance(value, Mapping):
            _merge(tree[key], value)
        elif _plain(tree[key]) != value:
            tree[key] = _given(value)


def _dump(tree: Any) -> bytes:
    out = io.StringIO()
    _yaml().dump(tree, out)
    return out.getvalue().encode("utf-8")


def _position(key: str) -> tuple[int, str]:
    return (FIELD_ORDER.index(key), "") if key in FIELD_ORDER else (len(FIELD_ORDER), key)


def _insert_at(tree: CommentedMap, key: str) -> int:
    """Where a new key goes in an existing file: after the last present key that precedes it."""
    rank = _position(key)
    keys = list(tree)
    for index in range(len(keys) - 1, -1, -1):
        if _position(str(keys[index])) <= rank:
            return index + 1
    return 0


def _plain(value: Any) -> Any:
    """ruamel's round-trip types as plain JSON-like values, for comparing and reading."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value

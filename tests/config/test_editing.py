"""Documents changed as text: merge patches, new files in the examples' shape, edits that keep comments."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from service.config import editing
from service.config.loader import parse
from tests.conftest import SopsProject


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7386, appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7386(target: Any, patch: Any, result: Any) -> None:
    assert editing.merge_patch(target, patch) == result


def test_a_new_file_has_the_modeline_and_the_examples_order() -> None:
    text = editing.render_new(
        {
            "purposes": ["chat"],
            "base_url": "http://h:1/v1",
            "id": "gpu",
            "server_type": "vllm",
            "kind": "ai_server",
        }
    ).decode()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=../schemas/ai_server.schema.json"
    assert [line.split(":")[0] for line in text.splitlines()[1:5]] == [
        "kind",
        "id",
        "server_type",
        "base_url",
    ]
    assert parse("providers.d/gpu.yaml", text.encode()).document.id == "gpu"


def test_an_edit_keeps_comments_order_and_untouched_values() -> None:
    original = (
        b"# yaml-language-server: $schema=../schemas/ai_server.schema.json\n"
        b"# The GPU box in rack 4.\n"
        b"kind: ai_server\n"
        b"id: gpu\n"
        b"server_type: vllm   # upgraded in May\n"
        b"base_url: 'http://h:1/v1'\n"
        b"purposes: [chat]\n"
    )
    document = editing.load(original)
    edited = editing.render_edit(original, {**document, "name": "GPU", "purposes": ["chat", "embeddings"]})
    text = edited.decode()
    assert text.startswith("# yaml-language-server: $schema=../schemas/ai_server.schema.json\n# The GPU box")
    assert "server_type: vllm   # upgraded in May" in text and "base_url: 'http://h:1/v1'" in text
    assert text.index("name: GPU") < text.index("server_type")  # where FIELD_ORDER puts it
    assert yaml.safe_load(text)["purposes"] == ["chat", "embeddings"]
    removed = editing.render_edit(edited, {k: v for k, v in editing.load(edited).items() if k != "name"})
    assert "name:" not in removed.decode()


@pytest.mark.parametrize(
    "value",
    [
        "x\nkind: clients",
        "'; rm -rf /",
        "{{ template }}",
        "*alias",
        "&anchor x",
        "- item",
        "---\nkind: x",
        "\x00",
        # YAML 1.2 (ruamel) writes these plain; the service reads 1.1 (PyYAML): bools, ints...
        "yes",
        "On",
        "1:20",
        "0b1",
        "1_000",
        "2001-12-14",
        "<<",
        # ...and line breaks: a NEL came back as a space
        "\x85",
        "a\u2028b",
        "\ufeff",
    ],
)
def test_no_value_changes_the_shape_of_the_file(value: str) -> None:
    text = editing.render_new({"kind": "ai_server", "id": "gpu", "name": value, "model_map": {value: value}})
    document = yaml.safe_load(text)
    assert document == {"kind": "ai_server", "id": "gpu", "name": value, "model_map": {value: value}}


def test_depth_counts_nesting_and_stops_early() -> None:
    assert editing.depth({"a": [1, {"b": 2}]}) == 3
    deep: Any = []
    for _ in range(10_000):
        deep = [deep]
    assert editing.depth(deep) > editing.MAX_DEPTH


def test_a_number_is_written_as_the_service_reads_it() -> None:
    document = {"kind": "ai_server", "id": "gpu", "timeout_s": 1e-05, "first_byte_timeout_s": 1e20}
    assert yaml.safe_load(editing.render_new(document)) == document  # `1e-05` is a string in YAML 1.1


def test_an_edit_leaves_the_values_it_does_not_change_as_they_were_written() -> None:
    original = b"kind: ai_server\nid: gpu\nenabled: yes\n"
    text = editing.render_edit(original, {"kind": "ai_server", "id": "gpu", "enabled": "yes", "name": "on"})
    assert text == b'kind: ai_server\nid: gpu\nname: "on"\nenabled: yes\n'


@pytest.mark.parametrize("key", ["123456789012345", "012345678901234", "1e5", "0x1F", "yes", "true", "1_000"])
def test_a_key_a_write_sends_as_digits_is_encrypted_as_a_string(sops_project: SopsProject, key: str) -> None:
    """A write over HTTP renders its file before sops encrypts it: a key of digits is quoted
    there, so sops (YAML 1.2) stores it as `type:str` (docs/reference.md §2.4)."""
    document = {"kind": "api_key", "id": "k", "provider": "openrouter", "api_key": key}
    path = sops_project.providers / "k.yaml"
    for text in (editing.render_new(document), editing.render_edit(b"kind: api_key\nid: k\n", document)):
        encrypted = sops_project.sops.encrypt(text, str(path))
        assert b",type:str]" in encrypted
        assert parse("providers.d/k.yaml", encrypted).encrypted

"""The checked-in JSON Schemas (`schemas/`) take what the loader takes, and refuse what it refuses.

Editors check files against them through the modeline (`yaml-language-server`), and CI may
run a JSON Schema validator on them: a file the service accepts must not be flagged, and a
value the service refuses should be flagged where the schema can say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.config.loader import config_files, parse
from service.errors import FileRejected

ROOT = Path(__file__).resolve().parents[2]
ENC = "ENC[AES256_GCM,data:Zm9v,iv:aXZpdml2aXZpdml2aXY=,tag:dGFndGFndGFndGFn,type:str]"
SERVER = "kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: http://10.0.0.5:8000/v1\n"
KEY = f"kind: api_key\nid: gpu\nprovider: openai\napi_key: {ENC}\nsops:\n  version: 3.11.0\n"
ROUTING = "kind: routing\npurposes:\n  chat:\n"


def schema_problems(document: dict[str, Any]) -> list[str]:
    schema = json.loads((ROOT / "schemas" / f"{document['kind']}.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    return [error.message for error in validator.iter_errors(document)]


def loader_accepts(text: str) -> bool:
    try:
        parse("providers.d/gpu.yaml", text.encode())
    except FileRejected:
        return False
    return True


def test_the_shipped_examples_pass_their_schemas() -> None:
    files = config_files(ROOT / "providers.d")
    assert files
    for path in files:
        assert schema_problems(yaml.safe_load(path.read_text(encoding="utf-8"))) == [], path.name


def test_the_routing_example_of_the_reference_passes_its_schema() -> None:
    """docs/reference.md §2.2: `primary: local-tei` (one id) as well as a list."""
    example = (
        "kind: routing\npurposes:\n  chat:\n    primary: [openrouter-default, local-vllm]\n"
        "    weights: {openrouter-default: 3}\n    fallbacks: [openai-backup]\n"
        "  embeddings:\n    primary: local-tei\n  reranking:\n    primary: local-infinity\n"
    )
    assert loader_accepts(example)
    assert schema_problems(yaml.safe_load(example)) == []


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        (ROUTING + "    primary: a\n    fallbacks: b\n", True),
        (ROUTING + "    primary: [a, b]\n    fallbacks: [c]\n    weights: {a: 3, b: 0.5}\n", True),
        (ROUTING + "    primary: []\n", False),
        (ROUTING + "    primary: [a, a]\n", False),
        (ROUTING + "    primary: [a]\n    fallbacks: [b, b]\n", False),
        (ROUTING + "    primary: [a]\n    weights: {a: 0}\n", False),
        (ROUTING + "    primary: [a]\n    weights: {a: -1}\n", False),
        (ROUTING + "    primary: [Upper]\n", False),
        (SERVER + "purposes: [chat, embeddings]\n", True),
        (SERVER + "purposes: [chat, chat]\n", False),
        (SERVER + "purposes: []\n", False),
        (SERVER + "protocols: [chat, chat]\n", False),
        (SERVER + "timeout_s: 0\n", False),
        (SERVER.replace("http://", "HTTP://"), True),
        (SERVER.replace("/v1", "/v 1"), False),
        (SERVER.replace("http://10.0.0.5:8000/v1", '"http://10.0.0.5:8000/\\tv1"'), False),
        (SERVER.replace("http://", "http://user:pass@"), False),
        (SERVER.replace("/v1", "/v1?x=1"), False),
        (SERVER.replace("/v1", "/v1#top"), False),
        (SERVER + f"api_key: {ENC}\n", False),  # encrypted, but without the sops block
        (SERVER + "budget: {usd: 1000000000000, period: month}\n", True),
        (SERVER + "budget: {usd: 1000000000001, period: month}\n", False),
        (KEY, True),
        (KEY.replace(ENC, "ENC[AES256_GCM,not sops]"), False),
    ],
)
def test_the_schema_and_the_loader_agree(text: str, accepted: bool) -> None:
    assert loader_accepts(text) is accepted
    assert (schema_problems(yaml.safe_load(text)) == []) is accepted

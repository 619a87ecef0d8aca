"""The protocols a provider's upstream speaks natively (docs/reference.md §14): listed, or its
kind's default."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config.models import AiServer, ApiKey

SEALED = "ENC[AES256_GCM,data:AAAA,iv:AAAA,tag:AAAA,type:str]"


def vendor(name: str, **fields: object) -> ApiKey:
    doc = {"kind": "api_key", "id": "v", "provider": name, "api_key": SEALED}
    return ApiKey.model_validate({**doc, **fields})


def server(server_type: str, **fields: object) -> AiServer:
    doc = {"kind": "ai_server", "id": "s", "server_type": server_type, "base_url": "http://gpu:8000/v1"}
    return AiServer.model_validate({**doc, **fields})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("anthropic", {"messages"}),
        ("openai", {"chat", "responses", "completions"}),
        ("openrouter", {"chat", "completions"}),
        ("together", {"chat", "completions"}),
        ("fireworks", {"chat", "completions"}),
        ("groq", {"chat"}),
        ("mistral", {"chat"}),
        ("gemini", {"chat"}),
        ("cohere", {"chat"}),
    ],
)
def test_a_vendor_speaks_its_default_protocols_unless_listed(name: str, expected: set[str]) -> None:
    provider = vendor(name)
    assert provider.protocols is None
    assert provider.native_protocols == expected


@pytest.mark.parametrize(
    ("server_type", "expected"),
    [
        ("vllm", {"chat", "responses", "completions"}),
        ("llamacpp", {"chat", "completions"}),
        ("ollama", {"chat", "completions"}),
        ("lmstudio", {"chat", "completions"}),
        ("tgi", {"chat", "completions"}),
        ("openai_compatible", {"chat", "completions"}),
        ("tei", {"chat"}),
        ("infinity", {"chat"}),
    ],
)
def test_a_server_speaks_its_types_default_protocols(server_type: str, expected: set[str]) -> None:
    assert server(server_type).native_protocols == expected


def test_a_listed_protocols_replace_the_default_and_show_in_the_view() -> None:
    provider = server("vllm", protocols=["chat", "messages"])
    assert provider.native_protocols == {"chat", "messages"}
    assert provider.describe()["protocols"] == ["chat", "messages"]
    assert "protocols" not in server("vllm").describe()  # unset: the view of older files is unchanged


@pytest.mark.parametrize("bad", [[], ["chat", "chat"], ["grpc"], "chat", [1]])
def test_protocols_are_a_non_empty_list_of_known_protocols_each_once(bad: object) -> None:
    with pytest.raises(ValidationError):
        server("vllm", protocols=bad)

"""A request mapped onto OpenTelemetry's GenAI conventions: names, hosts, bounded values."""

from __future__ import annotations

from service.gateway.tracing import missing_packages
from service.gateway.tracing.semconv import Bounded, operation, provider_name, server


def test_operations_follow_the_conventions_names() -> None:
    assert operation("chat", "chat") == "chat"
    assert operation("chat", "messages") == "chat"
    assert operation("chat", "responses") == "chat"
    assert operation("chat", "completions") == "text_completion"
    assert operation("embeddings", "chat") == "embeddings"
    assert operation("reranking", "chat") == "rerank"
    assert operation("chat", "count_tokens") == "count_tokens"


def test_provider_names_follow_the_conventions_where_they_name_one() -> None:
    assert [provider_name(v) for v in ("openai", "anthropic", "mistral", "xai", "gemini", "vllm")] == [
        "openai",
        "anthropic",
        "mistral_ai",
        "x_ai",
        "gcp.gemini",
        "vllm",
    ]


def test_the_server_is_the_host_alone_never_credentials_path_or_query() -> None:
    assert server("https://user:sk-secret@api.example.com/v1?key=sk-other") == ("api.example.com", 443)
    assert server("http://127.0.0.1:8001/v1") == ("127.0.0.1", 8001)
    assert server("http://[::1]:9/v1") == ("::1", 9)
    assert server("http://gpu/v1") == ("gpu", 80)
    assert server("not a url") is None
    assert server("http://host:99999/") is None  # a port out of range


def test_values_a_client_chooses_are_bounded_in_number_and_length() -> None:
    bounded = Bounded(limit=2, longest=10)
    assert [bounded(m) for m in ("a", "b", "c", "a", None, "x" * 11)] == [
        "a",
        "b",
        "other",
        "a",
        "other",
        "other",
    ]


def test_every_package_an_exporter_needs_is_installed() -> None:
    assert missing_packages("http/protobuf", "grpc") == []

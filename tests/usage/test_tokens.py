"""Usage normalised before pricing (docs/reference.md §13): each token counted once, whatever the protocol."""

from __future__ import annotations

from typing import Any

import pytest

from service.usage.record import Tokens
from service.usage.tokens import MAX_TOKENS, normalise, queries, queries_asked


def test_openai_prompt_tokens_include_the_cached_ones_and_completion_the_reasoning() -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 400},
        "completion_tokens_details": {"reasoning_tokens": 200},
    }
    tokens = normalise(usage)
    assert tokens == Tokens(input=600, cached_input=400, cache_write=0, output=300, reasoning=200)
    assert tokens.prompt == 1000 and tokens.total == 1300


def test_anthropic_input_tokens_exclude_cache_reads_and_writes() -> None:
    usage = {
        "input_tokens": 50,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 200,
        "output_tokens": 80,
    }
    tokens = normalise(usage)
    assert tokens == Tokens(input=50, cached_input=1000, cache_write=200, output=80)
    assert tokens.prompt == 1250  # a record's prompt_tokens: every input token


def test_litellms_anthropic_usage_keeps_cache_writes_inside_prompt_tokens() -> None:
    usage = {
        "prompt_tokens": 1250,
        "completion_tokens": 80,
        "prompt_tokens_details": {"cached_tokens": 1000},
        "cache_creation_input_tokens": 200,
    }
    assert normalise(usage) == Tokens(input=50, cached_input=1000, cache_write=200, output=80)


def test_responses_input_tokens_include_the_cached_ones() -> None:
    usage = {
        "input_tokens": 900,
        "input_tokens_details": {"cached_tokens": 100},
        "output_tokens": 50,
        "output_tokens_details": {"reasoning_tokens": 20},
    }
    assert normalise(usage) == Tokens(input=800, cached_input=100, output=50, reasoning=20)


def test_an_explicit_zero_is_a_zero_and_no_usage_is_none() -> None:
    assert normalise({"prompt_tokens": 0, "completion_tokens": 0}) == Tokens()
    assert normalise(None) is None
    assert normalise({"total_tokens": 7}) == Tokens(input=7)  # a rerank's usage is all input


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -5, "completion_tokens": "12"},
        {"prompt_tokens": True, "completion_tokens": 1.5},
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 99}},
        {"prompt_tokens": 10, "prompt_tokens_details": ["x"], "completion_tokens_details": None},
    ],
)
def test_garbage_counts_never_raise_nor_count_a_token_twice(usage: dict[str, Any]) -> None:
    tokens = normalise(usage)
    assert tokens is not None
    assert min(tokens.input, tokens.cached_input, tokens.cache_write, tokens.output) >= 0
    assert tokens.prompt <= 10 and tokens.output == 0


def test_an_absurd_count_is_bounded() -> None:
    tokens = normalise({"prompt_tokens": 10**30, "completion_tokens": 10**30})
    assert tokens == Tokens(input=MAX_TOKENS, output=MAX_TOKENS)


@pytest.mark.parametrize(
    ("third", "expected"),
    [
        ({"prompt_tokens_details": {"cached_tokens": 8}}, Tokens(input=2, cached_input=8, output=5)),
        ({"cache_creation_input_tokens": 8}, Tokens(input=2, cache_write=8, output=5)),
        ({"completion_tokens_details": {"reasoning_tokens": 3}}, Tokens(input=10, output=5, reasoning=3)),
        ({"prompt_cache_hit_tokens": 6}, Tokens(input=4, cached_input=6, output=5)),
        ({"total_tokens": 15}, Tokens(input=10, output=5)),
        ({}, Tokens(input=10, output=5)),
    ],
)
def test_a_short_usage_is_read_whole_whatever_its_third_key(third: dict[str, Any], expected: Tokens) -> None:
    """The quick path for `{prompt_tokens, completion_tokens, total_tokens}` takes only that shape:
    a server that leaves out `total_tokens` and reports cached, cache-write or reasoning tokens
    instead has each priced in its own class (at input price they would cost more, or less)."""
    assert normalise({"prompt_tokens": 10, "completion_tokens": 5, **third}) == expected


def test_a_reranks_billed_search_units_are_its_queries_and_no_tokens() -> None:
    """Cohere bills a rerank in search units, a query of up to 100 documents each: an answer that
    says them has usage (it is not an estimate), its queries priced per query, none a token."""
    assert normalise({"search_units": 3}) == Tokens() and queries({"search_units": 3}) == 3
    assert normalise({"search_units": 1, "total_tokens": 40}) == Tokens(input=40)
    for said in (
        None,
        {},
        {"search_units": 0},
        {"search_units": -2},
        {"search_units": True},
        {"search_units": "3"},
    ):
        assert queries(said) == 1
    assert queries({"search_units": 10**30}) == MAX_TOKENS


@pytest.mark.parametrize(("documents", "expected"), [(None, 1), (0, 1), (1, 1), (100, 1), (101, 2), (250, 3)])
def test_a_rerank_request_is_bounded_at_a_query_for_each_hundred_documents(
    documents: int | None, expected: int
) -> None:
    data: dict[str, Any] = {"query": "q"}
    if documents is not None:
        data["documents"] = ["d"] * documents
    assert queries_asked(data) == expected

"""The usage ledger's fixtures: records, and each kind of database (PostgreSQL's server is in
`tests/conftest.py`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from service.usage.record import Record
from service.usage.stores import SQLStore, open_store

_ids = itertools.count(1)
NOW = datetime(2026, 11, 27, 5, 33, 8, 123456, tzinfo=UTC)


def record(**fields: Any) -> Record:
    """A served chat request's record; `fields` change any part of it."""
    values: dict[str, Any] = {
        "id": f"req-{next(_ids)}",
        "ts": NOW,
        "client": "ops-center",
        "purpose": "chat",
        "model": "gpt-4o",
        "provider": "openai",
        "upstream_model": "gpt-4o-2024-08-06",
        "status": 200,
        "stream": False,
        "attempts": 1,
        "latency_ms": 812.5,
        "ttfb_ms": None,
        "prompt_tokens": 100,
        "cached_tokens": 20,
        "cache_write_tokens": 0,
        "completion_tokens": 50,
        "reasoning_tokens": 10,
        "cost_usd": Decimal("0.000825"),
        "priced": True,
        "estimated": False,
        "replica": "test",
    }
    return Record(**(values | fields))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each kind of ledger database: a SQLite file in tmp_path, a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "usage.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[SQLStore]:
    made = open_store(store_url, tmp_path)
    assert made is not None
    made.open()
    try:
        yield made
    finally:
        made.close()

"""An OTLP receiver, and the environment that points the service's exporters at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.otlp import OTLPReceiver


@pytest.fixture
async def otlp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OTLPReceiver]:
    """A receiver, with `OTEL_*` set (for this test) so that a service started now exports to it."""
    async with OTLPReceiver() as receiver:
        for name, value in receiver.env().items():
            monkeypatch.setenv(name, value)
        yield receiver

"""Provider health: what is known of each provider, read by the API and the gateway.

Placeholder interface; the gateway work fills in passive circuit breakers and active checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Status = Literal["healthy", "unhealthy", "unknown"]


@dataclass(frozen=True, slots=True)
class HealthState:
    """The last known health of one provider."""

    status: Status = "unknown"
    checked_at: datetime | None = None
    latency_ms: float | None = None

    def as_json(self) -> dict[str, object]:
        checked = self.checked_at.isoformat().replace("+00:00", "Z") if self.checked_at else None
        return {"status": self.status, "checked_at": checked, "latency_ms": self.latency_ms}


class Health:
    """Health of every provider, by id."""

    def __init__(self) -> None:
        self._states: dict[str, HealthState] = {}

    def get(self, provider_id: str) -> HealthState:
        return self._states.get(provider_id, HealthState())

"""Provider health: passive circuit breakers, active checks, and what the API shows.

Two sources feed one `Health` per app:

- **passive**: the gateway reports each upstream attempt. `circuit_failures` consecutive
  failures open a provider's circuit for `circuit_cooldown_s`; after the cooldown one trial
  request is let through (half-open): success closes the circuit, failure opens it again.
- **active**: every `health_interval_s` the gateway asks each enabled provider for its
  models (`check`). A success closes the circuit; a failure that the request path would
  also fall back on (no connection, a timeout, 408, 429, 5xx) opens it. A check answered
  with another 4xx (a wrong key, no models endpoint) shows the provider unhealthy without
  touching the circuit, since requests may still work.

Status changes are reported to `on_change` (the gateway turns them into
`provider.health_changed` events and a gauge). The hot path costs a dictionary read and an
integer store per request: `HealthState` objects are only built on a change or a check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import aiohttp

from service.config.models import Provider
from service.gateway.catalog import list_models

Status = Literal["healthy", "unhealthy", "unknown"]
Listener = Callable[[str, Status, Status, str | None], None]
Clock = Callable[[], float]
"""Monotonic seconds; tests pass their own to move time instead of sleeping."""
"""Called as `(provider_id, old, new, reason)` on every status change."""


@dataclass(frozen=True, slots=True)
class HealthState:
    """The last known health of one provider."""

    status: Status = "unknown"
    checked_at: datetime | None = None
    latency_ms: float | None = None

    def as_json(self) -> dict[str, object]:
        checked = self.checked_at.isoformat().replace("+00:00", "Z") if self.checked_at else None
        return {"status": self.status, "checked_at": checked, "latency_ms": self.latency_ms}


_UNKNOWN = HealthState()


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one active check: `opens` when the failure is one requests fall back on."""

    ok: bool
    latency_ms: float
    message: str
    opens: bool = False

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "latency_ms": self.latency_ms, "message": self.message}


class _Circuit:
    __slots__ = ("failures", "open_until", "trial")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0  # monotonic; 0 = closed
        self.trial = False  # the one half-open request is in flight


class Health:
    """Health and circuit of every provider, by id."""

    def __init__(self, *, failures: int = 3, cooldown_s: float = 30.0, clock: Clock = time.monotonic) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.on_change: Listener | None = None
        self._states: dict[str, HealthState] = {}
        self._circuits: dict[str, _Circuit] = {}

    def get(self, provider_id: str) -> HealthState:
        """The last known health; `unknown` before any request or check."""
        return self._states.get(provider_id, _UNKNOWN)

    def is_open(self, provider_id: str) -> bool:
        """Whether requests must skip the provider now (open, or half-open with its trial out)."""
        circuit = self._circuits.get(provider_id)
        if circuit is None or not circuit.open_until:
            return False
        return circuit.trial or self.clock() < circuit.open_until

    def admit(self, provider_id: str) -> bool:
        """Take the right to send one request now: always when closed, once when half-open."""
        circuit = self._circuits.get(provider_id)
        if circuit is None or not circuit.open_until:
            return True
        if circuit.trial or self.clock() < circuit.open_until:
            return False
        circuit.trial = True
        return True

    def abandon(self, provider_id: str) -> None:
        """An admitted request ended without an outcome (the client left): free the trial."""
        circuit = self._circuits.get(provider_id)
        if circuit is not None:
            circuit.trial = False

    def succeeded(self, provider_id: str, latency_s: float) -> None:
        """A request to the provider worked: reset its failures, close its circuit."""
        circuit = self._circuits.get(provider_id)
        if circuit is None:
            circuit = self._circuits[provider_id] = _Circuit()
        circuit.failures = 0
        if circuit.open_until or self._states.get(provider_id, _UNKNOWN).status != "healthy":
            circuit.open_until, circuit.trial = 0.0, False
            self._set(provider_id, "healthy", latency_s * 1000, None)

    def failed(self, provider_id: str, reason: str) -> None:
        """A request failed in a way that falls back; opens the circuit at the threshold."""
        circuit = self._circuits.get(provider_id)
        if circuit is None:
            circuit = self._circuits[provider_id] = _Circuit()
        circuit.failures += 1
        if circuit.trial or (not circuit.open_until and circuit.failures >= self.failures):
            circuit.trial = False
            circuit.open_until = self.clock() + self.cooldown_s
            self._set(provider_id, "unhealthy", None, reason)

    def checked(self, provider_id: str, result: CheckResult) -> None:
        """Record an active check (or `POST …/test`)."""
        circuit = self._circuits.get(provider_id)
        if circuit is None:
            circuit = self._circuits[provider_id] = _Circuit()
        if result.ok:
            circuit.failures, circuit.open_until, circuit.trial = 0, 0.0, False
        elif result.opens:
            circuit.open_until, circuit.trial = self.clock() + self.cooldown_s, False
        status: Status = "healthy" if result.ok else "unhealthy"
        self._set(provider_id, status, result.latency_ms, None if result.ok else result.message)

    def _set(self, provider_id: str, status: Status, latency_ms: float | None, reason: str | None) -> None:
        old = self._states.get(provider_id, _UNKNOWN).status
        latency = round(latency_ms, 2) if latency_ms is not None else None
        self._states[provider_id] = HealthState(status, datetime.now(UTC), latency)
        if old != status and self.on_change is not None:
            self.on_change(provider_id, old, status, reason)


async def check(provider: Provider, session: aiohttp.ClientSession) -> CheckResult:
    """Ask the provider for its models now, with its key; never raises for an upstream failure."""
    started = time.perf_counter()
    outcome = await list_models(provider, session)
    latency = round((time.perf_counter() - started) * 1000, 2)
    if outcome.models is not None:
        count = len(outcome.models)
        return CheckResult(True, latency, f"ok: {count} model{'s' if count != 1 else ''} listed")
    return CheckResult(False, latency, outcome.reason, opens=outcome.retryable)

"""Provider health: passive circuit breakers, active checks, and what the API shows.

Two sources feed one `Health` per app:

- **passive**: the gateway reports each upstream attempt. `circuit_failures` consecutive
  failures open a provider's circuit for `circuit_cooldown_s`; after the cooldown one trial
  request is let through (half-open): success closes the circuit, failure opens it again.
- **active**: every `health_interval_s` the gateway asks each enabled provider for its
  models (`check`). A success closes the circuit; a failure that the request path would
  also fall back on (no connection, a timeout, 408, 429, 5xx) opens it. Another 4xx (no
  models endpoint) shows the provider unhealthy without touching the circuit.

A 401 or 403, from a request or a check, means the provider's own key was refused (docs/reference.md §7):
the circuit opens at once and the provider is marked unhealthy with the reason, without
waiting for confirmation. Only a request through it that succeeds (the circuit's trial)
clears the mark: a check that lists models may succeed with a revoked key, since many
models lists are public.

What `get` shows follows every result at once. A status *change* is reported to
`on_change` (the gateway turns it into a `provider.health_changed` event and a gauge) only
once the new status has held for `confirm` consecutive results (docs/reference.md §5), so a flapping
provider cannot flood the log; a refused key is reported at once. The last models a
successful check listed are kept (`models`) for `/v1/models`.

The hot path costs a dictionary read and a few attribute reads per request: `HealthState`
objects are only built on a change or a check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import aiohttp

from service.config.models import Provider
from service.gateway.call import refused
from service.gateway.catalog import list_models

Status = Literal["healthy", "unhealthy", "unknown"]
Listener = Callable[[str, Status, Status, str | None], None]
"""Called as `(provider_id, old, new, reason)` on every confirmed status change."""
Clock = Callable[[], float]
"""Monotonic seconds; tests pass their own to move time instead of sleeping."""


@dataclass(frozen=True, slots=True)
class HealthState:
    """The last known health of one provider."""

    status: Status = "unknown"
    checked_at: datetime | None = None
    latency_ms: float | None = None
    reason: str | None = None
    """Why it is unhealthy, where that is known (`budget`: out of budget)."""

    def as_json(self) -> dict[str, object]:
        checked = self.checked_at.isoformat().replace("+00:00", "Z") if self.checked_at else None
        shown: dict[str, object] = {
            "status": self.status,
            "checked_at": checked,
            "latency_ms": self.latency_ms,
        }
        if self.reason is not None:
            shown["reason"] = self.reason
        return shown


_UNKNOWN = HealthState()


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one active check.

    `opens` when the failure is one requests fall back on; `refused` when the upstream
    refused the provider's key (401, 403); `models` what a successful check listed.
    """

    ok: bool
    latency_ms: float
    message: str
    opens: bool = False
    refused: bool = False
    models: tuple[str, ...] | None = None

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "latency_ms": self.latency_ms, "message": self.message}


class _Track:
    """Everything known of one provider: its circuit, and its status and how long it held."""

    __slots__ = ("failures", "open_until", "refused", "reported", "status", "streak", "trial")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0  # monotonic; 0 = closed
        self.trial = False  # the one half-open request is in flight
        self.refused: str | None = None  # why the upstream refused the key; cleared by a request only
        self.status: Status = "unknown"  # as shown now
        self.streak = 0  # consecutive results that agree with `status`
        self.reported: Status = "unknown"  # the last status told to `on_change`


class Health:
    """Health and circuit of every provider, by id."""

    def __init__(
        self,
        *,
        failures: int = 3,
        cooldown_s: float = 30.0,
        confirm: int = 2,
        clock: Clock = time.monotonic,
    ) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.confirm = confirm
        """Consecutive results a new status must hold before `on_change` hears of it."""
        self.clock = clock
        self.on_change: Listener | None = None
        self.models_version = 0
        """Increases whenever `models` of some provider changes."""
        self._states: dict[str, HealthState] = {}
        self._tracks: dict[str, _Track] = {}
        self._models: dict[str, tuple[str, ...]] = {}
        self._held: dict[str, tuple[HealthState, float | None]] = {}
        """Provider id -> the health shown instead of its own, and until when (wall clock)."""

    def reset(self, provider_id: str) -> None:
        """Forget what is known of the provider (docs/reference.md §7: its file changed, a rotated
        key or a new URL): its circuit closes and its status is `unknown` again until a request or
        a check tells."""
        self._states.pop(provider_id, None)
        self._tracks.pop(provider_id, None)
        self._held.pop(provider_id, None)
        if self._models.pop(provider_id, None) is not None:
            self.models_version += 1

    def get(self, provider_id: str) -> HealthState:
        """The last known health; `unknown` before any request or check."""
        if self._held:
            held = self._held.get(provider_id)
            if held is not None:
                if held[1] is None or time.time() < held[1]:
                    return held[0]
                del self._held[provider_id]
        return self._states.get(provider_id, _UNKNOWN)

    def hold(self, provider_id: str, reason: str, until: float | None) -> None:
        """Show the provider `unhealthy` for `reason` until `until` (wall-clock seconds; None:
        until `release`), whatever checks find: it is out of budget (docs/reference.md §13), not down."""
        held = self._held.get(provider_id)
        if held is None or held[0].reason != reason or held[1] != until:
            self._held[provider_id] = (HealthState("unhealthy", datetime.now(UTC), None, reason), until)

    def release(self, provider_id: str) -> None:
        """Stop showing a `hold`: the provider's own health shows again."""
        if self._held:
            self._held.pop(provider_id, None)

    def models(self, provider_id: str) -> tuple[str, ...]:
        """The models the provider's last successful check listed (empty before one)."""
        return self._models.get(provider_id, ())

    def is_open(self, provider_id: str) -> bool:
        """Whether requests must skip the provider now (open, or half-open with its trial out)."""
        track = self._tracks.get(provider_id)
        if track is None or not track.open_until:
            return False
        return track.trial or self.clock() < track.open_until

    def admit(self, provider_id: str) -> bool:
        """Take the right to send one request now: always when closed, once when half-open."""
        track = self._tracks.get(provider_id)
        if track is None or not track.open_until:
            return True
        if track.trial or self.clock() < track.open_until:
            return False
        track.trial = True
        return True

    def abandon(self, provider_id: str) -> None:
        """An admitted request ended without an outcome (the client left): free the trial."""
        track = self._tracks.get(provider_id)
        if track is not None:
            track.trial = False

    def succeeded(self, provider_id: str, latency_s: float) -> None:
        """A request to the provider worked: reset its failures, close its circuit, clear a refusal."""
        track = self._tracks.get(provider_id)
        if track is None:
            track = self._tracks[provider_id] = _Track()
        track.failures = 0
        if track.open_until or track.status != "healthy" or track.streak < self.confirm:
            track.open_until, track.trial, track.refused = 0.0, False, None
            self._result(provider_id, track, "healthy", latency_s * 1000, None)

    def failed(self, provider_id: str, reason: str) -> None:
        """A request failed in a way that falls back; opens the circuit at the threshold."""
        track = self._tracks.get(provider_id)
        if track is None:
            track = self._tracks[provider_id] = _Track()
        track.failures += 1
        if track.trial or (not track.open_until and track.failures >= self.failures):
            track.trial = False
            track.open_until = self.clock() + self.cooldown_s
            self._result(provider_id, track, "unhealthy", None, reason)

    def refuse(self, provider_id: str, reason: str) -> None:
        """The upstream refused the provider's key (401, 403): open its circuit and mark it, now."""
        track = self._tracks.get(provider_id)
        if track is None:
            track = self._tracks[provider_id] = _Track()
        track.failures += 1
        track.trial = False
        track.open_until = self.clock() + self.cooldown_s
        track.refused = reason
        self._result(provider_id, track, "unhealthy", None, reason, confirmed=True)

    def checked(self, provider_id: str, result: CheckResult) -> None:
        """Record an active check (or `POST …/test`)."""
        if result.refused:
            self.refuse(provider_id, result.message)
            return
        track = self._tracks.get(provider_id)
        if track is None:
            track = self._tracks[provider_id] = _Track()
        if result.ok and result.models is not None and self._models.get(provider_id) != result.models:
            self._models[provider_id] = result.models
            self.models_version += 1
        if track.refused is not None:
            return  # a models list may be public: only a request through the provider clears this
        if result.ok:
            track.failures, track.open_until, track.trial = 0, 0.0, False
        elif result.opens:
            track.open_until, track.trial = self.clock() + self.cooldown_s, False
        status: Status = "healthy" if result.ok else "unhealthy"
        self._result(provider_id, track, status, result.latency_ms, None if result.ok else result.message)

    def _result(
        self,
        provider_id: str,
        track: _Track,
        status: Status,
        latency_ms: float | None,
        reason: str | None,
        *,
        confirmed: bool = False,
    ) -> None:
        if status == track.status:
            track.streak = min(track.streak + 1, self.confirm)
        else:
            track.status, track.streak = status, 1
        latency = round(latency_ms, 2) if latency_ms is not None else None
        self._states[provider_id] = HealthState(status, datetime.now(UTC), latency)
        if track.reported != status and (confirmed or track.streak >= self.confirm):
            old, track.reported = track.reported, status
            if self.on_change is not None:
                self.on_change(provider_id, old, status, reason)


async def check(provider: Provider, session: aiohttp.ClientSession) -> CheckResult:
    """Ask the provider for its models now, with its key; never raises for an upstream failure."""
    started = time.perf_counter()
    outcome = await list_models(provider, session)
    latency = round((time.perf_counter() - started) * 1000, 2)
    if outcome.models is not None:
        count = len(outcome.models)
        message = f"ok: {count} model{'s' if count != 1 else ''} listed"
        return CheckResult(True, latency, message, models=tuple(outcome.models))
    denied = outcome.status is not None and refused(outcome.status)
    return CheckResult(False, latency, outcome.reason, opens=outcome.retryable, refused=denied)

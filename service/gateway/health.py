"""Provider health: passive circuit breakers, active checks, and what the API shows.

Two different things are known of a provider (docs/reference.md §7):

- its **circuit**, this replica's own, fed by the gateway's requests. `circuit_failures`
  consecutive failures open it for `circuit_cooldown_s`; after the cooldown one trial request
  is let through (half-open): success closes it, failure opens it again. An open circuit is
  routed around and shown as `circuit`, but it is not health: another replica's requests
  may go through, and what one replica's traffic found must not wake every consumer.
- its **health** `status` and `reason`, from active checks (every `health_interval_s` the
  gateway asks each enabled provider for its models, `check`) and from refused keys. What is
  shown is the *confirmed* status: a new status is adopted once it held for `confirm`
  consecutive results (docs/reference.md §5), so a flapping provider floods nothing; the first
  result after `unknown` (a start, a new or updated provider) is adopted at once. Confirmed
  health is what replicas share (with Redis, `adopt`) and what answers' tags cover.

A 401 or 403, from a request or a check, means the provider's own key was refused: its
circuit opens and it is `unhealthy` at once, as a confirmed result. Only a request through it
that succeeds (the circuit's trial) clears that: a check that lists models may succeed with a
revoked key, since many models lists are public; nor does another replica's check, a refusal
being shared as one (`KeyState`). A check that fails the way requests fall back
on (no connection, a timeout, 408, 429, 5xx) opens the circuit too; one that succeeds closes it.

Listeners: `on_change` hears each change of a confirmed status (the gateway writes a
`provider.health_changed` event); `on_shown` each change of what tags cover (status or reason,
a budget's hold included); `on_confirmed` each change this replica found itself (published to
the other replicas). The last models a successful check listed are kept (`models`).

The hot path costs a dictionary read and a few attribute reads per request: `HealthState`
objects are only built on a change or a check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

import aiohttp

from service.config.models import Provider
from service.gateway.call import refused
from service.gateway.catalog import list_models

Status = Literal["healthy", "unhealthy", "unknown"]
KeyState = Literal["refused", "works"]
"""What a status says of the provider's key, shared with it (docs/reference.md §12): `refused` (a
401 or 403), or `works` (a request through it succeeded after a refusal); None: a check said."""
Circuit = Literal["closed", "open", "half_open"]
Listener = Callable[[str, Status, Status, str | None], None]
"""Called as `(provider_id, old, new, reason)` on every confirmed status change."""
Clock = Callable[[], float]
"""Monotonic seconds; tests pass their own to move time instead of sleeping."""
MAX_REASON = 300
"""A reason longer than this is cut: it is shown, logged and shared between replicas."""


@dataclass(frozen=True, slots=True)
class HealthState:
    """What is known of one provider: its confirmed health, the last measurement, its circuit."""

    status: Status = "unknown"
    checked_at: datetime | None = None
    latency_ms: float | None = None
    reason: str | None = None
    """Why it is unhealthy, where that is known (`budget`: out of budget)."""
    circuit: Circuit = "closed"
    """This replica's own circuit (docs/reference.md §7): not health, and not in tags."""

    @property
    def confirmed(self) -> tuple[Status, str | None]:
        """What tags cover: the status and its reason (no measurement, no circuit)."""
        return self.status, self.reason

    def as_json(self) -> dict[str, object]:
        checked = self.checked_at.isoformat().replace("+00:00", "Z") if self.checked_at else None
        return {
            "status": self.status,
            "reason": self.reason,
            "checked_at": checked,
            "latency_ms": self.latency_ms,
            "circuit": self.circuit,
        }


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
    """Everything known of one provider: its circuit, and the results that may change its status."""

    __slots__ = ("candidate", "confirmed_at", "failures", "key", "open_until", "refused", "streak", "trial")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0  # monotonic; 0 = closed
        self.trial = False  # the one half-open request is in flight
        self.refused: str | None = None  # why the upstream refused the key; cleared by a request only
        self.candidate: Status = "unknown"  # the status of the last results
        self.streak = 0  # consecutive results that agree with `candidate`
        self.confirmed_at = 0.0  # wall clock: when the status shown was confirmed (newest wins)
        self.key: KeyState | None = None  # what the status shown says of the key (`KeyState`)


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
        """Consecutive results a new status must hold before it is shown."""
        self.clock = clock
        self.on_change: Listener | None = None
        self.on_shown: list[Callable[[str], None]] = []
        """Told the provider id whenever its status or reason as shown changes (what tags cover)."""
        self.on_confirmed: list[Callable[[str, HealthState, float], None]] = []
        """Told `(provider_id, state, when)` of each change this replica confirmed itself (not one
        adopted from another replica, not a budget's hold): what it shares."""
        self.models_version = 0
        """Increases whenever `models` of some provider changes."""
        self._states: dict[str, HealthState] = {}
        self._tracks: dict[str, _Track] = {}
        self._models: dict[str, tuple[str, ...]] = {}
        self._held: dict[str, tuple[HealthState, float | None]] = {}
        """Provider id -> the health shown instead of its own, and until when (wall clock)."""

    def reset(self, provider_id: str) -> None:
        """Forget what is known of the provider (docs/reference.md §7: its file changed, a rotated
        key or a new URL): its circuit closes and its status is `unknown` again until a check
        (or another replica) tells."""
        before = self._states.pop(provider_id, _UNKNOWN)
        self._tracks.pop(provider_id, None)
        self._held.pop(provider_id, None)
        if self._models.pop(provider_id, None) is not None:
            self.models_version += 1
        if before.confirmed != _UNKNOWN.confirmed:
            self._tell_shown(provider_id)

    def get(self, provider_id: str) -> HealthState:
        """What is known now; `unknown` before any check."""
        state = self._states.get(provider_id, _UNKNOWN)
        if state.circuit == "open":
            track = self._tracks.get(provider_id)
            if track is not None and not track.trial and self.clock() >= track.open_until:
                state = self._states[provider_id] = replace(state, circuit="half_open")
        if self._held:
            held = self._held.get(provider_id)
            if held is not None:
                if held[1] is None or time.time() < held[1]:
                    return replace(held[0], circuit=state.circuit)
                del self._held[provider_id]
                self._tell_shown(provider_id)
        return state

    def hold(self, provider_id: str, reason: str, until: float | None) -> None:
        """Show the provider `unhealthy` for `reason` until `until` (wall-clock seconds; None:
        until `release`), whatever checks find: it is out of budget (docs/reference.md §13), not down."""
        held = self._held.get(provider_id)
        if held is None or held[0].reason != reason or held[1] != until:
            self._held[provider_id] = (HealthState("unhealthy", datetime.now(UTC), None, reason), until)
            if held is None or held[0].reason != reason:
                self._tell_shown(provider_id)

    def release(self, provider_id: str) -> None:
        """Stop showing a `hold`: the provider's own health shows again."""
        if self._held and self._held.pop(provider_id, None) is not None:
            self._tell_shown(provider_id)

    def models(self, provider_id: str) -> tuple[str, ...]:
        """The models the provider's last successful check listed (empty before one)."""
        return self._models.get(provider_id, ())

    # -- the circuit: this replica's requests ------------------------------------------------------

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
        self._circuit(provider_id, "half_open")
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
            return  # nothing to clear: a request is no health check (the hot path stops here)
        track.failures = 0
        if track.open_until or track.trial:
            track.open_until, track.trial = 0.0, False
            self._circuit(provider_id, "closed")
        if track.refused is not None:  # the key works again: as sure as its refusal was
            track.refused = None
            track.candidate, track.streak = "healthy", self.confirm
            self._confirm(provider_id, track, "healthy", None, local=True, key="works")

    def failed(self, provider_id: str, reason: str) -> None:
        """A request failed in a way that falls back; opens the circuit at the threshold. The
        status does not change for it: the circuit is this replica's own."""
        track = self._track(provider_id)
        track.failures += 1
        if track.trial or (not track.open_until and track.failures >= self.failures):
            track.trial = False
            track.open_until = self.clock() + self.cooldown_s
            self._circuit(provider_id, "open")

    def refuse(self, provider_id: str, reason: str) -> None:
        """The upstream refused the provider's key (401, 403): open its circuit, and mark it
        `unhealthy` now, as a confirmed result."""
        track = self._track(provider_id)
        track.failures += 1
        track.trial = False
        track.open_until = self.clock() + self.cooldown_s
        track.refused = reason = _cut(reason)
        track.candidate, track.streak, track.key = "unhealthy", self.confirm, "refused"
        self._circuit(provider_id, "open")
        self._confirm(provider_id, track, "unhealthy", reason, local=True, key="refused")

    # -- health: checks, and what other replicas confirmed -----------------------------------------

    def checked(self, provider_id: str, result: CheckResult) -> None:
        """Record an active check (or `POST …/test`): when it ran and how long it took, whatever
        it found, a refused key too (the status stays what that says)."""
        state = self._states.get(provider_id, _UNKNOWN)
        latency = round(result.latency_ms, 2)
        self._states[provider_id] = replace(state, checked_at=datetime.now(UTC), latency_ms=latency)
        if result.refused:
            self.refuse(provider_id, result.message)
            return
        track = self._track(provider_id)
        if result.ok and result.models is not None and self._models.get(provider_id) != result.models:
            self._models[provider_id] = result.models
            self.models_version += 1
        if track.refused is not None:
            return  # a models list may be public: only a request through the provider clears this
        if result.ok and (track.open_until or track.trial):
            track.failures, track.open_until, track.trial = 0, 0.0, False
            self._circuit(provider_id, "closed")
        elif result.opens:
            track.open_until, track.trial = self.clock() + self.cooldown_s, False
            self._circuit(provider_id, "open")
        status: Status = "healthy" if result.ok else "unhealthy"
        state = self._states[provider_id]
        if status == track.candidate:
            track.streak = min(track.streak + 1, self.confirm)
        else:
            track.candidate, track.streak = status, 1
        if status != state.status and (state.status == "unknown" or track.streak >= self.confirm):
            self._confirm(provider_id, track, status, None if result.ok else _cut(result.message), local=True)

    def adopt(
        self, provider_id: str, status: Status, reason: str | None, at: float, key: KeyState | None = None
    ) -> bool:
        """Another replica confirmed `status` at `at` (wall clock): shown here when it is newer
        than what this replica confirmed (docs/reference.md §12). Circuits are not touched.

        A refused key (`key`) is taken as this replica's own refusal: its checks do not clear it,
        nor does another replica's `healthy` that a check found (a models list may be public);
        a request through the provider that succeeded, here or there (`works`), does."""
        track = self._track(provider_id)
        if at <= track.confirmed_at or (status == "healthy" and key != "works" and track.refused is not None):
            return False
        state = self._states.get(provider_id, _UNKNOWN)
        track.candidate, track.streak = status, self.confirm
        if key is not None:  # a `healthy` or `unhealthy` a check found leaves a refusal here as it is
            track.refused = (reason or "refused") if key == "refused" else None
        if (status, reason) == state.confirmed:
            track.confirmed_at, track.key = at, key
            return False
        self._confirm(provider_id, track, status, reason, local=False, at=at, key=key)
        return True

    def confirmed(self, provider_id: str) -> tuple[HealthState, float, KeyState | None] | None:
        """The status this replica shows for the provider (a budget's hold aside), when it was
        confirmed, here or by the replica it was adopted from, and what it says of the key
        (`KeyState`); None while it is `unknown`."""
        state, track = self._states.get(provider_id), self._tracks.get(provider_id)
        if state is None or track is None or state.status == "unknown":
            return None
        return state, track.confirmed_at, track.key

    def _track(self, provider_id: str) -> _Track:
        track = self._tracks.get(provider_id)
        if track is None:
            track = self._tracks[provider_id] = _Track()
        return track

    def _circuit(self, provider_id: str, circuit: Circuit) -> None:
        state = self._states.get(provider_id, _UNKNOWN)
        if state.circuit != circuit:
            self._states[provider_id] = replace(state, circuit=circuit)

    def _confirm(
        self,
        provider_id: str,
        track: _Track,
        status: Status,
        reason: str | None,
        *,
        local: bool,
        at: float | None = None,
        key: KeyState | None = None,
    ) -> None:
        state = self._states.get(provider_id, _UNKNOWN)
        if (status, reason) == state.confirmed:
            return
        track.confirmed_at = time.time() if at is None else at
        track.key = key
        now = self._states[provider_id] = replace(state, status=status, reason=reason)
        if local:
            for told in self.on_confirmed:
                told(provider_id, now, track.confirmed_at)
        if status != state.status and self.on_change is not None:
            self.on_change(provider_id, state.status, status, reason)
        self._tell_shown(provider_id)

    def _tell_shown(self, provider_id: str) -> None:
        for told in self.on_shown:
            told(provider_id)


def _cut(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"


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

"""The registry's state: what readers see at one moment (`State`), why a file is refused (`Refusal`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from service.config.snapshot import Snapshot

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one file was refused, and the `kind` it declares when that can be told.

    The kind matters even for a file that fails: a refused `kind: clients` file keeps
    authentication on, and a refused provider file stays known to routing (docs/reference.md §2.3, §4).
    """

    reason: str
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class State:
    """Everything readers see of the registry at one moment, published whole."""

    snapshot: Snapshot = field(default_factory=Snapshot)
    refused: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    """Files refused now, with the reason: their last good version (if any) is served."""
    ready: bool = False
    """The first load is complete."""
    waiting: str | None = None
    """Before the first load: why it cannot be done yet (the folder cannot be listed), for `/readyz`."""
    last_applied_commit: str | None = None
    last_attempted_commit: str | None = None
    auth_required: bool = False
    """A clients file has been seen (good or refused) since the start: authentication stays
    on from then on, answering 503 while no good clients are loaded (docs/reference.md §2.3, §6)."""

    @property
    def degraded(self) -> bool:
        """Some file is refused (`/readyz`)."""
        return bool(self.refused)

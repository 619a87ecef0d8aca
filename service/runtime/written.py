"""What a write over HTTP did (`Written`): its commit, the file's blob, the generation that applied it."""

from __future__ import annotations

from dataclasses import dataclass

from service.config.snapshot import Snapshot
from service.runtime.drafts import Verb


@dataclass(frozen=True, slots=True)
class Written:
    """What a write did: its commit, and the generation that applied it (None in branch mode)."""

    verb: Verb
    kind: str
    subject: str
    file: str
    commit: str
    blob: str | None
    """The git blob id of the file written (None when it was deleted): the answer's ETag."""
    generation: int | None = None
    snapshot: Snapshot | None = None
    branch: str | None = None
    changed: bool = True
    """False when the write asked for what the file already says: no commit was made."""
    pending: bool = False
    """Pushed, but not applied here yet (git-sync had not brought it within `apply_wait_s`)."""

"""A replica heard on the fan-out (`Peer`): its last heartbeat, and when and from which process it came."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.runtime.messages import Beat, answer


@dataclass(frozen=True, slots=True)
class Peer:
    """A replica heard from: its last heartbeat, and when it came (this replica's clock)."""

    beat: Beat
    seen_at: datetime
    heard: float
    """`time.monotonic()` when it came."""
    instance: str = ""
    """The process that sent it (a restarted replica is another one)."""

    def answer(self) -> dict[str, Any]:
        """As `GET …/replicas` lists it."""
        return answer(self.beat, self.seen_at)

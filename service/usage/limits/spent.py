"""Where a budget's spent comes from when a replica starts, so that no restart resets a budget.

In order (docs/reference.md §13): Redis, when it is configured and reachable (it holds the counters; what
the ledger knows is taken too where it is more); else the ledger, through `SpentSource` (the
usage ledger implements it: its records since the period's start, spooled ones included); and
when the ledger cannot answer, the snapshot of spent this replica keeps on local disk
(`SpentFile`, written every few seconds off the request path and at a stop), plus what the
ledger's spool holds since (`SpoolSource`, where the ledger offers it) — never zero.

A snapshot holds each budget's spent *and* reserved amounts: a reservation outstanding when
the process died is charged in full when the snapshot is read back, as a lease that expired
would be.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from service.files import read_limited, write_atomically

log = logging.getLogger(__name__)

Kind = Literal["client", "provider"]
MAX_SNAPSHOT_BYTES = 16 << 20


class SpentSource(Protocol):
    """What the ledger answers: the sum of `cost_usd` of `subject`'s records since `since`.
    One whose `shared` is False (a ledger in SQLite) holds only this replica's records; without
    that attribute, every replica's."""

    async def spent(
        self,
        kind: Literal["client", "provider"],
        subject: str,
        since: datetime,
        until: datetime | None = None,
    ) -> Decimal:
        """`kind` "client": records whose `client` is `subject`; "provider": whose `provider`
        is; only those before `until` when it is given. Spooled records included. Raises
        (anything) when it cannot answer now."""
        ...


@runtime_checkable
class SpoolSource(Protocol):
    """Optional: the cost of `subject`'s records since `since` still in the ledger's local spool,
    readable while its database is down."""

    async def spooled(
        self, kind: Literal["client", "provider"], subject: str, since: datetime
    ) -> Decimal: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a snapshot file holds: when it was written, the replicas last seen, and per budget
    key (`client:NAME:PERIOD`) its spent and reserved nano-dollars."""

    at: datetime
    replicas: int
    budgets: dict[str, tuple[int, int]]


class SpentFile:
    """The local snapshot of spent (`usage-spent.json`, beside the ledger's spool)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Snapshot | None:
        """The last snapshot written, or None (none yet, or unreadable: logged)."""
        try:
            data, oversize = read_limited(self.path, MAX_SNAPSHOT_BYTES)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("the snapshot of spent %s cannot be read: %s", self.path, exc)
            return None
        try:
            if oversize is not None:
                raise ValueError("too large")
            doc = json.loads(data)
            at = datetime.fromisoformat(doc["at"])
            replicas = int(doc["replicas"])
            budgets = {
                str(key): (int(value["spent"]), int(value["reserved"]))
                for key, value in doc["budgets"].items()
            }
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            log.warning("the snapshot of spent %s is not one (%s): it is left out", self.path, exc)
            return None
        if at.tzinfo is None or replicas < 1 or any(s < 0 or r < 0 for s, r in budgets.values()):
            log.warning("the snapshot of spent %s holds impossible values: it is left out", self.path)
            return None
        return Snapshot(at, replicas, budgets)

    def write(self, snapshot: Snapshot) -> None:
        """Replace the snapshot (blocking: call it off the event loop)."""
        doc = {
            "at": snapshot.at.isoformat(),
            "replicas": snapshot.replicas,
            "budgets": {
                k: {"spent": str(s), "reserved": str(r)} for k, (s, r) in sorted(snapshot.budgets.items())
            },
        }
        write_atomically(self.path, json.dumps(doc, indent=1).encode())

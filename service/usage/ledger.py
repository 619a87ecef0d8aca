"""The usage ledger (docs/reference.md §13): one record per answered request, kept whatever happens.

    gateway ──write()──▶ spool (a line, written at once; its row kept in memory)
                                   ──▶ ledger's thread ──▶ database
                                       every ~0.2 s: fsync, store the rows in batches; a
                                       segment stored whole is retired; retention

The ledger's thread shares the GIL with the event loop's: what it does in Python (values
bound, rollups summed) it does in short stretches, letting the GIL go between them (SQLite
stores a batch in a few statements of at most 64 rows, each run without the GIL, and the
values of each are made and summed in C loops, not a Python step a row; a segment read from
its file is decoded `ROW_SLICE` lines at a time, with a pause between), so that the loop does
not wait long for it.

`write` (and `submit`, for a `Record`) never waits on the database and never raises: it writes
the record's line to the spool's active segment (a copy into the page cache, so a kill -9 right
after loses nothing) and keeps its values beside it. The ledger's thread fsyncs the spool in
groups, then stores those values in batches, without reading back what this process wrote;
a segment is retired only once all of it is committed (a crash in between stores it again
from the file, which the key on `id` makes harmless), and kept a few seconds more as
`.stored`: what a start with the database down counts on top of the last snapshot of spent
(`spooled`). Files are read for a previous process's segments, and for a segment whose rows
memory gave up after a failed store. While the
database is down the spool keeps everything and is retried at least every 5 s (`/readyz`
says `"ledger": "degraded"`, and reads answer 503 `ledger_unavailable`); a graceful stop
stores the spool first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar

from service.errors import BadRequest, LedgerUnavailable
from service.journal.events import to_utc
from service.settings import Settings
from service.usage.drain import Drain
from service.usage.encoding import BadLine, decode_values, dumps, record_of, values_of
from service.usage.query import RequestsQuery, UsageQuery, requests_answer, usage_answer
from service.usage.record import Record
from service.usage.spool import Spool
from service.usage.stores import BadBatch, SQLStore, StoreUnavailable, open_store

log = logging.getLogger(__name__)

State = Literal["ok", "degraded", "off"]
T = TypeVar("T")

STOP_WAIT_S = 5.0
"""How long a stop waits for the ledger's thread to store what it holds before it cuts the calls
waiting on the database (`Store.interrupt`): a database that stopped answering would otherwise
hold the stop for a transaction's whole deadline."""
MEMORY_LIMIT = 100_000
"""Lines held in memory while the spool cannot be written (a full disk); then the oldest go."""


class Ledger(Drain):
    """Records into the database through the spool; the reads of `/usage` and `spent`."""

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> Ledger:
        """The ledger `SWITCHBOARD_USAGE_DB`, `_USAGE_SPOOL` and `_USAGE_RETENTION_DAYS` describe."""
        store = open_store(settings.usage_db.get_secret_value(), settings.root)
        return cls(store, settings.usage_spool_dir, retention_days=settings.usage_retention_days, **options)

    @property
    def mode(self) -> Literal["off", "sqlite", "postgresql"]:
        return "off" if self.store is None else self.store.kind

    @property
    def shared(self) -> bool:
        """True when replicas share the database (PostgreSQL): `/usage` then covers all of them."""
        return self.store is not None and self.store.shared

    @property
    def state(self) -> State:
        """`off`, `ok`, or `degraded` while the database cannot be reached or the spool written."""
        if self.store is None:
            return "off"
        return "ok" if self._db_up and self._spool_ok and self._spool_fault is None else "degraded"

    # -- the request path ------------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Keep `record`: written to the spool now, stored in the database soon. Never raises."""
        try:
            values = values_of(record)
        except Exception:  # a record the gateway got wrong must not fail its request
            log.exception("usage ledger: a record could not be encoded; it is dropped")
            return
        self.write(values)

    def write(self, values: list[Any]) -> None:
        """Keep a record given as its line's values (`encoding.fields`, as the gateway makes
        them): written to the spool now, stored from memory soon. Never raises."""
        spool = self._spool
        if spool is None:
            return
        try:
            line = dumps(values)
        except Exception:  # a record the gateway got wrong must not fail its request
            log.exception("usage ledger: a record could not be encoded; it is dropped")
            return
        try:
            spool.append(line, values)
        except OSError as exc:
            self._hold(line, exc)
        if not self._wake.is_set():  # a plain read; setting takes a lock
            self._wake.set()

    def _hold(self, line: bytes, exc: OSError) -> None:
        with self._memory_lock:
            if self._spool_ok:
                log.error("usage spool %s: cannot write (%s); records wait in memory", self.spool_dir, exc)
            self._spool_ok = False
            self._memory.append(line)
            if len(self._memory) > MEMORY_LIMIT:
                del self._memory[0]
                log.error("usage ledger: over %d records held in memory; the oldest is lost", MEMORY_LIMIT)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the spool, store what a previous run left in it, and start the ledger's thread.

        A database that is down does not stop the start: the ledger is degraded and retries.
        """
        if self.store is None:
            return
        self._spool = await asyncio.to_thread(Spool, self.spool_dir)  # SpoolBusy: another process has it
        await asyncio.to_thread(self._cycle, purge=False)  # retention waits for the thread: no slow start
        self._thread = threading.Thread(target=self._run, name="switchboard-ledger", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Store the spool (as far as the database lets), then release it and the database."""
        if self.store is None:
            return
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_WAIT_S)
            if self._thread.is_alive():  # waiting on a database that does not answer: cut it
                log.warning(
                    "ledger: the database did not answer within %g s of the stop; what is not "
                    "stored stays in the spool, stored at the next start",
                    STOP_WAIT_S,
                )
                await asyncio.to_thread(self.store.interrupt)
                await asyncio.to_thread(self._thread.join)
        spool, self._spool = self._spool, None
        if spool is not None:
            await asyncio.to_thread(spool.close)
        await asyncio.to_thread(self.store.close)

    async def flush(self) -> None:
        """Store everything submitted so far now (StoreUnavailable if the database is down)."""
        if self.store is not None:
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        with self._drain_lock:
            self._drain()

    # -- reading ---------------------------------------------------------------------------------

    async def usage(self, query: UsageQuery) -> dict[str, Any]:
        """`GET …/usage`'s answer."""
        store = self._readable()
        groups = await self._read(store.grouped, query)
        return usage_answer(query, groups, self.shared)

    async def requests(self, query: RequestsQuery) -> dict[str, Any]:
        """`GET …/usage/requests`'s answer."""
        store = self._readable()
        records = await self._read(store.requests, query)
        return requests_answer(records, query.limit)

    async def spent(
        self,
        kind: Literal["client", "provider"],
        subject: str,
        since: datetime,
        until: datetime | None = None,
    ) -> Decimal:
        """What `subject` (a client's name, or a provider's id) spent since `since` (and before
        `until`, when given): its stored records and those still in the spool. LedgerUnavailable
        when the database is down or the ledger is off (then see `spooled`)."""
        store = self._readable()
        end = None if until is None else to_utc(until)
        return await self._read(self._spent, store, kind, subject, to_utc(since), end)

    def _spent(
        self,
        store: SQLStore,
        kind: Literal["client", "provider"],
        subject: str,
        since: datetime,
        until: datetime | None,
    ) -> Decimal:
        with self._drain_lock:  # nothing moves from the spool to the database meanwhile
            self._drain()
            stored = store.spent(kind, subject, since, until)
            spool = self._spool
            waiting = spool.active_lines() if spool is not None else []
            with self._memory_lock:
                waiting += self._memory
        return stored + _cost(waiting, kind, subject, since, until)

    async def spooled(self, kind: Literal["client", "provider"], subject: str, since: datetime) -> Decimal:
        """The cost of `subject`'s records since `since` that are in the spool: not yet stored, or
        stored in the last `RETAIN_S` (since a snapshot of spent, perhaps). With a snapshot of
        spent, what a budget needs while the database is down."""
        return await asyncio.to_thread(self._spooled, kind, subject, to_utc(since))

    def _spooled(self, kind: Literal["client", "provider"], subject: str, since: datetime) -> Decimal:
        spool = self._spool
        if spool is None:
            return Decimal(0)
        with self._drain_lock:
            lines = spool.retained()
            for segment in spool.sealed():
                try:
                    lines.extend(spool.lines(segment))
                except OSError as exc:  # unreadable: what the others hold still counts
                    log.error("usage spool: cannot read %s (%s); its costs are not counted", segment, exc)
            lines.extend(spool.active_lines())
            with self._memory_lock:
                lines.extend(self._memory)
        return _cost(lines, kind, subject, since)

    def _readable(self) -> SQLStore:
        self._store_or_off()
        if not self._db_up or not self._opened:
            raise LedgerUnavailable(
                "the usage ledger's database is unavailable; records wait in the spool until it is back"
            )
        return self._store_or_off()

    async def _read(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(call, *args)
        except BadBatch as exc:  # the database refused a value of the query: the caller's to fix
            raise BadRequest(f"the usage ledger refused the query: {exc}") from None
        except StoreUnavailable as exc:
            self._down(exc)
            raise LedgerUnavailable(
                "the usage ledger's database is unavailable; records wait in the spool until it is back"
            ) from None


def _cost(
    lines: Iterable[bytes], kind: str, subject: str, since: datetime, until: datetime | None = None
) -> Decimal:
    total = Decimal(0)
    for line in lines:
        try:
            record = record_of(decode_values(line))
        except BadLine:
            continue
        who = record.client if kind == "client" else record.provider
        if who == subject and record.ts >= since and (until is None or record.ts < until):
            total += record.cost_usd
    return total

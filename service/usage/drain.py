"""The ledger's thread (`Ledger`'s base): the spool drained into the database. Every ~0.2 s it
fsyncs the spool, stores its sealed segments and then what the active one holds, in batches
(one the database refuses for its data halved until the record to blame is set aside),
retires a segment once all of it is committed, and runs retention a slice at a time; while
the database is down it retries with a growing pause (at most `retry_max_s`). The ledger's
module docstring says how it shares the GIL with the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from service.errors import LedgerUnavailable
from service.usage.encoding import BadLine, decode_values, dumps
from service.usage.spool import Spool
from service.usage.stores import BadBatch, SQLStore, StoreUnavailable

# The ledger's logger, as before its thread was a module of its own: what operators filter on.
log = logging.getLogger("service.usage.ledger")

BATCH = 2000
SEGMENT_LIMIT = 64 << 20
"""An active segment this large is sealed even while older ones wait (the database down)."""
ROTATE_AT = 1 << 20
"""An active segment is replaced by a new one once stored whole (nothing came meanwhile), or
once this large: what a crash makes the next start store again (the key on `id` skipping it)
stays small, and a busy spool is not replaced every cycle."""
PURGE_SLICE_S = 0.25
"""The longest one cycle deletes old records: a large purge (a lowered retention over a year
of records) goes on in the next cycles, and what comes meanwhile is stored between them."""
ROW_SLICE = 256
"""Lines decoded at a time from a segment's file (pure Python, the GIL held: ~1.1 ms); between
two slices the ledger's thread sleeps `PAUSE_S`, so that the event loop's thread, should it wait for the GIL,
takes it at once rather than after the whole batch (CPython makes a waiting thread wait up to
`sys.getswitchinterval()`, 5 ms, before it forces a switch)."""
PAUSE_S = 0.0001


class Drain:
    """The spool, the database, and the thread that stores the one into the other."""

    def __init__(
        self,
        store: SQLStore | None,
        spool_dir: Path,
        *,
        retention_days: int = 90,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        linger_s: float = 0.2,
        retry_max_s: float = 5.0,
        retention_every_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.spool_dir = spool_dir
        self.retention = timedelta(days=retention_days)
        self.clock = clock
        self._linger_s = linger_s
        self._retry_max_s = retry_max_s
        self._retention_every_s = retention_every_s
        self._spool: Spool | None = None
        self._memory: list[bytes] = []
        self._memory_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened = False
        self._db_up = store is not None
        self._spool_ok = True
        self._spool_fault: str | None = None
        """Why the last cycle could not use the spool's folder (removed, or replaced by a file
        under the service), until one can: `state` is degraded meanwhile."""
        self._failures = 0
        self._retry_at = 0.0
        self._purge_at = 0.0
        self._unreadable: set[Path] = set()
        """Sealed segments that could not be read (said once each), tried again every cycle."""
        self.stored = 0
        """Records this ledger stored (a record stored again after a crash is not counted)."""

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=1.0)
            if not self._stopping.is_set():
                self._stopping.wait(self._linger_s)  # gather a group; a stop cuts it short
            self._wake.clear()
            stopping = self._stopping.is_set()
            self._cycle(final=stopping)
            if stopping:
                return

    def _cycle(self, *, final: bool = False, purge: bool = True) -> None:
        try:
            with self._drain_lock:
                self._sync_spool()
                now = time.monotonic()
                if now < self._retry_at and not final:
                    return
                try:
                    self._drain()
                    if purge and not final and now >= self._purge_at:
                        self._purge_at = now + self._retention_every_s
                        if not self._purge():
                            self._purge_at = now  # more to delete: the next cycle goes on
                            self._wake.set()
                except StoreUnavailable as exc:
                    self._down(exc)
                except OSError as exc:  # the spool's folder gone or replaced: said once, tried again
                    self._spool_failed(exc)
                else:
                    self._spool_back()
        except Exception:  # the thread must go on: the next cycle tries again
            log.exception("usage ledger: a cycle failed")

    def _spool_failed(self, exc: OSError) -> None:
        fault = exc.strerror or type(exc).__name__  # the same fault each cycle, whatever the segment
        if fault != self._spool_fault:
            log.error(
                "usage spool %s: cannot be used (%s; was it removed or replaced?); records are "
                "stored from memory meanwhile, and the spool is used again once it can be",
                self.spool_dir,
                fault,
            )
        self._spool_fault = fault

    def _spool_back(self) -> None:
        if self._spool_fault is not None:
            log.warning("usage spool %s can be used again", self.spool_dir)
            self._spool_fault = None

    def _sync_spool(self) -> None:
        spool = self._spool
        if spool is None:
            return
        try:
            spool.sync()
            spool.expire()
            if spool.active_size >= SEGMENT_LIMIT:
                spool.seal()
            self._rewrite_memory(spool)
        except OSError as exc:
            log.warning("usage spool %s: %s", self.spool_dir, exc)

    def _rewrite_memory(self, spool: Spool) -> None:
        """Lines held in memory go back to the spool once it can be written again."""
        with self._memory_lock:
            if not self._memory and self._spool_ok:
                return
            held, self._memory = self._memory, []
        try:
            spool.reopen()
            for i, line in enumerate(held):
                try:
                    spool.append(line)
                except OSError:
                    with self._memory_lock:
                        self._memory[:0] = held[i:]
                    raise
        except OSError:
            return
        with self._memory_lock:
            if not self._memory:
                if not self._spool_ok:
                    log.warning("usage spool %s can be written again", self.spool_dir)
                self._spool_ok = True

    def _drain(self) -> None:
        """Store every sealed segment, then what the active one holds; StoreUnavailable when the
        database cannot take them (what is left stays in the spool)."""
        store, spool = self._store_or_off(), self._spool
        if not self._opened:
            store.open()
            self._opened = True
        self._up()
        if spool is None:
            return
        for _ in range(3):  # what waits first, then what came since
            for segment in spool.sealed():
                kept = spool.kept(segment)
                if kept is None:
                    try:
                        self._store(spool, segment)
                    except OSError as exc:  # unreadable (a disk error): kept, tried again, the rest stored
                        if segment not in self._unreadable:
                            self._unreadable.add(segment)
                            log.error(
                                "usage spool: cannot read %s (%s); the rest is stored meanwhile", segment, exc
                            )
                        continue
                    self._unreadable.discard(segment)
                else:
                    self._insert(spool, kept)
                spool.remove(segment)
            taken = spool.take()
            if taken is None:  # its rows are not all in memory: stored from its file
                if not spool.active_size:
                    break
                spool.seal()
                continue
            rows, end = taken
            try:
                self._insert(spool, rows)
            except BaseException:
                spool.spill()  # the rows taken are in its file only now
                raise
            spool.stored(end)
            size = spool.active_size
            if 0 < size == end or size >= ROTATE_AT:
                spool.seal()  # removed at once when stored whole, else its last rows are kept
            if size < ROTATE_AT:
                break
        with self._memory_lock:
            held = list(self._memory) if not self._spool_ok else []
        if held:  # the spool cannot be written but the database can: store them from memory
            good = []
            for line in held:
                try:
                    good.append(decode_values(line))
                except BadLine as exc:
                    spool.set_aside(line, f"held in memory: {exc}")
            self._insert(spool, good)
            with self._memory_lock:
                del self._memory[: len(held)]

    def _store(self, spool: Spool, segment: Path) -> None:
        batch: list[list[Any]] = []
        for line in spool.lines(segment):
            try:
                batch.append(decode_values(line))
            except BadLine as exc:
                spool.set_aside(line, f"{segment.name}: {exc}")
                continue
            if len(batch) % ROW_SLICE == 0:
                time.sleep(PAUSE_S)  # a line is read in ~4 µs, the GIL held: 2,000 would be 8 ms
            if len(batch) >= BATCH:
                self._insert(spool, batch)
                batch = []
        if batch:
            self._insert(spool, batch)

    def _insert(self, spool: Spool, batch: Sequence[list[Any]]) -> None:
        """Store records given as their lines' values, `BATCH` at a time."""
        for start in range(0, len(batch), BATCH):
            self._insert_batch(spool, batch[start : start + BATCH])

    def _insert_batch(self, spool: Spool, batch: Sequence[list[Any]]) -> None:
        """Store a batch; one the database refuses for its data is halved until the record to
        blame is found and set aside, so one bad record never holds the spool back."""
        if not batch:
            return
        try:
            self.stored += self._store_or_off().insert_values(batch)
        except (BadBatch, ValueError, TypeError, ArithmeticError) as exc:
            if len(batch) == 1:
                spool.set_aside(dumps(batch[0]), f"refused by the database: {exc}")
                return
            half = len(batch) // 2
            self._insert_batch(spool, batch[:half])
            self._insert_batch(spool, batch[half:])

    def _purge(self) -> bool:
        """Delete records past the retention for `PURGE_SLICE_S` at most; whether that was all."""
        before = self.clock() - self.retention
        deleted, done = self._store_or_off().purge(before, PURGE_SLICE_S)
        if deleted:
            log.info("usage ledger: %d records older than %s deleted (rollups kept)", deleted, before.date())
        return done

    def _up(self) -> None:
        if not self._db_up:
            log.warning("usage ledger: the database is back; storing the spool")
        self._db_up, self._failures, self._retry_at = True, 0, 0.0
        if self._spool is not None:
            self._spool.keep_rows = True

    def _down(self, exc: Exception) -> None:
        if self._db_up:
            log.error("usage ledger: the database is unavailable (%s); records wait in the spool", exc)
        self._db_up = False
        if self._spool is not None:  # what comes meanwhile is read back from the files
            self._spool.keep_rows = False
            self._spool.spill()
        self._opened = False  # the next try makes the tables again, should they be what went
        self._failures += 1
        self._retry_at = time.monotonic() + min(0.5 * 2 ** (self._failures - 1), self._retry_max_s)

    def _store_or_off(self) -> SQLStore:
        if self.store is None:
            raise LedgerUnavailable("the usage ledger is off (SWITCHBOARD_USAGE_DB=off)")
        return self.store

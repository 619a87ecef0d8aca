"""The ledger in a SQLite file: the embedded default (`SWITCHBOARD_USAGE_DB=var/usage.db`).

One connection writes (the ledger's thread, one batch at a time, `BEGIN IMMEDIATE`); readers
take connections of their own from a small pool, and WAL mode lets them read while a batch is
written, so `switchboard usage` can read the file of a running service. `synchronous=FULL`:
a committed batch survives a power loss, since its spool segment is deleted right after.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from service.usage.stores.schema import SCHEMA, VALUES_PER_ROW
from service.usage.stores.sql import BadBatch, Cursor, SQLStore, StoreUnavailable

log = logging.getLogger(__name__)

_DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, OverflowError)


class SqliteStore(SQLStore):
    """The ledger's tables in the SQLite file at `path`."""

    kind = "sqlite"
    shared = False
    hour_of_ts = "strftime('%Y-%m-%dT%H', ts_us / 1000000, 'unixepoch')"
    clustered = " WITHOUT ROWID"
    counts_many = True

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path
        self.create = create
        self._writer: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None
        """(device, inode) of the file the writer opened."""
        self._made = False

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def open(self) -> None:
        if self.create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(f"cannot make the folder of {self.path}: {exc.strerror}") from None
        super().open()
        self._made = True

    def _same_file(self) -> bool:
        return self._identity is not None and _identity(self.path) == self._identity

    def _connect(self) -> sqlite3.Connection:
        mode = "rwc" if self.create else "rw"
        try:
            conn = sqlite3.connect(
                f"file:{quote(str(self.path))}?mode={mode}",
                uri=True,
                isolation_level=None,  # transactions are explicit
                check_same_thread=False,  # each is used by one thread at a time, and closed by any
                timeout=5.0,
                cached_statements=256,  # the INSERTs of each size, and of names a statement shares
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from None
        with self._lock:
            self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        with self._write_lock:
            if self._writer is not None and not self._same_file():
                # Removed or replaced under us: batches would go to a file nobody can read again,
                # and their spool segments be deleted. Start a new file instead (and say so).
                log.error("usage ledger: %s was removed or replaced; storing into a new one", self.path)
                self.close()
            if self._writer is None:
                self._writer = self._connect()
                self._identity = _identity(self.path)
                if self._made:
                    for statement in SCHEMA:
                        self._writer.execute(statement.replace("{clustered}", self.clustered))
            # what this SQLite binds in one statement (999 before 3.32): the rows an INSERT holds
            self.max_rows = max(
                1, self._writer.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // VALUES_PER_ROW
            )
            cur = self._writer.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                yield cur
                cur.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute("ROLLBACK")
                raise _translated(exc) from None
            finally:
                cur.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Cursor]:
        if self._identity is not None and not self._same_file():
            with self._transaction():  # makes the file again, with its tables
                pass
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
        cur = conn.cursor()
        try:
            yield cur
        except BaseException as exc:
            raise _translated(exc) from None
        finally:
            cur.close()
            self._readers.put(conn)

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._writer = None
        self._identity = None
        self._readers = queue.SimpleQueue()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _translated(exc: BaseException) -> BaseException:
    if isinstance(exc, _DATA_ERRORS):
        return BadBatch(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, sqlite3.Error):
        return StoreUnavailable(f"{type(exc).__name__}: {exc}")
    return exc

"""The ledger in PostgreSQL, shared by every replica (`SWITCHBOARD_USAGE_DB=postgresql://…`).

psycopg 3 with a `psycopg_pool` connection pool: connections are made in the background,
checked before each use (a restarted server leaves the pool's old ones dead), and a request for
one waits at most a few seconds, so a server that is down makes calls fail fast with
StoreUnavailable rather than hang. A server that stops answering on a connection already made
(hung, or cut off without a reset: the socket stays open, and psycopg would wait on it for good)
is given a deadline: the check, a read and a transaction each wait for it at most `_CHECK_S`,
`_READ_S` and `_WRITE_S`, then the connection is cut, and the call fails as a lost connection.
The URL may hold a password: it is never logged or shown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from service.usage.stores.sql import BadBatch, Cursor, SQLStore, StoreUnavailable

_WAIT_S = 3.0
"""How long a call waits for a connection before the database counts as unavailable."""
_CHECK_S = 3.0
"""How long a pooled connection's check waits for the server before the connection is cut."""
_READ_S = 10.0
"""How long a read waits for the server (`/usage` answers in well under a second): then it is
cut, and the read is 503 `ledger_unavailable` (docs/reference.md §13.4)."""
_WRITE_S = 60.0
"""How long a transaction (a batch stored with its rollups, a slice of old records deleted)
waits for the server: then it is cut and rolled back, and its records stay in the spool."""
_SCHEMA_LOCK = 0x5B_05A6E
"""An advisory lock's number: replicas starting together create the tables one at a time."""


class PostgresStore(SQLStore):
    """The ledger's tables in the PostgreSQL database at `url`."""

    kind = "postgresql"
    shared = True
    hour_of_ts = "to_char(to_timestamp(ts_us / 1000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24')"

    def __init__(self, url: str, *, max_size: int = 4) -> None:
        self._url = url
        self._mask = _Masking(_secrets(url))
        self._max_size = max_size
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._lock = threading.Lock()
        self._using: set[psycopg.Connection[Any]] = set()
        """The connections calls are using now: what `interrupt` cuts."""
        self._interrupted = False

    def _connections(self) -> ConnectionPool[psycopg.Connection[Any]]:
        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self._url,
                    min_size=1,
                    max_size=self._max_size,
                    open=False,
                    timeout=_WAIT_S,
                    check=_check,
                    kwargs={"autocommit": True, "connect_timeout": 3, "application_name": "switchboard"},
                    name="switchboard-usage",
                )
                for name in _LOGGERS:  # from now on the pool logs what libpq says of the URL
                    logging.getLogger(name).addFilter(self._mask)
                self._pool.open(wait=False)
            return self._pool

    @property
    def exists(self) -> bool:
        """Whether a service made the ledger's tables in this database yet (a fresh one holds no
        usage, as a SQLite file not made yet). StoreUnavailable when it cannot be reached."""
        with self._reading() as cursor:
            cursor.execute("SELECT to_regclass('usage_records') IS NOT NULL")
            return bool(cursor.fetchone()[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        with self._connection(_WRITE_S) as conn, conn.transaction(), conn.cursor() as cur:
            yield _Dialect(cur)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Cursor]:
        with self._connection(_READ_S) as conn, conn.cursor() as cur:
            yield _Dialect(cur)

    @contextlib.contextmanager
    def _connection(self, seconds: float) -> Iterator[psycopg.Connection[Any]]:
        if self._interrupted:
            raise StoreUnavailable("PostgreSQL did not answer before the service stopped")
        try:
            with self._connections().connection() as conn, _deadline(conn, seconds), self._used(conn):
                yield conn
        except PoolTimeout:
            raise StoreUnavailable("PostgreSQL cannot be reached") from None
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded) as exc:
            # what a record holds (a value, or a key past what an index holds): set it aside
            raise BadBatch(f"{type(exc).__name__}: {exc}") from None
        except psycopg.Error as exc:  # anything else (a dropped table too) is retried, records kept
            message = self._mask.masked(_first_line(exc))
            raise StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {message}") from None

    def _schema_lock(self, cursor: Cursor) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))

    @contextlib.contextmanager
    def _used(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        with self._lock:
            self._using.add(conn)
        try:
            yield
        finally:
            with self._lock:
                self._using.discard(conn)

    def interrupt(self) -> None:
        """Cut every call waiting on PostgreSQL now (their sockets shut down: each fails as a lost
        connection, its transaction rolled back), and fail those that come after."""
        with self._lock:
            self._interrupted = True
            using = list(self._using)
        for conn in using:
            _shut(conn)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=2.0)
            for name in _LOGGERS:
                logging.getLogger(name).removeFilter(self._mask)


class _Dialect:
    """A psycopg cursor that takes the `?` placeholders the shared statements use."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Any = (), /) -> Any:
        return self._cursor.execute(_placeholders(sql), params)

    def executemany(self, sql: str, params: Any, /) -> Any:
        return self._cursor.executemany(_placeholders(sql), params)

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount


def _check(conn: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection before it is used, within `_CHECK_S`."""
    with _deadline(conn, _CHECK_S):
        ConnectionPool.check_connection(conn)


@contextlib.contextmanager
def _deadline(conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
    """Cut `conn` should the block still run after `seconds` (waiting on a server that does not
    answer): its socket is shut down, so psycopg's wait ends as a lost connection
    (`OperationalError`), and the pool discards it."""
    state = {"done": False}
    lock = threading.Lock()

    def cut() -> None:
        with lock:
            if not state["done"]:
                _shut(conn)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
        timer.cancel()


def _shut(conn: psycopg.Connection[Any]) -> None:
    """Shut down `conn`'s socket (through a duplicate of its descriptor: libpq still owns it)."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:  # no socket any more: nothing waits on it
        return
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)


def _placeholders(sql: str) -> str:
    # The shared statements hold no literal `?` or `%` but the modulo operator.
    return sql.replace("%", "%%").replace("?", "%s")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class _Masking(logging.Filter):
    """Masks the password of a store's URL in what psycopg logs: libpq quotes what it cannot
    read of a URL (`invalid percent-encoded token: "pa%zz…"`, a malformed URL whole), and the
    pool logs that at each try to connect."""

    def __init__(self, secrets: set[str]) -> None:
        super().__init__()
        self.secrets = sorted(secrets, key=len, reverse=True)

    def masked(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "****")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.masked(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_LOGGERS = ("psycopg", "psycopg.pool")
_MIN_SECRET = 4
"""A shorter piece of a password is not masked on its own (it would mask words of the messages)."""


def _secrets(url: str) -> set[str]:
    """What of `url` must not be logged: the URL, and its password (as written, decoded, and each
    piece libpq may quote on its own), from its user info or its query."""
    rest = url.partition("://")[2]
    passwords = [rest[: rest.rfind("@")].partition(":")[2]] if "@" in rest else []
    passwords += re.findall(r"[?&]password=([^&]*)", url)
    found = {url}
    for password in passwords:
        for text in (password, unquote(password)):
            found.add(text)
            found.update(re.split(r"[@/?#&\s]+", text))
    return {text for text in found if len(text) >= _MIN_SECRET}

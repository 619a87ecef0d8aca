"""Where the ledger keeps records: SQLite (embedded, the default) or PostgreSQL (shared by replicas).

Both speak the same SQL (`service.usage.stores.sql`) over the same tables; each store adds how it
connects. A store's methods block: the ledger calls them from its own thread, the HTTP layer
through `asyncio.to_thread`. `StoreUnavailable` means "try again later" (the database cannot be
reached, is locked, the disk failed); `BadBatch` means the data itself was refused, which the
ledger answers by finding the one record to blame.
"""

from __future__ import annotations

from pathlib import Path

from service.usage.stores.sql import BadBatch, SQLStore, StoreUnavailable

__all__ = ["BadBatch", "SQLStore", "StoreUnavailable", "is_postgres", "open_store"]


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str, root: Path, *, create: bool = True) -> SQLStore | None:
    """The store `SWITCHBOARD_USAGE_DB` names: None for `off`; a path is relative to `root`.

    `create` false: a SQLite file that does not exist is not made (for `switchboard usage`).
    Nothing connects until the store's first use.
    """
    if url.strip().lower() == "off":
        return None
    if is_postgres(url):
        from service.usage.stores.postgres import PostgresStore  # psycopg only when configured

        return PostgresStore(url)
    from service.usage.stores.sqlite import SqliteStore

    path = Path(url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url)
    return SqliteStore(path if path.is_absolute() else root / path, create=create)

"""`switchboard usage [--since 7d] [--until T] [--by client,model] [--format table|csv|json]`.

Reads the ledger's database directly (docs/reference.md §13): the service need not run, and a running one
is not disturbed (SQLite's WAL lets a reader in beside the writer). `--format json` prints
what `GET …/usage` answers, `csv` its rows, `table` (the default) the same rows with `rich`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from service.errors import BadRequest, LedgerUnavailable
from service.settings import Settings
from service.usage.query import Totals, UsageQuery, usage_answer, usage_csv
from service.usage.spool import SEGMENT_SUFFIX
from service.usage.stores import StoreUnavailable, open_store


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Print the ledger's usage, grouped; exit 2 for a wrong flag, 1 when the ledger is off or down."""
    params = {
        "since": ns.since or "",
        "until": ns.until or "",
        "group_by": ns.by or "",
        "client": ns.client or "",
        "provider": ns.provider or "",
        "model": ns.model or "",
    }
    try:
        query = UsageQuery.parse(params, datetime.now(UTC))
    except BadRequest as exc:
        print(f"switchboard: error: {exc.message.replace('`group_by`', '--by')}", file=sys.stderr)
        return 2
    # The connection pool warns of each failed try to connect (two lines each); the command says
    # once, in one line, that the ledger cannot be read (docs/reference.md §3).
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    store = open_store(settings.usage_db.get_secret_value(), settings.root, create=False)
    if store is None:
        raise LedgerUnavailable("the usage ledger is off (SWITCHBOARD_USAGE_DB=off)")
    try:
        groups = store.grouped(query) if store.exists else {}  # no table made yet: nothing
    except StoreUnavailable as exc:
        raise LedgerUnavailable(f"the usage ledger cannot be read: {exc}") from None
    finally:
        store.close()
    answer = usage_answer(query, groups, store.shared)
    if ns.format == "json":
        print(json.dumps(answer))
    elif ns.format == "csv":
        sys.stdout.write(usage_csv(answer))
    else:
        console = Console()
        if not console.is_terminal:  # piped or captured: do not fold the columns into 80
            console = Console(width=200)
        console.print(_table(answer))
    _waiting(settings)
    return 0


def _table(answer: dict[str, Any]) -> Table:
    keys = list(answer["group_by"])
    metrics = list(Totals().to_json())
    table = Table(
        title=f"usage from {answer['since']} to {answer['until']}",
        show_footer=bool(answer["rows"]),
        caption="shared ledger (PostgreSQL)" if answer["shared"] else None,
    )
    totals = answer["totals"]
    for i, key in enumerate(keys):
        table.add_column(key, footer="total" if i == 0 else "")
    for name in metrics:
        table.add_column(name.removesuffix("_tokens"), justify="right", footer=str(totals[name]))
    for row in answer["rows"]:
        cells = ["-" if row[k] is None else str(row[k]) for k in keys]
        table.add_row(*cells, *(str(row[m]) for m in metrics), end_section=False)
    if not answer["rows"]:
        table.add_row(*([""] * len(keys)), *("0" for _ in metrics))
    return table


def _waiting(settings: Settings) -> None:
    """Say so when records wait in the spool (the service stores them when it runs)."""
    folder = settings.usage_spool_dir
    count = 0
    segments = [*folder.glob(f"*{SEGMENT_SUFFIX}"), *folder.glob(f"worker-*/*{SEGMENT_SUFFIX}")]
    for segment in segments if folder.is_dir() else ():  # a follower's too (`serve --workers N`)
        try:
            with segment.open("rb") as f:
                count += sum(1 for line in f if line.endswith(b"\n"))
        except OSError:
            continue
    if count:
        print(
            f"switchboard: note: {count} records in {folder} are not stored yet "
            "(the service stores them when it runs)",
            file=sys.stderr,
        )

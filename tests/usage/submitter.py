"""A process that submits records to a ledger as fast as it can, printing each id once `submit`
has returned: the test kills it with SIGKILL and checks that every printed id was stored."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from service.usage.ledger import Ledger
from service.usage.stores import open_store
from tests.usage.conftest import record


async def main(spool: Path, db: str, prefix: str) -> None:
    ledger = Ledger(open_store(db, spool.parent), spool, linger_s=0.005)
    await ledger.start()
    i = 0
    while True:
        for _ in range(20):
            i += 1
            ledger.submit(record(id=f"{prefix}-{i}"))
            sys.stdout.write(f"{prefix}-{i}\n")
        sys.stdout.flush()
        await asyncio.sleep(0)  # let the ledger's thread run now and then, as a busy gateway does


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))

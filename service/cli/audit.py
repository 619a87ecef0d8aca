"""`switchboard audit show [filters]` / `audit verify`: read, or check, the event log."""

from __future__ import annotations

import argparse
import sys

from service.journal.reader import iter_events, readable
from service.journal.reader import verify as verify_chain
from service.journal.replay import filter_events, parse_time
from service.settings import Settings


def show(ns: argparse.Namespace, settings: Settings) -> int:
    """Events matching the filters, oldest first, as text lines or JSON; EventLogError (exit 1)
    for a log that cannot be read, a missing one too, as `audit verify` says it."""

    path = settings.events_file
    readable(path)
    events = iter_events(path)  # streamed: the log may be long
    try:
        since = parse_time(ns.since) if ns.since else None
        until = parse_time(ns.until) if ns.until else None
    except ValueError as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        return 2
    for event in filter_events(events, ns.subject, ns.event_type, since, until, ns.limit):
        if ns.format == "json":
            print(event.model_dump_json())
            continue
        commit = (event.commit or "")[:10] or ("uncommitted" if event.uncommitted else "-")
        fields = ", ".join(event.changes) or getattr(event, "reason", None) or ""
        line = f"{event.seq:>6} {event.model_dump(mode='json')['ts']} {event.type:<24} {event.subject or '-'}"
        print(f"{line} [{commit}] {event.author or ''} {fields}".rstrip())
    return 0


def verify(ns: argparse.Namespace, settings: Settings) -> int:
    """Check the hash chain; ChainBroken (exit 1) names the first bad seq."""

    count = verify_chain(settings.events_file)
    print(f"{settings.events_file}: {count} events, hash chain intact")
    return 0

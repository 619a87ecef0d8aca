"""`switchboard state [--at TIME]`: the configuration as it stood at a time, from the event log."""

from __future__ import annotations

import argparse
import json
import sys

from service.journal.reader import iter_events, readable
from service.journal.replay import parse_time, replay
from service.settings import Settings


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Print the masked configuration at `--at` (default: now) as JSON; EventLogError (exit 1)
    for a log that cannot be read, a missing one too (an empty configuration would be a wrong
    answer).

    The log is streamed (the service may be appending to it): memory stays bounded.
    """

    try:
        at = parse_time(ns.at) if ns.at else None
    except ValueError as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        return 2
    readable(settings.events_file)
    print(json.dumps(replay(iter_events(settings.events_file), at), indent=2, sort_keys=True))
    return 0

"""The routing file among the files at a base, as a write finds it: the file a route write
edits, checked before a route is written beside it, and asked who names a provider removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath

from service.config.loader import is_config_file, parse
from service.config.models import Routing
from service.errors import Conflict, FileRejected


def routing_file(files: Mapping[str, bytes], display: Callable[[str], str]) -> tuple[str, bytes] | None:
    """The path and bytes of the routing file among `files` (None: there is none that loads)."""
    for path, data in sorted(files.items()):
        if not is_config_file(PurePosixPath(path).name):
            continue
        try:
            loaded = parse(display(path), data)
        except FileRejected:
            continue
        if isinstance(loaded.document, Routing):
            return path, data
    return None


def check_no_broken_routing(files: Mapping[str, bytes], display: Callable[[str], str]) -> None:
    """Conflict when a routing file in git does not load: a route written beside it, or over
    it, would drop every purpose it holds (the service still serves them from its last good
    version)."""
    for path, data in sorted(files.items()):
        if not is_config_file(PurePosixPath(path).name):
            continue
        try:
            parse(display(path), data)
        except FileRejected as exc:
            if PurePosixPath(path).stem == "routing" or _ROUTING_KIND.search(data):
                raise Conflict(
                    f"{display(path)} is not valid in git ({exc.reason}); fix it through git first, "
                    "since a route written now would drop the routes it holds"
                ) from None


_ROUTING_KIND = re.compile(rb"""(?m)^kind[ \t]*:[ \t]*(routing|'routing'|"routing")[ \t]*(#.*)?$""")
"""`kind: routing` at the top level, found without loading YAML that failed to load (an alias
bomb, say)."""


def purposes_naming(files: Mapping[str, bytes], provider_id: str, display: Callable[[str], str]) -> list[str]:
    """The purposes whose route names `provider_id`, in the routing file among `files`."""
    found = routing_file(files, display)
    if found is None:
        return []
    routing = parse(display(found[0]), found[1]).document
    assert isinstance(routing, Routing)  # noqa: S101
    return [p for p, r in sorted(routing.purposes.items()) if provider_id in r.primary + r.fallbacks]

"""Pages served beside the API: what `create_app(settings, pages=...)` mounts, such as the web console.

A page is a client of the API like any other, so nothing here imports one: the app is handed
each (a module or an object with `setup` and `operations`), mounts its routes, and describes
them in `/openapi.json` with the API's own operations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from aiohttp import web

from service.http.operations import Operation, Schemas


class Pages(Protocol):
    """Routes the app serves that are not the API: `setup` adds them, `operations` describes them."""

    def setup(self, app: web.Application) -> None: ...

    def operations(self, s: Schemas) -> Iterable[Operation]: ...


PAGES: web.AppKey[tuple[Pages, ...]] = web.AppKey("pages")
"""What `create_app` was given to mount; `/openapi.json` describes their routes too."""

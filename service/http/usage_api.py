"""The usage ledger over HTTP (docs/reference.md §13), and its place in the service's lifecycle.

    GET …/usage?since=&until=&group_by=&client=&provider=&model=&format=json|csv     usage:read
    GET …/usage/requests?client=&provider=&since=&until=&status=&limit=&cursor=      usage:read

The ledger (`service.usage.ledger.Ledger`) is made with the app and kept at `LEDGER`, where the
gateway hands it each answered request's record; its cleanup context starts it before the
gateway's and stops it after (so the last requests' records are stored before the process
ends). Every parameter is checked before anything is asked of the database (400 naming it);
a database that is down answers 503 `ledger_unavailable`. Like every GET under the API these
carry an ETag and answer `If-None-Match` (docs/reference.md §9).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from aiohttp import web

from service.http.auth import scoped
from service.http.context import LEDGER, PREFIX, RECORDS, SETTINGS, SPENT
from service.http.push import body_tag, watched
from service.usage.ledger import Ledger
from service.usage.query import RequestsQuery, UsageQuery, usage_csv

USAGE = f"{PREFIX}/usage"
REQUESTS = f"{PREFIX}/usage/requests"
_PUSH_PARAMS = frozenset({"index", "wait"})
"""docs/reference.md §9's parameters, which `watched` reads: not the ledger's."""
_WINDOW = frozenset({"since", "until"})


def setup(app: web.Application) -> None:
    """Make the ledger, add its routes, and start and stop it with the app (before the gateway)."""
    ledger = app[LEDGER] = Ledger.from_settings(app[SETTINGS])
    app[RECORDS] = ledger  # the gateway's record of each answered request goes to the ledger,
    app[SPENT] = ledger  # and budgets' spent before a start is read back from it
    app.router.add_get(USAGE, _usage)
    app.router.add_get(REQUESTS, _requests)
    app.cleanup_ctx.append(_lifecycle)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    ledger = app[LEDGER]
    await ledger.start()
    try:
        yield
    finally:
        await ledger.stop()


@scoped("usage:read")
@watched
async def _usage(request: web.Request) -> web.StreamResponse:
    ledger = request.app[LEDGER]
    query = UsageQuery.parse(_params(request), ledger.clock())
    answer = await ledger.usage(query)
    if query.format == "csv":
        return web.Response(text=usage_csv(answer), content_type="text/csv", charset="utf-8")
    response = web.json_response(answer)
    # the window (the last 7 days up to now by default) is when it was asked, as `state`'s
    # `at`, not what it means: not in the tag, or no tag would ever be answered 304
    meaning = {k: v for k, v in answer.items() if k not in _WINDOW}
    response.headers["ETag"] = body_tag(json.dumps(meaning, sort_keys=True).encode())
    return response


@scoped("usage:read")
@watched
async def _requests(request: web.Request) -> web.StreamResponse:
    ledger = request.app[LEDGER]
    query = RequestsQuery.parse(_params(request), ledger.clock())
    return web.json_response(await ledger.requests(query))


def _params(request: web.Request) -> dict[str, str]:
    """The query's parameters, each once (a repeated one is its first value)."""
    params: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in _PUSH_PARAMS:
            params.setdefault(name, value)
    return params

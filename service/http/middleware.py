"""What every answer goes through: the one middleware that turns every error into the JSON of
docs/reference.md §6.4, `{"error": {"type", "message"}}` (`answer_errors`, and `answered` for the
routes `Gateway` takes before the router), that JSON made of an exception (`failure_answer`), and
`nosniff` on every answer and `X-Switchboard-Replica` on every one under the configuration's
prefix (`nosniff`). `app.py` installs them and `gateway.py` calls them; they
are the app's internals, not an API.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from service.errors import EventLogError, HTTPError, NotReady, PayloadTooLarge
from service.gateway.relay import NOSNIFF_HEADER
from service.http.auth import Handler, same_machine
from service.http.context import METRICS, PREFIX, SETTINGS
from service.http.malformed import on_path
from service.http.openai_api import internal, unreadable
from service.http.push import REPLICA_HEADER
from service.metrics import Metrics

log = logging.getLogger(__name__)


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    return await answered(
        request, handler, resource.canonical if resource else "unmatched", request.app[METRICS]
    )


async def answered(
    request: web.Request, handler: Handler, route: str, metrics: Metrics
) -> web.StreamResponse:
    """`handler`'s answer, or the JSON of the error it raised; counted in `metrics` under `route`."""
    started = time.perf_counter()
    try:
        same_machine(request)
        response = await handler(request)
    except Exception as exc:
        response = failure_answer(request, exc, route)
    metrics.answered(route, request.method, response.status, time.perf_counter() - started)
    return response


def failure_answer(request: web.Request, exc: Exception, route: str) -> web.Response:
    """The JSON answer to `exc`, which a handler of `route` raised; called where it is caught.
    On Anthropic's Messages paths it comes in Anthropic's shape, even when the router gives it
    (a 405, a 417): the SDKs read no other (docs/reference.md §14).

    The event log's EventLogError (replaced, truncated or full under the service) is 503
    `not_ready`, its message saying what; a web.HTTPException below 400 (a redirect) is raised
    again, for aiohttp to answer."""
    headers: dict[str, str] = {}
    if isinstance(exc, HTTPError):
        status, body, headers = exc.status, exc.body(), exc.headers()
    elif isinstance(exc, EventLogError):  # a log that cannot be read or appended: no bug of ours
        log.warning("%s %s: %s", request.method, route, exc)
        unlogged = NotReady(str(exc))
        status, body = unlogged.status, unlogged.body()
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        error = PayloadTooLarge.over(request.app[SETTINGS].max_body_bytes)
        status, body = error.status, error.body()
    elif isinstance(exc, web.RequestPayloadError):  # a body it cannot decode: gzip that is not
        refused = unreadable(exc)
        status, body = refused.status, refused.body()
    elif isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        kind = exc.reason.lower().replace(" ", "_")
        # aiohttp's 405 names the methods the path takes: an answer without them breaks RFC 9110.
        # Written as every other 405 of ours writes them (`GET, HEAD`), not aiohttp's `GET,HEAD`.
        if "Allow" in exc.headers:
            headers = {"Allow": ", ".join(m.strip() for m in exc.headers["Allow"].split(","))}
        status, body = exc.status, {"error": {"type": kind, "message": exc.reason}}
    else:
        bug = internal(request, route)
        status, body = bug.status, bug.body()
    body, gateway = on_path(request.path, status, body)
    if gateway:  # a gateway answer, the router's too (docs/reference.md §7, §13)
        headers = {**gateway, **headers}
    return web.json_response(body, status=status, headers=headers)


async def nosniff(request: web.Request, response: web.StreamResponse) -> None:
    # Errors quote what was asked (`no provider '<script>…'`): every answer is what its
    # Content-Type says, never guessed into a page that would run in the console's origin.
    response.headers.setdefault(NOSNIFF_HEADER, "nosniff")
    if request.path.startswith(PREFIX):  # an error's too: which replica said it (§9, §12)
        response.headers.setdefault(REPLICA_HEADER, request.app[SETTINGS].replica)

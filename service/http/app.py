"""The aiohttp application: `create_app(settings)` and the service's lifecycle.

The cleanup context opens the event log, records `service.started`, builds the registry
and runs the watcher as a background task; on shutdown it stops the watcher, waits for any
apply still running in its thread, and only then closes the log, so no append comes late.
Every error leaves as the JSON of docs/reference.md §6.4, `{"error": {"type", "message"}}`, from
one middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import PlainResource, UrlMappingMatchInfo

from service import __version__
from service.config.upstreams import AllowedUpstreams, Lookup, system_lookup
from service.crypto.sops import Sops
from service.errors import HTTPError, NotReady, PayloadTooLarge
from service.gateway.account import REQUEST_ID
from service.gateway.call import ATTEMPTS_HEADER, PROVIDER_HEADER, Call
from service.gateway.health import Health
from service.gateway.protocols import messages
from service.gateway.relay import NO_PROVIDER, NOSNIFF_HEADER
from service.http import (
    changes,
    config_api,
    limits_api,
    openai_api,
    openapi,
    protocols_api,
    replicas,
    stalls,
    telemetry,
    traffic,
    usage_api,
    write_api,
)
from service.http.auth import CLIENT, KNOWN_TOKENS, Handler, KnownTokens, admit, same_machine
from service.http.changes import CHANGES, Changes
from service.http.context import (
    EVENTS,
    HEALTH,
    LEDGER,
    LIMITS,
    LOOKUP,
    METRICS,
    PULLER,
    REGISTRY,
    RELAY,
    RELOADER,
    SETTINGS,
    SOPS,
    UPSTREAMS,
    WRITER,
    stop_task,
)
from service.http.malformed import ProtocolLog
from service.http.openai_api import ENDPOINTS, Endpoint, arrived, error_answer, internal, unreadable
from service.http.pages import PAGES, Pages
from service.http.tags import TAGS, Tags
from service.journal.events import BaseEvent, ServiceStarted
from service.journal.log import EventLog
from service.metrics import CONTENT_TYPE, Metrics
from service.runtime.registry import Outcome, Registry
from service.runtime.watcher import Reloader
from service.runtime.writer import Writer
from service.settings import Settings
from service.usage.pricing import litellm_version
from service.vcs.attribution import Attributor
from service.vcs.gitrepo import GitRepo

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    sops: Sops | None = None,
    lookup: Lookup = system_lookup,
    pages: Sequence[Pages] = (),
) -> web.Application:
    """The service as an aiohttp application; nothing starts until the app runs.

    `lookup` resolves upstream host names (the system's resolver). `pages` are mounted beside
    the API (`switchboard serve` passes the web console, `service.console`). Raises ValueError
    when SWITCHBOARD_ALLOWED_UPSTREAMS cannot be read.
    """
    app = web.Application(
        middlewares=[_errors],
        client_max_size=settings.max_body_bytes,
        handler_args={"logger": ProtocolLog(logging.getLogger("service.http.protocol"))},
    )
    app[SETTINGS] = settings
    app[KNOWN_TOKENS] = KnownTokens()
    app[UPSTREAMS] = AllowedUpstreams.parse(settings.allowed_upstreams)
    app[LOOKUP] = lookup
    app[METRICS] = Metrics()
    app[METRICS].info.labels(settings.replica, __version__, litellm_version() or "none").set(1)
    app[HEALTH] = Health(
        failures=settings.circuit_failures,
        cooldown_s=settings.circuit_cooldown_s,
        confirm=settings.health_confirm,
    )
    app[SOPS] = sops or Sops.from_settings(settings)
    app.on_response_prepare.append(_nosniff)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    usage_api.setup(app)  # the ledger starts before anything can answer a request, and stops last
    app.cleanup_ctx.append(_service)  # then: the features' contexts use its log and registry
    config_api.setup(app)
    write_api.setup(app)
    telemetry.setup(app)  # before the gateway's: its relay is given the tracing, and stops first
    openai_api.setup(app)
    protocols_api.setup(app)
    limits_api.setup(app)  # after the gateway's context: its meter goes on the relay
    openapi.setup(app)
    changes.setup(app)
    replicas.setup(app)
    traffic.setup(app)
    app[PAGES] = tuple(pages)
    for page in pages:
        page.setup(app)
    Gateway(app).install()
    return app


async def _service(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]

    def count(event: BaseEvent) -> None:
        metrics.events.labels(event.type).inc()

    events = EventLog(settings.events_file, on_append=count)
    if events.recovered_tail:
        log.warning("event log: %s", events.recovered_tail)
    events.append(
        ServiceStarted(
            version=__version__, pid=os.getpid(), replica=settings.replica, recovered=events.recovered_tail
        )
    )
    attributor = Attributor(settings.providers_dir)
    registry = Registry(events, settings.files_root, attributor)

    def on_reload(outcome: Outcome, seconds: float) -> None:
        metrics.reloads.labels("applied" if outcome.applied else "refused").inc()
        metrics.reload_seconds.observe(seconds)
        metrics.generation.set(outcome.snapshot.generation)
        metrics.providers.set(len(outcome.snapshot.providers))
        metrics.files_refused.set(len(outcome.refused))

    reloader = Reloader(
        settings.providers_dir,
        settings.files_root,
        registry,
        app[SOPS],
        debounce_ms=settings.debounce_ms,
        rescan_s=settings.rescan_s,
        on_reload=on_reload,
    )
    writer = Writer(settings, app[SOPS], registry, reloader, attributor.repo, lookup=app[LOOKUP])
    await asyncio.to_thread(writer.recover)  # a write a crash cut short, before anything loads
    app[EVENTS], app[REGISTRY], app[RELOADER], app[WRITER] = events, registry, reloader, writer
    # Before the first load, so blocking queries and streams hear of it.
    changes_ = app[CHANGES] = Changes(
        events, registry, settings.replica, settings.max_watchers, settings.max_watchers_per_client
    )
    tags_ = app[TAGS] = Tags(
        lambda: _repository(registry, writer), lambda: registry.state.last_applied_commit
    )
    # the commits served, so a tag of one left (a rollback) is never taken for one still to come
    registry.on_apply.append(lambda _: tags_.applied(registry.state.last_applied_commit))

    def shown(provider_id: str) -> None:
        changes_.touch()  # a provider's status or reason is in the tags: held queries look again

    app[HEALTH].on_shown.append(shown)
    stop = asyncio.Event()
    watcher = asyncio.create_task(reloader.watch(stop), name="switchboard-watcher")
    try:
        yield
    finally:
        await writer.aclose()  # a write whose client left runs to its end, not half-applied
        stop.set()
        await stop_task(watcher)
        await reloader.aclose()  # a cancelled reload's apply finishes in its thread first
        events.close()
        app[HEALTH].on_shown.remove(shown)


YOUNG_ALLOCATIONS = 50_000
"""The cyclic collector's youngest generation is collected after this many allocations (net of
frees) once `serve` is settled; CPython's default is 700. At most this many young objects wait,
a few MB, for a collection of their cycles."""

YOUNG_PERIOD_S = 1.0
"""…and at least this often, whatever was allocated: the two younger generations are collected
on a timer too, so a cycle that holds a large body (a request's, an answer's) lives about a
second at most, not until 50,000 allocations have come."""


async def settled_collector(app: web.Application) -> AsyncIterator[None]:
    """What `switchboard serve` adds: once the first configuration is loaded, the garbage of
    the start is collected and what is left is frozen (`gc.freeze`, docs/architecture.md).

    CPython's cyclic collector now and then walks every object it tracks (a full collection);
    after a start that is ~90k objects (modules, schemas, the registry), which stopped the
    whole service for 50-160 ms on this project's benchmark machine, every request waiting.
    Frozen, they are left out of every later collection, which walks only what came since.
    The youngest generation is then collected every `YOUNG_ALLOCATIONS` allocations instead of
    CPython's 700: what such a collection walks is what is alive of the young, the requests in
    flight, whatever the threshold, so fewer collections walk them fewer times (BENCHMARKS.md).
    What a reload replaces is freed as before (by its reference count; a snapshot holds no
    cycles). The two younger generations are also collected every `YOUNG_PERIOD_S`, so that a
    cycle the code should not have made (holding a body, say) is freed within about a second
    even when little is allocated. Not for a process that starts many services (tests): each
    start would freeze the last one's objects for good.
    """
    thresholds = gc.get_threshold()
    task = asyncio.create_task(_settle(app[REGISTRY]), name="switchboard-settle-collector")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.set_threshold(*thresholds)


async def _settle(registry: Registry) -> None:
    loop = asyncio.get_running_loop()
    applied = asyncio.Event()

    def wake(outcome: Outcome) -> None:  # in the applying thread
        loop.call_soon_threadsafe(applied.set)

    registry.on_apply.append(wake)
    try:
        while not registry.state.ready:
            applied.clear()
            await applied.wait()
    finally:
        registry.on_apply.remove(wake)
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_ALLOCATIONS, *gc.get_threshold()[1:])
    log.info(
        "collector settled: %d objects frozen in %.0f ms",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1000,
    )
    while True:
        await asyncio.sleep(YOUNG_PERIOD_S)
        gc.collect(1)


def _repository(registry: Registry, writer: Writer) -> GitRepo | None:
    """The repository the configuration is read from (git-sync's worktree, followed), for the tags."""
    attributor = registry.attributor
    return attributor.repo if attributor is not None and attributor.repo is not None else writer.repo


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
"""The app's `Gateway`, for the fast path's server (`service.http.fast`)."""


class Gateway:
    """The gateway's routes (`POST /v1/...`) taken before the router: the request handler
    aiohttp calls first (`Application._handle`), in front of the router's.

    Every request pays the router's walk and a frame per middleware; the gateway's requests are
    the service's hot path and go to a handful of fixed paths. Those are looked up here in a
    dict, by the same key the router matches (`rel_url.path_safe`) and the method, with the
    match the router would have made: the same answer, metrics and `on_response_prepare`.
    Anything else, and a request with `Expect` (the router's expect handler), goes the usual way.

    A route added as an `Endpoint` (`openai_api.add_endpoint`) runs here as one coroutine down
    to the relay's: what the `_errors` middleware, `answering`, `scoped` and the relaying
    handler do, in their order. Every wait of a request (the upstream's answer, at least) is
    passed through each coroutine above the one that waits: four fewer here. Any other route
    goes through `_answered`, as the middleware sends it.

    An endpoint's answers carry `nosniff` from where they are made (the relay's headers, the
    error answers): while `_nosniff` is all `on_response_prepare` holds, they are not sent
    through it. Their match then has the app as its current app (`request.app`) but in no list
    of apps, which is where aiohttp finds the signals to send; an app given another receiver
    sends it every answer, these too.

    The gateway's own server (`service.http.fast`) runs an endpoint's request through the same
    parts, `called` then `relayed` (or `refused`), when no signal needs its answers (`fast`).
    """

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.metrics = app[METRICS]
        self.max_body_bytes = app[SETTINGS].max_body_bytes
        self.send_timeout_s = app[SETTINGS].send_timeout_s
        self.receive_timeout_s = app[SETTINGS].receive_timeout_s
        endpoints = app.get(ENDPOINTS, {})
        self.routes: dict[tuple[str, str], tuple[Handler, UrlMappingMatchInfo, str, Endpoint | None]] = {}
        for resource in app.router.resources():
            if isinstance(resource, PlainResource) and resource.canonical.startswith("/v1/"):
                for route in resource:
                    key = (route.method, resource.canonical)
                    # The first registered wins, as routing does. One frozen match a route, shared
                    # by its requests: nothing changes a frozen match (its apps are fixed, and
                    # sub-applications are not on this path).
                    if route.method == hdrs.METH_POST and key not in self.routes:
                        match = UrlMappingMatchInfo({}, route)
                        match.add_app(app)
                        match.freeze()
                        endpoint = endpoints.get(route.handler)
                        self.routes[key] = (route.handler, match, resource.canonical, endpoint)
        self.usual = app._handle
        self.unsettled = True
        """Until the first request: the app's signals are final only once it is frozen."""
        self.bare = False
        """The endpoints' matches are in no app's list: their answers are sent through no signal."""

    def install(self) -> None:
        # aiohttp's server calls `app._handle` for every request (`Application._make_handler`)
        object.__setattr__(self.app, "_handle", self.handle)
        # aiohttp's connections: the send and receive timeouts
        stalls.install(self.app, self.send_timeout_s, self.receive_timeout_s, self.metrics.cuts)
        self.app[GATEWAY] = self

    def _settle(self) -> None:
        """Give the endpoints matches in no app's list (see above) if `on_response_prepare`
        holds nothing but `_nosniff`, which their answers do without."""
        self.unsettled = False
        if any(receiver is not _nosniff for receiver in self.app.on_response_prepare):
            return
        for key, (handler, match, name, endpoint) in self.routes.items():
            if endpoint is not None:
                bare = UrlMappingMatchInfo({}, match.route)
                try:
                    bare.current_app = self.app
                except RuntimeError:  # aiohttp's debug mode checks it is one of the match's apps
                    return
                bare.freeze()
                self.routes[key] = (handler, bare, name, endpoint)
        self.bare = True

    def fast(self) -> bool:
        """Whether the endpoints' answers may be written without aiohttp (`service.http.fast`):
        the app is frozen, and its `on_response_prepare` holds nothing they need."""
        if self.unsettled:
            self._settle()
        return self.bare

    def endpoints(self) -> dict[str, tuple[str, UrlMappingMatchInfo, Endpoint]]:
        """The endpoints' paths (`POST`), each with its route's name, its match and its `Endpoint`."""
        return {
            path: (name, match, endpoint)
            for (method, path), (_, match, name, endpoint) in self.routes.items()
            if method == hdrs.METH_POST and endpoint is not None
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.unsettled:
            self._settle()
        found = self.routes.get((request.method, request.rel_url.path_safe))
        if found is None or request.headers.get(hdrs.EXPECT):
            try:
                return await self.usual(request)
            except web.HTTPException as exc:  # the router's expect handler (417), before any middleware
                return _failure(request, exc, "unmatched")
        handler, match, name, endpoint = found
        request._match_info = match
        if endpoint is None:
            return await _answered(request, handler, name, self.metrics)
        started = time.perf_counter()
        try:  # `answering`, `scoped`, then the relaying handler
            admit(request, endpoint.scope)
            body = arrived(request)
            if body is None:
                body = await request.read()
            call = endpoint.call(request, body)
        except Exception as exc:
            return self.refused(request, name, endpoint, exc, started)
        return await self.relayed(request, name, endpoint, call, started)

    def called(self, request: web.Request, endpoint: Endpoint) -> Call:
        """A request whose body came whole as the `Call` to relay; raises what `handle` answers.
        Nothing happens here that a request handed to aiohttp after it would feel."""
        admit(request, endpoint.scope)
        body = arrived(request)
        if body is None:
            raise RuntimeError("the body is not whole")
        return endpoint.call(request, body)

    def refused(
        self, request: web.Request, name: str, endpoint: Endpoint, exc: Exception, started: float
    ) -> web.StreamResponse:
        """The answer to `exc`, raised before the relay (`called`), counted."""
        try:
            response = self._answer(request, name, endpoint, exc)
        except Exception as failed:
            response = _failure(request, failed, name)
            response.headers[NOSNIFF_HEADER] = "nosniff"
        self.metrics.answered(name, request.method, response.status, time.perf_counter() - started)
        return response

    async def relayed(
        self, request: web.Request, name: str, endpoint: Endpoint, call: Call, started: float
    ) -> web.StreamResponse:
        """`call` relayed: the answer (`answering`'s), counted as `_answered` counts it."""
        try:
            try:
                app = self.app
                response = await app[RELAY].relay(call, app[REGISTRY].snapshot)
            except Exception as exc:
                response = self._answer(request, name, endpoint, exc)
            else:
                if not response.prepared and REQUEST_ID not in response.headers:  # every gateway answer
                    response.headers[REQUEST_ID] = uuid.uuid4().hex
        except Exception as exc:
            response = _failure(request, exc, name)
            response.headers[NOSNIFF_HEADER] = "nosniff"
        self.metrics.answered(name, request.method, response.status, time.perf_counter() - started)
        return response

    def _answer(self, request: web.Request, name: str, endpoint: Endpoint, exc: Exception) -> web.Response:
        """What `answering` makes of `exc`; a `web.HTTPException` is raised again, for `_failure`."""
        error: HTTPError
        if isinstance(exc, HTTPError):
            error = exc
        elif isinstance(exc, web.HTTPRequestEntityTooLarge):
            error = PayloadTooLarge.over(self.max_body_bytes)
        elif isinstance(exc, web.RequestPayloadError):
            error = unreadable(exc)
        elif isinstance(exc, web.HTTPException):
            raise exc
        else:
            error = internal(request, name)
        response = error_answer(error, endpoint.shape)
        client = request.get(CLIENT)
        meter = self.app[RELAY].meter
        if client is not None and client.limits is not None and meter is not None:
            # every answer to a client with limits says what remains (docs/reference.md §13),
            # one refused before they were asked too: what is known, nothing counted
            for header, value in meter.remaining(client.name, client.limits).items():
                response.headers.setdefault(header, value)
        return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    return await _answered(
        request, handler, resource.canonical if resource else "unmatched", request.app[METRICS]
    )


async def _answered(
    request: web.Request, handler: Handler, route: str, metrics: Metrics
) -> web.StreamResponse:
    """`handler`'s answer, or the JSON of the error it raised; counted in `metrics` under `route`."""
    started = time.perf_counter()
    try:
        same_machine(request)
        response = await handler(request)
    except Exception as exc:
        response = _failure(request, exc, route)
    metrics.answered(route, request.method, response.status, time.perf_counter() - started)
    return response


_GATEWAY = "/v1/"
"""The gateway's paths: every answer there carries the gateway's headers, the router's too."""
_MESSAGES = "/v1/messages"
"""Anthropic's Messages paths begin so: their errors come in Anthropic's shape."""


def _failure(request: web.Request, exc: Exception, route: str) -> web.Response:
    """The JSON answer to `exc`, which a handler of `route` raised; called where it is caught.
    On Anthropic's Messages paths it comes in Anthropic's shape, even when the router gives it
    (a 405, a 417): the SDKs read no other (docs/reference.md §14).

    A web.HTTPException below 400 (a redirect) is raised again, for aiohttp to answer."""
    headers: dict[str, str] = {}
    if isinstance(exc, HTTPError):
        status, body, headers = exc.status, exc.body(), exc.headers()
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
        headers = {name: exc.headers[name] for name in ("Allow",) if name in exc.headers}
        status, body = exc.status, {"error": {"type": kind, "message": exc.reason}}
    else:
        bug = internal(request, route)
        status, body = bug.status, bug.body()
    path = request.path
    if path.startswith(_GATEWAY):  # a gateway answer, the router's too (docs/reference.md §7, §13)
        headers = {PROVIDER_HEADER: NO_PROVIDER, ATTEMPTS_HEADER: "0", **headers}
        headers.setdefault(REQUEST_ID, uuid.uuid4().hex)
        if path == _MESSAGES or path.startswith(_MESSAGES + "/"):
            error = body["error"]
            extra = {k: v for k, v in error.items() if k not in ("type", "message")}
            body = messages.error(status, error["message"], **extra)
    return web.json_response(body, status=status, headers=headers)


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    # Errors quote what was asked (`no provider '<script>…'`): every answer is what its
    # Content-Type says, never guessed into a page that would run in the console's origin.
    response.headers.setdefault(NOSNIFF_HEADER, "nosniff")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    registry = request.app.get(REGISTRY)
    state = registry.state if registry is not None else None
    if state is None or not state.ready:
        why = f": {state.waiting}" if state is not None and state.waiting else ""
        raise NotReady(f"the first load of the configuration is not complete{why}")
    keeper = request.app.get(LIMITS)
    if keeper is None or not keeper.ready.is_set():
        raise NotReady("the budgets' spent is not read back yet (docs/reference.md §13)")
    limiter = keeper.limiter
    puller = request.app.get(PULLER)
    ledger = request.app[LEDGER].state
    body = {
        "status": "ready",
        "replica": request.app[SETTINGS].replica,
        "generation": state.snapshot.generation,
        "last_applied_commit": state.last_applied_commit,
        "last_attempted_commit": state.last_attempted_commit,
        "refused": [{"file": f, "reason": r} for f, r in sorted(state.refused.items())],
        "degraded": state.degraded or limiter.degraded or ledger == "degraded",
        "limits": limiter.mode,
        "ledger": ledger,
    }
    if puller is not None:  # SWITCHBOARD_GIT_PULL (docs/reference.md §12)
        body["sync"] = puller.status.answer()
    return web.json_response(body)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})

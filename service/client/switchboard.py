"""The connection to one service: a copy of every purpose's route kept current by blocking
queries, the old integration interface answered from it, and the live event stream.

The client holds one blocking query open (`GET …/active?index=N&wait=…`): the service
answers it the moment a configuration or health change is applied, so the copy is current
without a polling interval or a cache to clear. While the service cannot be reached, answers
come from the last copy with `stale` true; the client reconnects with exponential backoff and
full jitter, and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from service.client.errors import (
    BadRequest,
    Forbidden,
    ModelRequired,
    NotFound,
    SwitchboardClientError,
    Unauthorized,
    Unavailable,
    raise_for,
)
from service.client.models import Event, Provider, Route, TestResult, parse_routes
from service.client.stream import parse_sse

log = logging.getLogger("service.client")  # the logger applications configured before the split

PREFIX = "/api/v1/llm-config"
INDEX_HEADER = "X-Switchboard-Index"
REPLICA_HEADER = "X-Switchboard-Replica"


class Switchboard:
    """A connection to one Switchboard service, its active routes kept current in the background."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        wait_s: float = 60.0,
        request_timeout_s: float = 10.0,
        backoff_s: tuple[float, float] = (0.1, 10.0),
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.wait_s = wait_s
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self._session = session
        self._own_session = session is None
        self._routes: dict[str, Route] = {}
        self._index = 0
        self._replica: str | None = None
        self._stale = True
        self._loaded = asyncio.Event()
        self._changed = asyncio.Condition()
        self._watcher: asyncio.Task[None] | None = None
        self._error: SwitchboardClientError | None = None

    async def __aenter__(self) -> Switchboard:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the session and start keeping the copy current (returns without waiting for it)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="switchboard-client-watch")

    async def close(self) -> None:
        """Stop watching and close the session this client opened."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- the old interface ----------------------------------------------------------------------

    async def get_active_llm_provider(
        self, purpose: str, *, timeout_s: float | None = None
    ) -> Provider | None:
        """The first healthy candidate of `purpose` (primaries as listed, then fallbacks); None if none.

        Raises NotFound for a purpose the service does not route, Unavailable when there is no
        copy yet (the service has not been reached since the client started).
        """
        route = await self.route(purpose, timeout_s=timeout_s)
        return next((p for p in route.candidates if p.healthy), None)

    async def get_fallback_provider(
        self, provider: Provider, *, timeout_s: float | None = None
    ) -> Provider | None:
        """The healthy candidate after `provider` in its purpose's route, or None."""
        if provider.purpose is None:
            raise ValueError(
                "this provider was not taken from a route: pass one get_active_llm_provider gave"
            )
        route = await self.route(provider.purpose, timeout_s=timeout_s)
        ids = [p.id for p in route.candidates]
        if provider.id not in ids:
            return next((p for p in route.candidates if p.healthy), None)
        after = route.candidates[ids.index(provider.id) + 1 :]
        return next((p for p in after if p.healthy), None)

    async def route(self, purpose: str, *, timeout_s: float | None = None) -> Route:
        """The current copy of one purpose's route (stale when the service is away)."""
        await self._first_copy(timeout_s)
        route = self._routes.get(purpose)
        if route is None:
            raise NotFound(f"the service routes no provider for `{purpose}`", 404)
        if self._stale:
            return replace(
                route,
                primary=tuple(replace(p, stale=True) for p in route.primary),
                fallbacks=tuple(replace(p, stale=True) for p in route.fallbacks),
            )
        return route

    @property
    def stale(self) -> bool:
        """Whether the copy could not be refreshed lately (answers come from the last one)."""
        return self._stale

    @property
    def index(self) -> int:
        """The service's index (`X-Switchboard-Index`) the copy is at."""
        return self._index

    async def litellm_params(self, purpose: str, model: str | None = None) -> dict[str, Any]:
        """The first healthy candidate that serves `model` as `litellm_params`, for
        `litellm.acompletion(**params, messages=...)`: the model in litellm's form, mapped
        through the provider's `model_map`, and the key decrypted (needs `secrets:read`; every
        such read is an audit event on the service).

        Without `model`, the candidate's first declared model. Raises `ModelRequired` when no
        model can be named that way (the candidate declares none: it serves any model, and `*`
        is no model to send), `NotFound` when no provider of the route serves `model`.
        """
        if model is not None and not model:
            raise ValueError("model must be a model's name, or None")
        query = f"?{urlencode({'model': model})}" if model is not None else ""
        try:
            answer = await self._request("GET", f"{PREFIX}/active/{quote(purpose, safe='')}/litellm{query}")
        except BadRequest as exc:
            if model is not None:
                raise
            raise ModelRequired(
                f"litellm_params({purpose!r}) needs a model: {exc} — call litellm_params({purpose!r}, "
                "model=...)",
                exc.status,
            ) from None
        params: dict[str, Any] = dict(answer["litellm_params"])
        return params

    async def test_provider(self, provider_id: str) -> TestResult:
        """A health check of one provider now (needs `admin`)."""
        answer = await self._request("POST", f"{PREFIX}/providers/{provider_id}/test", json={})
        return TestResult(bool(answer.get("ok")), answer.get("latency_ms"), str(answer.get("message", "")))

    async def providers(self) -> list[Provider]:
        """Every provider, masked, with health (a fresh read, not the copy)."""
        answer = await self._request("GET", f"{PREFIX}/providers")
        return [Provider.from_json(p) for p in answer.get("providers", [])]

    async def wait_for_change(self, index: int | None = None, timeout_s: float | None = None) -> int:
        """Wait until the copy is past `index` (default: the current one); the new index."""
        start = self._index if index is None else index
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self._index != start), timeout_s)
        return self._index

    # -- the event stream -----------------------------------------------------------------------

    async def events(self, after: int | None = None) -> AsyncIterator[Event]:
        """The service's events as they are appended, forever; `after` a seq resumes from the log.

        A broken stream is reopened with backoff and resumed after the last event seen, so
        nothing is missed or repeated.
        """
        last = after
        failures = 0
        while True:
            headers = dict(self._headers)
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                async with self._http.get(
                    f"{self.base_url}{PREFIX}/events",
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout_s),
                ) as response:
                    await raise_for(response)
                    failures += 1  # until it gives an event: one that ends at once is a failure too
                    async for event in parse_sse(response.content):
                        failures = 0
                        last = event.seq
                        yield event
            except (aiohttp.ClientError, TimeoutError, Unavailable) as exc:
                failures += 1
                log.debug("event stream broken (%s); reopening", type(exc).__name__)
            await asyncio.sleep(self._backoff(failures))

    # -- keeping the copy current ----------------------------------------------------------------

    async def _watch(self) -> None:
        failures = 0
        idle = 0
        while True:
            try:
                brought_news = await self._refresh()
                failures = 0
                if brought_news:
                    idle = 0
                else:  # answered at once with nothing new: do not ask again at once
                    idle += 1
                    await asyncio.sleep(self._backoff(idle))
            except asyncio.CancelledError:
                raise
            except (Unauthorized, Forbidden) as exc:
                self._error = exc  # a bad token is not going to fix itself: say so to callers
                self._stale = True
                self._loaded.set()
                failures += 1
                await asyncio.sleep(self._backoff(failures))
            except (SwitchboardClientError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self._stale = True
                failures += 1
                log.debug("cannot refresh from %s (%s); retrying", self.base_url, type(exc).__name__)
                await asyncio.sleep(self._backoff(failures))
            except Exception as exc:  # an answer of another shape: the watch must go on, stale
                self._stale = True
                failures += 1
                log.warning("%s answered what the client cannot read (%r); retrying", self.base_url, exc)
                await asyncio.sleep(self._backoff(failures))

    async def _refresh(self) -> bool:
        """Take the service's current routes (held until they change); False when the answer
        came at once with nothing new, from which asking again at once would make a loop."""
        wait = self.wait_s if self._loaded.is_set() and not self._stale else 0
        query = f"?index={self._index}&wait={wait:g}s" if wait else ""
        timeout = aiohttp.ClientTimeout(total=wait + self.request_timeout_s)
        started = asyncio.get_running_loop().time()
        async with self._http.get(
            f"{self.base_url}{PREFIX}/active{query}", headers=self._headers, timeout=timeout
        ) as response:
            await raise_for(response)
            body = await response.json()
            index = int(response.headers.get(INDEX_HEADER, "0") or 0)
            replica = response.headers.get(REPLICA_HEADER)
        routes = parse_routes(body)
        quick = asyncio.get_running_loop().time() - started < wait / 2
        # Another replica's index means nothing here: start over from the one it gave (docs/reference.md §9).
        # Behind a balancer that alternates replicas every answer would be such a start, at
        # once: a replica switch counts as nothing new, and the next question waits a little.
        switched = wait > 0 and self._replica is not None and replica != self._replica
        news = not switched and not (quick and index == self._index)
        self._routes = routes
        self._replica = replica
        self._error = None
        async with self._changed:
            self._index = index
            self._stale = False
            self._loaded.set()
            self._changed.notify_all()
        return news

    async def _first_copy(self, timeout_s: float | None) -> None:
        if not self._loaded.is_set():
            if self._watcher is None:
                raise Unavailable("the client is not started: use `async with Switchboard(...)`")
            try:
                await asyncio.wait_for(
                    self._loaded.wait(), timeout_s if timeout_s is not None else self.request_timeout_s
                )
            except TimeoutError:
                raise Unavailable(f"no answer from {self.base_url} yet, and no copy to answer from") from None
        if self._error is not None and not self._routes:
            raise self._error

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with full jitter, so many clients do not come back in step."""
        low, high = self.backoff_s
        return random.uniform(0, min(high, low * 2 ** min(failures, 16)))  # noqa: S311 - jitter, not secrecy

    # -- plain requests ------------------------------------------------------------------------------

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise Unavailable("the client is closed")
        return self._session

    async def _request(self, method: str, path: str, json: Any = None) -> Any:
        try:
            async with self._http.request(
                method,
                self.base_url + path,
                headers=self._headers,
                json=json,
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
            ) as response:
                await raise_for(response)
                return await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"cannot reach {self.base_url}: {type(exc).__name__}") from None

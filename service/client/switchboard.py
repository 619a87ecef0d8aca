"""The connection to one service: a copy of every purpose's route kept current by held
queries, the old integration interface answered from it, and the live event stream (followed
by `service.client.stream`).

The client holds one query open on its copy's tag (`GET …/active?wait=15s` with
`If-None-Match: <tag>`): the service answers it the moment the answer differs, so the copy is
current without a polling interval or a cache to clear, and idle it asks once per `wait`.
Tags, not a replica's index: behind a balancer every replica serving one commit gives one
tag, so whichever replica takes the question holds it (docs/reference.md §9, §11). The tag is
opaque here: whatever the service answers is sent back as it is.

A question that is not answered within `wait` and a little more means the service went
silent (a hung process, a dead peer behind a proxy): answers then come from the last copy
with `stale` true, as they do while it cannot be reached; the client reconnects with
exponential backoff and full jitter, and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
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
from service.client.question import MAX_WAIT_S, NEWS_HELD_S, _duration, _usable_tag
from service.client.stream import follow

log = logging.getLogger("service.client")  # the logger applications configured before the split

PREFIX = "/api/v1/llm-config"
INDEX_HEADER = "X-Switchboard-Index"


class Switchboard:
    """A connection to one Switchboard service, its active routes kept current in the background."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        wait_s: float = 15.0,
        grace_s: float = 3.0,
        request_timeout_s: float = 10.0,
        backoff_s: tuple[float, float] = (0.1, 10.0),
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not (wait_s > 0 and grace_s > 0):  # NaN too: it is neither <= 0 nor > MAX_WAIT_S
            raise ValueError("wait_s and grace_s must be positive")
        if wait_s > MAX_WAIT_S:
            raise ValueError(f"wait_s is at most {MAX_WAIT_S:g}: the service holds a question no longer")
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.wait_s = wait_s
        """How long the service holds the client's question (`?wait=`): idle, one request per this."""
        self.grace_s = grace_s
        """How much longer than `wait_s` an answer may take before the service counts as silent."""
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self._session = session
        self._own_session = session is None
        self._routes: dict[str, Route] = {}
        self._tag: str | None = None
        self._body: bytes | None = None
        self._version = 0
        self._index = 0
        self._heard_at: float | None = None
        """When the service last answered (time.monotonic)."""
        self._due: float | None = None
        """When the question in flight must be answered by, if one is."""
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
        self, provider: Provider | None, *, timeout_s: float | None = None
    ) -> Provider | None:
        """The healthy candidate after `provider` in its purpose's route, or None (also for None:
        what `get_active_llm_provider` gives when no candidate is healthy has no next one)."""
        if provider is None:
            return None
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
        if self.stale:
            return replace(
                route,
                primary=tuple(replace(p, stale=True) for p in route.primary),
                fallbacks=tuple(replace(p, stale=True) for p in route.fallbacks),
            )
        return route

    @property
    def stale(self) -> bool:
        """Whether the copy could not be confirmed lately (answers come from the last one): the
        service cannot be reached, or has answered nothing for `wait_s + grace_s` (about 18 s)."""
        if self._stale or self._heard_at is None:
            return True
        now = time.monotonic()
        if self._due is not None and now <= self._due:
            return False  # a question is in flight, and not late yet (held questions take `wait_s`)
        return now - self._heard_at > self.wait_s + self.grace_s

    @property
    def version(self) -> int:
        """How many times the copy has changed since the client started (for `wait_for_change`)."""
        return self._version

    @property
    def index(self) -> int:
        """`X-Switchboard-Index` of the last answer: the index of whichever replica gave it
        (shown for diagnosis; the copy is kept by tags, which mean the same on every replica)."""
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

    async def wait_for_change(self, version: int | None = None, timeout_s: float | None = None) -> int:
        """Wait until the copy has changed since `version` (default: the current `version`); the
        new `version`."""
        start = self._version if version is None else version
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self._version != start), timeout_s)
        return self._version

    # -- the event stream -----------------------------------------------------------------------

    def events(self, after: int | None = None) -> AsyncIterator[Event]:
        """The service's events as they are appended, forever; `after` a seq resumes from the log.

        A broken stream (or one silent for 45 s) is reopened with backoff and resumed after the
        last event seen, so nothing is missed or repeated, as long as the same replica answers
        (`X-Switchboard-Replica`). A seq means something only in one replica's log: when
        another replica answers, the stream starts over there, from now (its seqs may then be
        lower than those seen before), rather than replay that replica's history as new.
        """
        return follow(
            lambda: self._http,
            f"{self.base_url}{PREFIX}/events",
            self._headers,
            after,
            self.request_timeout_s,
            self._backoff,
        )

    # -- keeping the copy current ----------------------------------------------------------------

    async def _watch(self) -> None:
        failures = 0
        quick = 0  # answers in a row that came back at once: a question asked again at once loops
        while True:
            try:
                held = self._holding()
                changed, took = await self._refresh(held)
                failures = 0
                if held and (took >= self.wait_s / 2 or (changed and took >= NEWS_HELD_S)):
                    # it was held: the service is holding as it should (held until a change came,
                    # however soon: changes every few seconds are news, not a loop to slow down)
                    quick = 0
                    continue
                quick += 1
                if changed and quick == 1:
                    continue  # news at once (a change, or the first copy): the next question holds
                # Nothing new at once (a service that does not hold, or one shutting down, or
                # one answering garbage tags): ask again after a pause growing to `wait_s`.
                await asyncio.sleep(self._pause(quick))
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

    def _holding(self) -> bool:
        """Whether the next question is held: only on a tag of a copy just confirmed (catching
        up after a failure asks without `wait`, so it is answered at once)."""
        return self._tag is not None and not self._stale

    async def _refresh(self, held: bool) -> tuple[bool, float]:
        """Ask for the routes (with the copy's tag; held for `wait_s` when `held`): whether the
        copy changed, and how long the answer took."""
        headers = dict(self._headers)
        if self._tag is not None and self._body is not None:
            headers["If-None-Match"] = self._tag
        query = f"?wait={_duration(self.wait_s)}" if held else ""
        # The read timeout is how a silent service is noticed: the answer is due at `wait_s`.
        timeout = aiohttp.ClientTimeout(
            total=self.wait_s + self.grace_s
            if held
            else min(self.request_timeout_s, self.wait_s + self.grace_s)
        )
        started = time.monotonic()
        self._due = started + (timeout.total or 0)
        async with self._http.get(
            f"{self.base_url}{PREFIX}/active{query}", headers=headers, timeout=timeout
        ) as response:
            if response.status == 304:
                if self._body is None:
                    raise ValueError("304 to a question without a tag")
                body, tag = self._body, self._tag
            else:
                await raise_for(response)
                body = await response.read()
                tag = _usable_tag(response.headers.get("ETag"))
            index = response.headers.get(INDEX_HEADER, "")
        changed = body != self._body
        if changed:
            self._routes = parse_routes(json.loads(body))  # refused (garbage): the old copy stays
        self._body, self._tag = body, tag
        self._error = None
        async with self._changed:
            self._index = int(index) if index.isascii() and index.isdigit() and len(index) < 19 else 0
            self._stale = False
            self._heard_at, self._due = time.monotonic(), None
            if changed:
                self._version += 1
            self._loaded.set()
            self._changed.notify_all()
        return changed, time.monotonic() - started

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

    def _pause(self, quick: int) -> float:
        """The pause after `quick` answers in a row that came back at once: growing from the
        backoff's first step to `wait_s`, jittered below it (idle, one question per `wait_s`)."""
        low = self.backoff_s[0]
        step = low * 2.0 ** min(quick - 1, 32)
        if step >= self.wait_s:
            return self.wait_s
        return step * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy

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

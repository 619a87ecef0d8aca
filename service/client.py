"""The Python client: the old integration interface, kept current by change push (SPEC 9, 11).

    from service.client import Switchboard

    async with Switchboard("http://127.0.0.1:8080", token="sb_…") as sb:
        chat = await sb.get_active_llm_provider("chat")     # first healthy candidate, masked key
        backup = await sb.get_fallback_provider(chat)       # the next candidate, or None
        params = await sb.litellm_params("chat")            # decrypted key (secrets:read)
        result = await sb.test_provider(chat.id)            # admin
        async for event in sb.events(): ...                 # the live event stream

The client keeps a copy of every purpose's route and holds one blocking query open
(`GET …/active?index=N&wait=…`): the service answers it the moment a configuration or
health change is applied, so the copy is current without a polling interval or a cache to
clear. While the service cannot be reached, answers come from the last copy with `stale`
true; the client reconnects with exponential backoff and full jitter, and catches up.

This module imports nothing of the server: only aiohttp's client, the standard library,
and `service.formats` / `service.vendors` (which it ships with). It is packaged alone as the
`switchboard-client` distribution (`client/`), so an application needs neither litellm nor
the rest of the server's dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import aiohttp

from service import formats

__all__ = [
    "Event",
    "Forbidden",
    "Health",
    "NotFound",
    "Provider",
    "Route",
    "Switchboard",
    "SwitchboardClientError",
    "TestResult",
    "Unauthorized",
    "Unavailable",
]

log = logging.getLogger(__name__)

PREFIX = "/api/v1/llm-config"
INDEX_HEADER = "X-Switchboard-Index"
REPLICA_HEADER = "X-Switchboard-Replica"
HEALTHY = ("healthy", "unknown")
"""Statuses a candidate may have to be offered: `unknown` is a provider not yet checked."""
MAX_EVENT_BYTES = 64 << 20
"""The longest line of the event stream read: an event of a provider with a long models list
is over aiohttp's own line limit (128 or 512 KiB, by version)."""


# -- errors -------------------------------------------------------------------------------------


class SwitchboardClientError(Exception):
    """Base of what the client raises; `status` is the HTTP status when there was one."""

    status: int | None = None

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class Unauthorized(SwitchboardClientError):
    """401: no token, or a token the service does not know."""

    status = 401


class Forbidden(SwitchboardClientError):
    """403: the token lacks the scope this call needs."""

    status = 403


class NotFound(SwitchboardClientError):
    """404: no such purpose or provider."""

    status = 404


class Unavailable(SwitchboardClientError):
    """The service cannot be reached, is not ready, or has no copy to answer from yet."""


# -- what the client returns ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    """A provider's last known health, as the service reported it."""

    status: str = "unknown"
    checked_at: str | None = None
    latency_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Provider:
    """One provider as the service describes it: masked key, health, and where it sits in a route.

    `stale` is true when the copy it comes from could not be refreshed (the service is away).
    """

    id: str
    kind: str
    base_url: str
    name: str | None = None
    provider: str | None = None
    server_type: str | None = None
    models: tuple[str, ...] = ()
    model_map: Mapping[str, str] = field(default_factory=dict)
    purposes: tuple[str, ...] = ()
    enabled: bool = True
    api_key: str | None = None
    """The key's mask (`****5d80`), or None when the provider has no key; never the key."""
    file: str | None = None
    commit: str | None = None
    health: Health = Health()
    purpose: str | None = None
    role: str | None = None
    """`primary` or `fallback` in the route it was taken from."""
    stale: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], **extra: Any) -> Provider:
        health = data.get("health") or {}
        return cls(
            id=str(data["id"]),
            kind=str(data.get("kind", "")),
            base_url=str(data.get("base_url", "")),
            name=data.get("name"),
            provider=data.get("provider"),
            server_type=data.get("server_type"),
            models=tuple(data.get("models") or ()),
            model_map=dict(data.get("model_map") or {}),
            purposes=tuple(data.get("purposes") or ()),
            enabled=bool(data.get("enabled", True)),
            api_key=data.get("api_key"),
            file=data.get("file"),
            commit=data.get("commit"),
            health=Health(
                health.get("status", "unknown"), health.get("checked_at"), health.get("latency_ms")
            ),
            raw=dict(data),
            **extra,
        )

    @property
    def healthy(self) -> bool:
        """Whether it may be offered: enabled, and `healthy` or not checked yet (`unknown`)."""
        return self.enabled and self.health.status in HEALTHY

    def to_litellm_config(self, model: str | None = None) -> dict[str, Any]:
        """LiteLLM `litellm_params` for `model` (None: any), as `switchboard export litellm` writes
        them: the key as an `os.environ/SWITCHBOARD_KEY_<ID>` reference (`litellm_params()` has it)."""
        return formats.litellm_params(self.raw, model)

    def to_wilmer_config(self) -> dict[str, Any] | None:
        """A WilmerAI endpoint, as `switchboard export wilmer` writes it (None: WilmerAI cannot use it)."""
        return formats.wilmer_endpoint(self.raw)


@dataclass(frozen=True, slots=True)
class Route:
    """Who serves one purpose: primaries in their listed order, then fallbacks."""

    purpose: str
    primary: tuple[Provider, ...]
    fallbacks: tuple[Provider, ...]
    weights: Mapping[str, float] = field(default_factory=dict)
    commit: str | None = None
    generation: int | None = None

    @property
    def candidates(self) -> tuple[Provider, ...]:
        return self.primary + self.fallbacks


@dataclass(frozen=True, slots=True)
class TestResult:
    """The answer of a health check run now."""

    __test__ = False  # not a pytest test class

    ok: bool
    latency_ms: float | None
    message: str


@dataclass(frozen=True, slots=True)
class Event:
    """One event of the service's log, as the stream delivered it."""

    seq: int
    type: str
    data: Mapping[str, Any]

    @property
    def subject(self) -> str | None:
        subject = self.data.get("subject")
        return subject if isinstance(subject, str) else None


# -- the client -----------------------------------------------------------------------------------


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

    async def litellm_params(self, purpose: str) -> dict[str, Any]:
        """The first healthy candidate as `litellm_params`, key decrypted (needs `secrets:read`;
        every such read is an audit event on the service)."""
        answer = await self._request("GET", f"{PREFIX}/active/{purpose}/litellm")
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
                    await _raise_for(response)
                    failures += 1  # until it gives an event: one that ends at once is a failure too
                    async for event in _parse_sse(response.content):
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
            await _raise_for(response)
            body = await response.json()
            index = int(response.headers.get(INDEX_HEADER, "0") or 0)
            replica = response.headers.get(REPLICA_HEADER)
        routes = _routes(body)
        quick = asyncio.get_running_loop().time() - started < wait / 2
        # Another replica's index means nothing here: start over from the one it gave (SPEC 9).
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
                await _raise_for(response)
                return await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"cannot reach {self.base_url}: {type(exc).__name__}") from None


# -- helpers --------------------------------------------------------------------------------------


_BY_STATUS: dict[int, type[SwitchboardClientError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound}


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    try:
        message = (await response.json())["error"]["message"]
    except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
        message = response.reason or f"HTTP {response.status}"
    kind = _BY_STATUS.get(response.status, Unavailable if response.status >= 500 else SwitchboardClientError)
    raise kind(str(message), response.status)


def _routes(body: Mapping[str, Any]) -> dict[str, Route]:
    routes = {}
    for purpose, route in (body.get("purposes") or {}).items():
        primary = tuple(
            Provider.from_json(p, purpose=purpose, role="primary") for p in route.get("primary", [])
        )
        fallbacks = tuple(
            Provider.from_json(p, purpose=purpose, role="fallback") for p in route.get("fallbacks", [])
        )
        routes[purpose] = Route(
            purpose,
            primary,
            fallbacks,
            dict(route.get("weights") or {}),
            route.get("commit"),
            route.get("generation"),
        )
    return routes


async def _lines(stream: aiohttp.StreamReader, limit: int = MAX_EVENT_BYTES) -> AsyncIterator[bytes]:
    """The lines of `stream`, each up to `limit` bytes (aiohttp's own `readline` stops at 128 KiB)."""
    buffer = bytearray()
    async for chunk in stream.iter_any():
        searched = len(buffer)
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", max(start, searched))) >= 0:
            yield bytes(buffer[start : end + 1])
            start = end + 1
        del buffer[:start]
        if len(buffer) > limit:
            raise aiohttp.ClientPayloadError(f"an event stream line is over {limit} bytes")
    if buffer:
        yield bytes(buffer)


async def _parse_sse(stream: aiohttp.StreamReader) -> AsyncIterator[Event]:
    """Server-sent events (`id:`, `event:`, `data:` lines, a blank line ends one; `:` comments)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    async for raw in _lines(stream):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                try:
                    payload = json.loads("\n".join(data))
                    seq = int(fields.get("id", payload.get("seq", 0)))
                except (ValueError, AttributeError):
                    payload, seq = None, 0
                if isinstance(payload, dict):
                    yield Event(seq, fields.get("event", str(payload.get("type", "message"))), payload)
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue  # a keep-alive comment
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value

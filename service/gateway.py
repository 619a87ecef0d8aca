"""The gateway (SPEC 6 and 7): OpenAI-compatible endpoints relayed to the active providers.

    POST /v1/chat/completions, /v1/embeddings, /v1/rerank; GET /v1/models     completions
    GET  /api/v1/llm-config/active/{purpose}/litellm                          secrets:read
    POST /api/v1/llm-config/providers/{id}/test                               admin
    GET  /api/v1/llm-config/servers/{id}/models                               config:read

A request is parsed once (for `model` and `stream`), its candidates are ordered by
`routing`, and each is tried in turn: `upstream.forward` for providers that speak OpenAI's
protocol, `translate.forward` (litellm, imported on first use) for the others. The hot path
reads `registry.snapshot` once and does no file I/O; events (health transitions) are
written by a background task, never by a request.

The cleanup context opens the pooled client session, runs the active health checks and
the event writer, and closes them on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from service import health as health_checks
from service import upstream
from service.auth import Handler, client_name, scoped
from service.context import EVENTS, HEALTH, METRICS, REGISTRY, SETTINGS
from service.errors import BadRequest, HTTPError, NoCandidate, NotFound, PayloadTooLarge, UpstreamsFailed
from service.events import BaseEvent, ProviderHealthChanged, SecretRead
from service.health import Health, Status
from service.metrics import Metrics
from service.models import PURPOSES, AiServer, Provider
from service.routing import Router, first_healthy
from service.secret import Secret
from service.upstream import ATTEMPTS_HEADER, PROVIDER_HEADER, Call, Failure, Target
from service.vendors import VENDORS

log = logging.getLogger(__name__)

PREFIX = "/api/v1/llm-config"
_NONE = "none"


class Gateway:
    """What the gateway's handlers share: the session, the router, and cached metric children."""

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        self.router = Router()
        self._session: aiohttp.ClientSession | None = None
        self.events: asyncio.Queue[BaseEvent] = asyncio.Queue()
        self._children: dict[tuple[str, ...], Any] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled client session, open while the app runs."""
        if self._session is None:
            raise RuntimeError("the gateway's client session opens with the app")
        return self._session

    def count(self, *labels: str, amount: float = 1) -> None:
        """Increase a cached counter child: ("attempt", provider, outcome), ("fallback", purpose)…"""
        child = self._children.get(labels)
        if child is None:
            kind, *values = labels
            metric = {"attempt": self.metrics.upstream_requests, "fallback": self.metrics.fallbacks}.get(
                kind, self.metrics.tokens
            )
            child = self._children[labels] = metric.labels(*values)
        child.inc(amount)

    def observe(self, provider_id: str, seconds: float) -> None:
        """Record an upstream's time to its first byte."""
        child = self._children.get(("latency", provider_id))
        if child is None:
            child = self._children[("latency", provider_id)] = self.metrics.upstream_seconds.labels(
                provider_id
            )
        child.observe(seconds)

    def tokens(self, target: Target, model: str | None, client: str, usage: dict[str, Any]) -> None:
        """Count the prompt and completion tokens an upstream reported."""
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if prompt is None and completion is None:
            prompt = usage.get("total_tokens")
        label = target.model_label(model)
        for kind, value in (("prompt", prompt), ("completion", completion)):
            if isinstance(value, int) and value > 0:
                self.count("tokens", target.id, label, client, kind, amount=value)


GATEWAY = web.AppKey("gateway", Gateway)


def setup(app: web.Application) -> None:
    """Add the gateway's routes and its cleanup context to the app."""
    app[GATEWAY] = Gateway(app[METRICS], app[HEALTH])
    add = app.router
    add.add_post(
        "/v1/chat/completions", _answering(scoped("completions")(_relay("chat", "/chat/completions")))
    )
    add.add_post("/v1/embeddings", _answering(scoped("completions")(_relay("embeddings", "/embeddings"))))
    add.add_post("/v1/rerank", _answering(scoped("completions")(_relay("reranking", "/rerank"))))
    add.add_get("/v1/models", _answering(scoped("completions")(_models)))
    add.add_get(f"{PREFIX}/active/{{purpose}}/litellm", scoped("secrets:read")(_litellm))
    add.add_post(f"{PREFIX}/providers/{{id}}/test", scoped("admin")(_test))
    add.add_get(f"{PREFIX}/servers/{{id}}/models", scoped("config:read")(_server_models))
    app.cleanup_ctx.append(_lifecycle)


# -- /v1/* ---------------------------------------------------------------------------------


def _answering(handler: Handler) -> Handler:
    """Errors as SPEC's JSON, carrying the gateway's headers like every other answer."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except HTTPError as exc:
            return _error(exc, _NONE, 0)
        except web.HTTPRequestEntityTooLarge:
            return _error(PayloadTooLarge.over(request.app[SETTINGS].max_body_bytes), _NONE, 0)

    return answer


def _error(exc: HTTPError, provider: str, attempts: int) -> web.Response:
    headers = {PROVIDER_HEADER: provider, ATTEMPTS_HEADER: str(attempts)}
    return web.json_response(exc.body(), status=exc.status, headers=headers)


def _relay(purpose: str, path: str) -> Handler:
    async def relay(request: web.Request) -> web.StreamResponse:
        app = request.app
        length = request.content_length
        if length is not None and length > app[SETTINGS].max_body_bytes:
            raise PayloadTooLarge.over(app[SETTINGS].max_body_bytes)
        body = await request.read()
        try:
            data = json.loads(body)
        except ValueError:
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        if not isinstance(data.get("model", ""), str):
            raise BadRequest("`model` must be a string")
        call = Call(request, purpose, path, body, data)
        gateway = app[GATEWAY]
        plan = gateway.router.plan(app[REGISTRY].snapshot)
        candidates = gateway.router.candidates(plan, purpose, call.model, gateway.health)
        return await _attempt(gateway, call, candidates)

    return relay


async def _attempt(gateway: Gateway, call: Call, candidates: list[Target]) -> web.StreamResponse:
    """Try each candidate in turn until one answers; 502 with every attempt when none does."""
    health, session = gateway.health, gateway.session
    attempts: list[dict[str, Any]] = []
    for target in candidates:
        if not health.admit(target.id):
            continue  # half-open, and its one trial request is out
        headers = {PROVIDER_HEADER: target.id, ATTEMPTS_HEADER: str(len(attempts) + 1)}
        try:
            if target.direct:
                response = await upstream.forward(session, call, target, headers)
            else:
                from service import translate  # litellm: only for the vendors that need it

                response = await translate.forward(call, target, headers)
        except Failure as failure:
            health.failed(target.id, failure.reason)
            gateway.count("attempt", target.id, "failed")
            attempts.append({"provider": target.id, "status": failure.status, "reason": failure.reason})
            continue
        except BaseException:
            health.abandon(target.id)
            raise
        _succeeded(gateway, call, target, response, attempts)
        return response
    if not attempts:
        what = f"model {call.model!r}" if call.model else "this request"
        raise NoCandidate(f"no provider of `{call.purpose}` can take {what} now")
    error = UpstreamsFailed(f"every candidate failed ({len(attempts)} attempted)", attempts=attempts)
    return _error(error, _NONE, len(attempts))


def _succeeded(
    gateway: Gateway, call: Call, target: Target, response: web.StreamResponse, attempts: list[Any]
) -> None:
    if call.broken is not None:
        gateway.health.failed(target.id, call.broken)
        gateway.count("attempt", target.id, "broken")
    else:
        gateway.health.succeeded(target.id, call.first_byte_s)
        gateway.count("attempt", target.id, "ok" if response.status < 400 else "client_error")
    gateway.observe(target.id, call.first_byte_s)
    if attempts:
        gateway.count("fallback", call.purpose)
    if call.usage is not None:
        gateway.tokens(target, call.model, client_name(call.request), call.usage)


async def _models(request: web.Request) -> web.Response:
    plan = request.app[GATEWAY].router.plan(request.app[REGISTRY].snapshot)
    headers = {PROVIDER_HEADER: _NONE, ATTEMPTS_HEADER: "0", "Content-Type": "application/json"}
    return web.Response(body=plan.models_answer, headers=headers)


# -- /api/v1/llm-config/* ------------------------------------------------------------------


async def _litellm(request: web.Request) -> web.Response:
    """The first healthy candidate of a purpose as LiteLLM parameters, key included; audited."""
    purpose = request.match_info["purpose"]
    app = request.app
    snapshot = app[REGISTRY].snapshot
    plan = app[GATEWAY].router.plan(snapshot)
    if purpose not in PURPOSES or purpose not in plan.routes:
        raise NotFound(f"no routing for purpose {purpose!r}")
    target = first_healthy(plan, purpose, app[HEALTH])
    if target is None:
        raise NoCandidate(f"no provider of `{purpose}` is healthy now")
    client = client_name(request)
    await asyncio.to_thread(app[EVENTS].append, SecretRead(subject=target.id, client=client, purpose=purpose))
    answer = {
        "purpose": purpose,
        "provider": target.id,
        "generation": snapshot.generation,
        "litellm_params": litellm_params(target.provider),
        "models": list(target.provider.models),
    }
    return web.json_response(answer)


def litellm_params(provider: Provider) -> dict[str, Any]:
    """LiteLLM's `litellm_params` for a provider, with its decrypted key."""
    vendor = getattr(provider, "provider", None)
    prefix = VENDORS[vendor].litellm_prefix if vendor in VENDORS else "openai"
    model = provider.upstream_model(provider.models[0]) if provider.models else "*"
    key = provider.api_key.reveal() if isinstance(provider.api_key, Secret) else None
    return {
        "model": f"{prefix}/{model}",
        "api_base": provider.endpoint,
        "api_key": key,
        "timeout": provider.timeout_s,
    }


async def _test(request: web.Request) -> web.Response:
    provider_id = request.match_info["id"]
    provider = request.app[REGISTRY].snapshot.providers.get(provider_id)
    if provider is None:
        raise NotFound(f"no provider {provider_id!r}")
    gateway = request.app[GATEWAY]
    result = await health_checks.check(provider, gateway.session)
    gateway.health.checked(provider_id, result)
    return web.json_response(result.as_json())


async def _server_models(request: web.Request) -> web.Response:
    server_id = request.match_info["id"]
    server = request.app[REGISTRY].snapshot.providers.get(server_id)
    if not isinstance(server, AiServer):
        raise NotFound(f"no server {server_id!r}")
    listed = await upstream.list_models(server, request.app[GATEWAY].session)
    if listed.models is None:
        attempt = {"provider": server_id, "status": listed.status, "reason": listed.reason}
        raise UpstreamsFailed(f"server {server_id!r} did not list its models", attempts=[attempt])
    return web.json_response({"id": server_id, "models": listed.models})


# -- lifecycle -----------------------------------------------------------------------------


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    settings = app[SETTINGS]
    gateway._session = session = upstream.open_session()
    gateway.health.on_change = _on_health_change(gateway)
    tasks = [asyncio.create_task(_write_events(app, gateway.events), name="switchboard-health-events")]
    if settings.health_interval_s > 0:
        periodic = _check_periodically(app, settings.health_interval_s)
        tasks.append(asyncio.create_task(periodic, name="switchboard-health-checks"))
    try:
        yield
    finally:
        gateway.health.on_change = None
        writer, *checks = tasks
        for task in checks:
            await _stop(task)
        with contextlib.suppress(TimeoutError):  # let the writer record what is queued
            await asyncio.wait_for(gateway.events.join(), timeout=5)
        await _stop(writer)
        gateway._session = None
        await session.close()


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _on_health_change(gateway: Gateway) -> Callable[[str, Status, Status, str | None], None]:
    gauge = gateway.metrics.provider_healthy
    values = {"healthy": 1, "unhealthy": 0, "unknown": -1}

    def changed(provider_id: str, old: Status, new: Status, reason: str | None) -> None:
        gauge.labels(provider_id).set(values[new])
        if old != "unknown" or new != "healthy":  # learning a provider works is no transition
            changes: Any = {"status": {"old": old, "new": new}}
            gateway.events.put_nowait(
                ProviderHealthChanged(subject=provider_id, changes=changes, reason=reason)
            )

    return changed


async def _write_events(app: web.Application, queue: asyncio.Queue[BaseEvent]) -> None:
    """Append queued events in order, off the request path (each append is fsynced)."""
    while True:
        draft = await queue.get()
        try:
            await asyncio.to_thread(app[EVENTS].append, draft)
        except Exception:
            log.exception("cannot record %s", draft.type)
        finally:
            queue.task_done()


async def _check_periodically(app: web.Application, interval_s: float) -> None:
    """Check every enabled provider's models endpoint, every `interval_s`."""
    registry, gateway = app[REGISTRY], app[GATEWAY]
    while True:
        if registry.ready:
            providers = [p for p in registry.snapshot.providers.values() if p.enabled]
            results = await asyncio.gather(
                *(health_checks.check(p, gateway.session) for p in providers), return_exceptions=True
            )
            for provider, result in zip(providers, results, strict=True):
                if isinstance(result, health_checks.CheckResult):
                    gateway.health.checked(provider.id, result)
                elif isinstance(result, Exception):
                    log.warning("health check of %s failed: %s", provider.id, type(result).__name__)
        await asyncio.sleep(interval_s if registry.ready else 0.05)

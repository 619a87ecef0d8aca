"""The gateway's core: try each candidate provider in turn until one answers (docs/reference.md §7).

`Relay` holds what every request shares: the router, the health of each provider, the
transports (OpenAI's protocol directly, TEI's own for reranking on TEI, litellm for the
other vendors), and cached metric children. `relay(call, snapshot)` orders the candidates,
sends through each one's transport, records the outcome (circuit, counters, tokens) and
answers with the first that worked, or a 502 listing every attempt. It reads one snapshot
and touches no file.

Every client protocol goes through this one loop (docs/reference.md §14): before each attempt `Forms`
sets what the provider is sent (the request as it is where the provider speaks its protocol,
else translated to chat), and after it a whole answer is translated back here; a stream is
translated by its transport as it is relayed.
"""

from __future__ import annotations

import secrets
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import aiohttp
from aiohttp import web

from service.config.models import Provider
from service.config.snapshot import Snapshot
from service.config.upstreams import AllowedUpstreams
from service.errors import HTTPError, InvalidRequest, ModelNotFound, NoCandidate, UpstreamsFailed
from service.gateway.call import (
    ATTEMPTS_HEADER,
    MAX_ANSWER_MODELS,
    MAX_MODEL_LABEL,
    PROVIDER_HEADER,
    Call,
    Failure,
    NotSpoken,
    NotTranslated,
    encodable,
    model_label,
)
from service.gateway.forms import Forms
from service.gateway.health import Health
from service.gateway.metering import Meter
from service.gateway.protocols import ids
from service.gateway.protocols.translation import Untranslatable
from service.gateway.routing import Router, RoutingTable, skipped_now
from service.gateway.transports.base import Transport
from service.gateway.transports.litellm import LiteLLMTransport
from service.gateway.transports.openai import OpenAITransport
from service.gateway.transports.tei import TEITransport
from service.metrics import Metrics
from service.usage.tokens import MAX_TOKENS

if TYPE_CHECKING:  # imported only when tracing is on: OpenTelemetry stays out of the process otherwise
    from service.gateway.tracing.spans import RequestTrace, Tracing

NO_PROVIDER = "none"
"""`x-switchboard-provider` on an answer that no provider gave."""
NOSNIFF_HEADER = "X-Content-Type-Options"
"""`nosniff` on every answer (docs/reference.md §6): a relayed one has it from the start, before its
transport prepares it (a stream), so the server need not add it as it sends (`on_response_prepare`)."""
SHOWN_MODEL_CHARS = 200
"""An error quotes at most this much of a requested model's name."""


def shown(model: str) -> str:
    """A requested model's name as an error quotes it: repr'd, and cut when long."""
    return repr(model if len(model) <= SHOWN_MODEL_CHARS else model[:SHOWN_MODEL_CHARS] + "…")


class Relay:
    """What the gateway's requests share: router, health, transports and metric children."""

    def __init__(
        self,
        metrics: Metrics,
        health: Health,
        session: aiohttp.ClientSession,
        *,
        max_upstream_bytes: int = 64 << 20,
        ids_key: bytes | None = None,
        tracing: Tracing | None = None,
        allowed: AllowedUpstreams | None = None,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.router = Router()
        self.session = session
        self.via = secrets.token_hex(8)
        """This gateway's token in `x-switchboard-via`: a request carrying it came back here."""
        self.openai = OpenAITransport(session, max_upstream_bytes, self.via, allowed)
        """Its requests hold `allowed` themselves (`session`'s own checks are per request)."""
        self.litellm = LiteLLMTransport(session, max_upstream_bytes)
        self.tei = TEITransport(self.openai)
        self.forms = Forms(ids_key or secrets.token_bytes(32))
        """Who speaks which protocol, and the keys of response ids (`ids_key`: for providers
        without an API key; a random one keeps their ids on this replica)."""
        self.meter: Meter | None = None
        """Limits, costs and records (docs/reference.md §13); None: requests are not metered."""
        self._answer_models: dict[str, set[str]] = {}
        """Provider id -> the models its answers named, as labels (at most `MAX_ANSWER_MODELS`)."""
        self.tracing = tracing
        """OpenTelemetry's spans and metrics (docs/reference.md §14); None when off, and nothing is traced."""

    def transport(self, provider: Provider, purpose: str, protocol: str = "chat") -> Transport:
        """How requests reach `provider`: directly when it speaks OpenAI's protocol (but TEI's
        own `/rerank` for reranking on a `tei` server), else through litellm; a request in
        another protocol that the provider speaks natively, directly in that protocol."""
        if protocol != "chat":
            return self.openai
        if not provider.speaks_openai:
            return self.litellm
        if purpose == "reranking" and provider.label == "tei":
            return self.tei
        return self.openai

    def relay(self, call: Call, snapshot: Snapshot) -> Coroutine[Any, Any, web.StreamResponse]:
        """Try each candidate in turn; raises ModelNotFound when no provider of the route serves the
        model (over the call's protocol: also a token count that every provider tried answered
        404 at its path), NoCandidate when those that do are all skipped now, UpstreamsFailed
        when every one tried failed.

        With a meter, the call is admitted against its client's limits first (a refusal is
        raised), each candidate must fit its budget, and the end is settled and recorded. With
        tracing on, the request is a span and each attempt a child span of it.

        Without tracing it is `_relay`'s coroutine itself: no coroutine around it, which every
        wait of the request would go through."""
        if self.tracing is None:
            return self._relay(call, snapshot, None)
        return self._traced(call, snapshot, self.tracing)

    async def _traced(self, call: Call, snapshot: Snapshot, tracing: Tracing) -> web.StreamResponse:
        with tracing.request(call) as trace:
            return await self._relay(call, snapshot, trace)

    async def _relay(self, call: Call, snapshot: Snapshot, trace: RequestTrace | None) -> web.StreamResponse:
        table = self.router.table(snapshot)
        health = self.health
        attempts: list[dict[str, Any]] = []
        waits: list[int] = []
        """What each attempt's upstream asked to wait (ms), of those that said."""
        unspoken = 0
        """Attempts that found the provider does not speak the protocol after all (a 404 at its path)."""
        untranslated = 0
        """Attempts litellm could not translate the request for (a field of the wrong kind)."""
        pinned: ids.ResponseId | None = None
        candidates: Sequence[Provider]
        if call.pinned is not None:
            candidates, pinned = self._pinned(call, snapshot)
        else:
            candidates = self._candidates(table, call)
        metered = None
        if self.meter is not None and call.metered:
            metered = await self.meter.start(call, snapshot, candidates)
            candidates = metered.candidates
        try:
            for provider in candidates:
                pid = provider.id
                if not health.admit(pid):
                    continue  # half-open, and its one trial request is out
                if metered is not None and not await metered.take(provider):
                    health.abandon(pid)
                    continue  # its budget cannot cover the request
                headers = {
                    PROVIDER_HEADER: pid,
                    ATTEMPTS_HEADER: str(len(attempts) + 1),
                    NOSNIFF_HEADER: "nosniff",
                }
                if metered is not None:
                    headers.update(metered.headers)
                    metered.sending(provider)
                if trace is not None:
                    trace.attempt(provider)
                try:
                    if call.protocol != "chat":  # a chat request goes as it is: nothing to prepare
                        self.forms.prepare(call, provider, pinned)
                    transport = self.transport(provider, call.purpose, call.upstream_protocol)
                    response = await transport.send(call, provider, headers)
                    if call.translation is not None:
                        response = _translated(call, response)
                except Failure as failure:
                    outcome = "failed"
                    if isinstance(failure, NotSpoken):
                        self.forms.remember(provider, failure.protocol)
                        unspoken += 1
                    elif isinstance(failure, NotTranslated):  # the client's error: nothing was sent
                        untranslated += 1
                        outcome = "client_error"
                    if failure.refused:
                        health.refuse(pid, failure.reason)
                    elif failure.blames_provider:
                        health.failed(pid, failure.reason)
                    else:
                        health.abandon(pid)  # no outcome: a half-open circuit's trial is free again
                    self.metrics.upstream_requests.labels(pid, outcome).inc()
                    attempts.append({"provider": pid, "status": failure.status, "reason": failure.reason})
                    if failure.wait_ms is not None:
                        waits.append(failure.wait_ms)
                    if metered is not None:
                        await metered.give_back(provider)
                    if trace is not None:
                        trace.failed(failure)
                    continue
                except BaseException:
                    health.abandon(pid)
                    raise
                if trace is not None:
                    trace.succeeded(response)
                label = self._succeeded(call, provider, response, attempts)
                if metered is not None:
                    await metered.served(provider, response, len(attempts) + 1, label)
                return response
            if not attempts:
                if pinned is not None:
                    raise NoCandidate(
                        f"{pinned.provider}, which gave previous_response_id, cannot take it now"
                    )
                raise self._none_now(table, call, metered.skipped if metered is not None else [])
            if unspoken == len(attempts) and call.protocol == "count_tokens":
                # None counts tokens after all: the handler answers with its estimate
                # (docs/reference.md §14), as when no provider speaks Messages at all.
                what = f"model {shown(call.model)}" if call.model else "this request"
                raise ModelNotFound(
                    f"no enabled provider serves {what} over Messages", over_protocol=True, attempts=attempts
                )
            if unspoken == len(attempts) and call.protocol == "completions":
                self._unspoken(table, call, attempts)
            if untranslated == len(attempts):  # the request's own fault, whoever took it: 400
                raise InvalidRequest(
                    "the request could not be translated for its provider: check its fields' types "
                    "and shapes",
                    attempts=attempts,
                )
            # each asked to be left alone for a time: the shortest, when the first is free again
            wait = min(waits) if len(waits) == len(attempts) else None
            raise UpstreamsFailed(
                f"every candidate failed ({len(attempts)} attempted)", attempts=attempts, retry_after_ms=wait
            )
        except HTTPError as error:
            if metered is not None:
                await metered.failed(error, len(attempts))
            raise
        finally:
            if metered is not None and not metered.done:  # cancelled (the client left), or a bug
                metered.abandoned(len(attempts) + (metered.sent is not None))

    def _none_now(self, table: RoutingTable, call: Call, skipped: list[dict[str, str]]) -> NoCandidate:
        """The 503 when the call's candidates were all skipped now: each one with why (its open
        circuit and its health's reason, its budget), in `skipped` and in the message."""
        skipped = [*skipped_now(table, call.purpose, call.model, self.health), *skipped]
        why = "; ".join(f"{s['provider']}: {s.get('health') or s['reason']}" for s in skipped)
        what = f"model {shown(call.model)}" if call.model else "this request"
        message = f"no provider of `{call.purpose}` can take {what} now" + (f" ({why})" if why else "")
        return NoCandidate(message, skipped=skipped) if skipped else NoCandidate(message)

    def _candidates(self, table: RoutingTable, call: Call) -> Sequence[Provider]:
        """The call's candidates; 404 `model_not_found` when no enabled provider of the route
        serves the model (over the call's protocol), however long one waits; an empty list when
        some do but each is skipped now (then 503)."""
        found = self.router.candidates(table, call.purpose, call.model, self.health)
        if call.protocol != "chat":
            found = [p for p in found if self.forms.serves(p, call)]
        if found:
            return found
        what = f"model {shown(call.model)}" if call.model else "this request"
        if not table.serves(call.purpose, call.model):
            raise ModelNotFound(f"no enabled provider of `{call.purpose}` serves {what}")
        if call.protocol == "chat":
            return found
        route = table.routes.get(call.purpose)
        serving = [p for p in (route.ordered if route else ()) if p.enabled and p.serves(call.model)]
        if not any(self.forms.serves(p, call) for p in serving):
            name = "Messages" if call.protocol == "count_tokens" else call.protocol
            raise ModelNotFound(f"no enabled provider serves {what} over {name}", over_protocol=True)
        return found

    def _unspoken(self, table: RoutingTable, call: Call, attempts: list[dict[str, Any]]) -> NoReturn:
        """Raise what a legacy completion is answered when every provider tried turned out not to
        speak them (a 404 at the path, now remembered): they have no translation, so the answer is
        the one had they not been candidates (docs/reference.md §14), listing the attempts: 404
        `model_not_found` when no provider of the route speaks them, else 503 (those that do are
        skipped now)."""
        try:
            self._candidates(table, call)
        except ModelNotFound as exc:
            raise ModelNotFound(exc.message, over_protocol=True, attempts=attempts) from None
        what = f"model {shown(call.model)}" if call.model else "this request"
        raise NoCandidate(f"no provider of `{call.purpose}` can take {what} now", attempts=attempts)

    def _pinned(self, call: Call, snapshot: Snapshot) -> tuple[list[Provider], ids.ResponseId]:
        """The one provider that may continue `previous_response_id` (docs/reference.md §14), or why none."""
        wrapped = call.pinned or ""
        pid = ids.provider_of(wrapped)
        provider = snapshot.providers.get(pid) if pid is not None else None
        if pid is not None and provider is None:  # its MAC cannot be checked: its provider's key is gone
            raise InvalidRequest(
                f"previous_response_id names provider {shown(pid)}, which is not configured now: "
                "Switchboard keeps no conversation, so send the whole input again",
                param="previous_response_id",
            )
        found = ids.unwrap(self.forms.key(provider), call.client, wrapped) if provider is not None else None
        if provider is None or found is None:
            raise InvalidRequest(
                "previous_response_id is not the id of a response Switchboard gave this client",
                param="previous_response_id",
            )
        if not found.native or not self.forms.speaks(provider, "responses"):
            raise InvalidRequest(
                f"previous_response_id names a response of {provider.id!r}, which does not speak "
                "Responses natively: Switchboard keeps no conversation, so send the whole input again",
                param="previous_response_id",
            )
        if not provider.enabled or self.health.is_open(provider.id):
            state = "disabled" if not provider.enabled else "its circuit is open"
            raise NoCandidate(
                f"{provider.id!r}, which gave previous_response_id, cannot be tried now ({state})"
            )
        return [provider], found

    def _succeeded(
        self, call: Call, provider: Provider, response: web.StreamResponse, attempts: list[Any]
    ) -> str | None:
        """Count an answer in the provider's health and the metrics; the model label of its
        tokens, when it has any (None: not made)."""
        pid = provider.id
        if call.broken is not None:
            self.health.failed(pid, call.broken)
            outcome = "broken"
        else:
            self.health.succeeded(pid, call.first_byte_s)
            outcome = "ok" if response.status < 400 else "client_error"
        count, timing = self.metrics.answered_upstream(pid, outcome)
        count.inc()
        timing.observe(call.first_byte_s)
        if attempts:
            self.metrics.fallbacks.labels(call.purpose).inc()
        if call.usage is None:
            return None
        label = self.model_label(provider, call)
        self.tokens(provider, label, call.client, call.usage)
        return label

    # -- metrics -------------------------------------------------------------------------------

    def model_label(self, provider: Provider, call: Call) -> str:
        """The model label of a call's tokens, bounded so that no client can grow the metrics.

        A provider that declares its models: the requested model when it is one of them. One
        that declares none (any model): the model its answer names, up to `MAX_ANSWER_MODELS`
        distinct ones per provider. Anything else is `other`.
        """
        if provider.models:
            return model_label(provider, call.model)
        name = call.answer_model
        if name is None or len(name) > MAX_MODEL_LABEL:
            return "other"
        seen = self._answer_models.get(provider.id)
        if seen is None:
            seen = self._answer_models[provider.id] = set()
        if name not in seen:
            if len(seen) >= MAX_ANSWER_MODELS or not encodable(name):
                return "other"
            seen.add(name)
        return name

    def tokens(self, provider: Provider, label: str, client: str, usage: dict[str, Any]) -> None:
        """Count the prompt and completion tokens an upstream reported, under a model `label`
        (a count past `MAX_TOKENS`, which no float could add, is counted as `MAX_TOKENS`)."""
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if prompt is None and completion is None:
            prompt = usage.get("total_tokens")
        series = self.metrics.tokens
        if type(prompt) is int and prompt > 0:
            series.labels(provider.id, label, client, "prompt").inc(min(prompt, MAX_TOKENS))
        if type(completion) is int and completion > 0:
            series.labels(provider.id, label, client, "completion").inc(min(completion, MAX_TOKENS))


def _translated(call: Call, response: web.StreamResponse) -> web.StreamResponse:
    """A whole answer in the client's protocol (a stream was translated as it was relayed).

    An upstream's 2xx that is not what its protocol says fails the attempt (nothing reached the
    client yet); its 4xx keeps its status in the client protocol's error shape (docs/reference.md §14)."""
    translation = call.translation
    if translation is None or not isinstance(response, web.Response) or response.prepared:
        return response
    body = response.body if isinstance(response.body, bytes) else b""
    try:
        events = translation.events(body) if call.stream and response.status < 300 else None
        if events is not None:  # the upstream ignored `stream`: the client's SDK reads events alone
            response.body = events
            response.content_type = "text/event-stream"
            return response
        response.body = translation.answer(response.status, body)
    except Untranslatable as exc:
        raise Failure(None, str(exc)) from None
    except RecursionError:  # an answer nested as deep as the parser allowed
        raise Failure(None, "the upstream's answer is nested too deep to translate") from None
    if call.upstream_protocol != call.protocol:
        response.content_type = "application/json"
    return response

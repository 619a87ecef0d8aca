"""A gateway request as OpenTelemetry spans and metrics, after the GenAI conventions (docs/reference.md §14).

Each request is a `SERVER` span named `{operation} {model}`, the child of the client's W3C
`traceparent` when it sent a valid one (a malformed one starts a new trace: the propagator
ignores it). Each attempt at an upstream is a `CLIENT` child span of it, named after the model
the provider is asked for; its context is what goes upstream as `traceparent` (so the upstream
sees the client's trace id, and the attempt as its parent) with the client's `tracestate`.

Every attempt records `gen_ai.client.operation.duration` (with `error.type` when it failed),
and the one that answered `gen_ai.client.token.usage` (input and output). The spans are not
made current (no context variable is set): a request's spans reach each other through this
object alone, and nothing else in the process sees them.

Spans hold no content: see `semconv` for what they hold. Exceptions are not recorded as span
events (their messages may quote anything); a failure's class and the gateway's own reason are.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from opentelemetry.metrics import Meter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from service.config.models import Provider
from service.errors import HTTPError
from service.gateway.call import Call, Failure
from service.gateway.protocols import messages
from service.gateway.tracing import semconv as sc

_INT64 = 1 << 63
_TIMED_OUT = ("timed out", " within ")
"""Failure reasons that mean the upstream was too slow (`no first byte within 5 s`...)."""


class Tracing:
    """What every traced request shares: the tracer, the two histograms, the W3C propagator,
    the bounded model names, and each provider's attributes (once per version of its file)."""

    def __init__(self, tracer: Tracer, meter: Meter) -> None:
        self.tracer = tracer
        self.token_usage = meter.create_histogram(
            sc.TOKEN_USAGE,
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=list(sc.TOKEN_BUCKETS),
        )
        self.duration = meter.create_histogram(
            sc.OPERATION_DURATION,
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=list(sc.DURATION_BUCKETS),
        )
        self.propagator = TraceContextTextMapPropagator()
        self.models = sc.Bounded()
        """Requested models as span names and metric attributes: the first 100, then `other`."""
        self.answer_models = sc.Bounded()
        self._providers: dict[str, tuple[Provider, dict[str, AttributeValue]]] = {}

    def request(self, call: Call) -> RequestTrace:
        """The span of `call`, to use as `with tracing.request(call) as trace:`."""
        return RequestTrace(self, call)

    def provider(self, provider: Provider) -> Mapping[str, AttributeValue]:
        """`gen_ai.provider.name`, `switchboard.provider.id`, `server.address` and `.port`."""
        found = self._providers.get(provider.id)
        if found is None or found[0] is not provider:
            attributes: dict[str, AttributeValue] = {
                sc.PROVIDER: sc.provider_name(provider.label),
                sc.PROVIDER_ID: provider.id,
            }
            where = sc.server(provider.endpoint)
            if where is not None:
                attributes[sc.SERVER_ADDRESS], attributes[sc.SERVER_PORT] = where
            found = self._providers[provider.id] = (provider, attributes)
        return found[1]


class RequestTrace:
    """One gateway request's span, and the span of its attempt under way."""

    __slots__ = (
        "_attempt",
        "_attempt_metrics",
        "_attempts",
        "_call",
        "_context",
        "_ending",
        "_operation",
        "_span",
        "_started",
        "_tracing",
        "_where",
    )

    def __init__(self, tracing: Tracing, call: Call) -> None:
        self._tracing = tracing
        self._call = call
        self._operation = operation = sc.operation(call.purpose, call.protocol)
        attributes: dict[str, AttributeValue] = {
            sc.OPERATION: operation,
            sc.PROTOCOL: call.protocol,
            sc.CLIENT: call.client,
        }
        if call.model:
            attributes[sc.REQUEST_MODEL] = sc.cut(call.model)
        if call.stream:
            attributes[sc.REQUEST_STREAM] = True
        parent = tracing.propagator.extract(call.request.headers)
        self._span = tracing.tracer.start_span(
            self._name(call.model),
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
        self._context = set_span_in_context(self._span)
        self._attempt: Span | None = None
        self._attempt_metrics: dict[str, AttributeValue] = {}
        self._attempts = 0
        self._started = 0.0
        self._where: Mapping[str, AttributeValue] = {}
        """The provider attributes of the attempt under way (or the last one)."""
        self._ending: dict[str, AttributeValue] = {}
        """What the request's span learns before it ends, set on it at once (each call costs)."""

    def __enter__(self) -> RequestTrace:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        span, ending = self._span, self._ending
        if exc is not None:
            if self._attempt is not None:
                self.aborted(exc)
            if _estimated(self._call, exc):  # answered all the same: 200 and an estimate
                ending[sc.ESTIMATED] = True
            elif isinstance(exc, HTTPError):
                ending[sc.HTTP_STATUS], ending[sc.ERROR_TYPE] = exc.status, exc.type
                if exc.status >= 500:
                    span.set_status(Status(StatusCode.ERROR, sc.cut(exc.message, sc.MAX_REASON)))
            else:
                ending[sc.ERROR_TYPE] = type(exc).__name__
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        ending[sc.ATTEMPTS] = self._attempts
        span.set_attributes(ending)
        span.end()

    # -- attempts ------------------------------------------------------------------------------

    def attempt(self, provider: Provider) -> None:
        """Start the span of an attempt at `provider`, and set the `traceparent` it sends."""
        tracing, call = self._tracing, self._call
        self._attempts += 1
        where = tracing.provider(provider)
        model = provider.upstream_model(call.model) if call.model else None
        attributes: dict[str, AttributeValue] = {
            **where,
            sc.OPERATION: self._operation,
            sc.ATTEMPT: self._attempts,
        }
        if model:
            attributes[sc.REQUEST_MODEL] = sc.cut(model)
        span = tracing.tracer.start_span(
            self._name(model),
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
        headers: dict[str, str] = {}
        tracing.propagator.inject(headers, context=set_span_in_context(span))
        call.trace_headers = headers
        self._attempt, self._where = span, where
        self._attempt_metrics = {
            **{k: v for k, v in where.items() if k != sc.PROVIDER_ID},
            sc.OPERATION: self._operation,
            sc.REQUEST_MODEL: tracing.models(model),
        }
        self._started = time.perf_counter()

    def failed(self, failure: Failure) -> None:
        """The attempt failed before anything reached the client; the next one may serve."""
        error = str(failure.status) if failure.status is not None else _error_type(failure.reason)
        attributes: dict[str, AttributeValue] = {
            sc.ERROR_TYPE: error,
            sc.FAILURE: sc.cut(failure.reason, sc.MAX_REASON),
            sc.UPSTREAM_PROTOCOL: self._call.upstream_protocol,
        }
        if failure.status is not None:
            attributes[sc.HTTP_STATUS] = failure.status
        self._end_attempt(attributes, error, failure.reason)

    def aborted(self, exc: BaseException) -> None:
        """The attempt ended with an exception (the client left, or a fault of the gateway)."""
        name = type(exc).__name__
        self._end_attempt({sc.ERROR_TYPE: name}, name, name)

    def succeeded(self, response: web.StreamResponse) -> None:
        """The attempt answered the client: its span, and the request's, learn the answer."""
        call, tracing = self._call, self._tracing
        status = response.status
        answer: dict[str, AttributeValue] = {sc.HTTP_STATUS: status}
        if call.answer_model:
            answer[sc.RESPONSE_MODEL] = sc.cut(call.answer_model)
        input_tokens, output_tokens = _tokens(call.usage)
        if input_tokens is not None:
            answer[sc.INPUT_TOKENS] = input_tokens
        if output_tokens is not None:
            answer[sc.OUTPUT_TOKENS] = output_tokens
        self._ending.update(answer)
        self._ending.update(self._where)
        error = reason = None
        if call.broken is not None:  # the client had a 200, and a stream that ended in an error event
            error, reason = "stream_broken", call.broken
            self._ending[sc.ERROR_TYPE] = error
            self._span.set_status(Status(StatusCode.ERROR, sc.cut(reason, sc.MAX_REASON)))
        elif status >= 400:  # the client's error, as the upstream said it: the attempt's, not the gateway's
            error, reason = str(status), f"HTTP {status}"
        attempt = {**answer, sc.UPSTREAM_PROTOCOL: call.upstream_protocol}
        if error is not None:
            attempt[sc.ERROR_TYPE] = error
        metrics = self._attempt_metrics
        self._end_attempt(attempt, error, reason)
        if not call.metered:
            return
        if call.answer_model:
            metrics = {**metrics, sc.RESPONSE_MODEL: tracing.answer_models(call.answer_model)}
        if input_tokens is not None:
            tracing.token_usage.record(input_tokens, {**metrics, sc.TOKEN_TYPE: "input"})
        if output_tokens is not None:
            tracing.token_usage.record(output_tokens, {**metrics, sc.TOKEN_TYPE: "output"})

    def _end_attempt(
        self, attributes: dict[str, AttributeValue], error: str | None, reason: str | None
    ) -> None:
        span = self._attempt
        if span is None:
            return
        self._attempt = None
        self._call.trace_headers = None
        span.set_attributes(attributes)
        metrics = self._attempt_metrics
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, sc.cut(reason or error, sc.MAX_REASON)))
            metrics = {**metrics, sc.ERROR_TYPE: error}
        span.end()
        self._tracing.duration.record(time.perf_counter() - self._started, metrics)

    def _name(self, model: str | None) -> str:
        """`{operation} {model}`, with the model bounded as the metrics' (a client may send any)."""
        return f"{self._operation} {self._tracing.models(model)}" if model else self._operation


def _estimated(call: Call, exc: BaseException) -> bool:
    """A token count that no provider speaking Messages can take now: the handler answers it with
    a local estimate (docs/reference.md §14, service/http/protocols_api.py), not with the relay's
    error."""
    return call.protocol == "count_tokens" and messages.estimated_for(exc)


def _error_type(reason: str) -> str:
    """`error.type` of a failure without a status: `timeout`, or the conventions' `_OTHER`."""
    return "timeout" if any(marker in reason for marker in _TIMED_OUT) else "_OTHER"


def _tokens(usage: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """Input and output tokens of an answer's usage (chat's names, or Anthropic's and
    Responses'), when they are counts."""
    if usage is None:
        return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return _count(prompt), _count(completion)


def _count(value: object) -> int | None:
    """A token count as an attribute holds it: an int within OTLP's int64 (a larger one, which
    an upstream may send, would fail the encoding of the whole batch it is in)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _INT64:
        return value
    return None

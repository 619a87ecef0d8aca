"""An OTLP receiver for tests: what OpenTelemetry's exporters send, decoded (opentelemetry-proto).

`OTLPReceiver` is a real aiohttp server on 127.0.0.1, port 0, that accepts `POST /v1/traces`
and `POST /v1/metrics` as OTLP/HTTP sends them (protobuf, gzip or not), and with `grpc=True`
also a gRPC server speaking OTLP's `TraceService` and `MetricsService`. It keeps every span
and every metric data point it was sent, as plain values, and the raw bytes of every export
(to look for a value that must never be there). It can be told to answer slowly or with an
error, as a collector that is struggling does.

    async with OTLPReceiver() as otlp:
        env = otlp.env()   # OTEL_EXPORTER_OTLP_ENDPOINT and a short batch delay
        ...
        span = await otlp.span(lambda s: s.name.startswith("chat"))
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

SPAN_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_CODES = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True)
class Span:
    """One span as exported: ids in hex, attributes as Python values."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    attributes: dict[str, Any]
    status: str
    status_message: str
    trace_state: str
    resource: dict[str, Any]
    scope: str
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class Point:
    """One histogram data point of a metric as exported."""

    metric: str
    unit: str
    attributes: dict[str, Any]
    count: int
    sum: float
    bounds: tuple[float, ...]
    resource: dict[str, Any]


@dataclass
class OTLPReceiver:
    """A collector stand-in: HTTP always, gRPC too when `grpc` is True."""

    grpc: bool = False
    spans: list[Span] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    exports: list[bytes] = field(default_factory=list)
    """The raw (decompressed) body of every export received."""
    headers: list[dict[str, str]] = field(default_factory=list)
    """The headers (or gRPC metadata) of every export received, names lower-cased."""
    delay_s: float = 0.0
    """Each answer waits this long first (a slow collector)."""
    status: int = 200
    """The HTTP status of each answer (a collector in trouble answers 503)."""
    _runner: web.AppRunner | None = None
    _server: Any = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    port: int = 0
    grpc_port: int = 0

    async def __aenter__(self) -> OTLPReceiver:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        if self.grpc:
            self._server = server = grpc.aio.server()
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_GrpcTraces(self), server)
            metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_GrpcMetrics(self), server)
            self.grpc_port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            await self._server.stop(0)
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, protocol: str = "http/protobuf", **extra: str) -> dict[str, str]:
        """The variables that point an exporter here, with a short batch delay."""
        endpoint = self.url if protocol != "grpc" else f"http://127.0.0.1:{self.grpc_port}"
        return {
            "SWITCHBOARD_OTEL_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
            **extra,
        }

    # -- waiting for what arrives -----------------------------------------------------------

    async def span(self, match: Callable[[Span], bool], timeout: float = 15) -> Span:
        """The first span received that `match`es, waiting for it."""
        found = await self.spans_matching(match, 1, timeout)
        return found[0]

    async def spans_matching(
        self, match: Callable[[Span], bool], count: int, timeout: float = 15
    ) -> list[Span]:
        """At least `count` received spans that `match`, waiting for them."""

        def ready() -> bool:
            return len([s for s in self.spans if match(s)]) >= count

        await self._wait(ready, timeout, lambda: f"{count} spans; got {[s.name for s in self.spans]}")
        return [s for s in self.spans if match(s)]

    async def point(self, match: Callable[[Point], bool], timeout: float = 15) -> Point:
        """The latest data point received that `match`es, waiting for one (a cumulative metric's
        latest point holds everything recorded so far)."""
        await self._wait(
            lambda: any(match(p) for p in self.points),
            timeout,
            lambda: f"a data point; got {sorted({(p.metric, str(p.attributes)) for p in self.points})}",
        )
        return [p for p in self.points if match(p)][-1]

    async def _wait(self, ready: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(ready)
        except TimeoutError:
            raise AssertionError(f"the OTLP receiver did not get {what()}") from None

    # -- receiving ----------------------------------------------------------------------------

    async def _traces(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if self.status != 200:
            return web.Response(status=self.status)
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(body)
        await self.received_traces(message)
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if self.status != 200:
            return web.Response(status=self.status)
        message = metrics_service_pb2.ExportMetricsServiceRequest()
        message.ParseFromString(body)
        await self.received_metrics(message)
        answer = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    async def _body(self, request: web.Request) -> bytes:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.exports.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        return body

    async def received_traces(self, message: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=SPAN_KINDS.get(s.kind, str(s.kind)),
                            attributes=attributes(s.attributes),
                            status=STATUS_CODES.get(s.status.code, str(s.status.code)),
                            status_message=s.status.message,
                            trace_state=s.trace_state,
                            resource=resource,
                            scope=scope_spans.scope.name,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        async with self._changed:
            self._changed.notify_all()

    async def received_metrics(self, message: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        for resource_metrics in message.resource_metrics:
            resource = attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if not metric.HasField("histogram"):
                        continue
                    for p in metric.histogram.data_points:
                        self.points.append(
                            Point(
                                metric=metric.name,
                                unit=metric.unit,
                                attributes=attributes(p.attributes),
                                count=p.count,
                                sum=p.sum,
                                bounds=tuple(p.explicit_bounds),
                                resource=resource,
                            )
                        )
        async with self._changed:
            self._changed.notify_all()


class _GrpcTraces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    async def Export(self, request: Any, context: Any) -> Any:
        self.receiver.exports.append(request.SerializeToString())
        self.receiver.headers.append({k.lower(): v for k, v in context.invocation_metadata()})
        await self.receiver.received_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _GrpcMetrics(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    async def Export(self, request: Any, context: Any) -> Any:
        self.receiver.exports.append(request.SerializeToString())
        await self.receiver.received_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP key-values as a dict of Python values."""
    return {kv.key: value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, kind) if kind else None

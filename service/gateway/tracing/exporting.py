"""The OpenTelemetry SDK's providers and OTLP exporters of the gateway's spans and metrics.

`Telemetry.start(settings)` builds a tracer provider whose spans go out in batches (the
`OTEL_BSP_*` variables), and a meter provider read every `OTEL_METRIC_EXPORT_INTERVAL`; both
export over OTLP as `OTEL_EXPORTER_OTLP_PROTOCOL` says (`http/protobuf`, the default, or
`grpc`; `..._TRACES_PROTOCOL` and `..._METRICS_PROTOCOL` per signal), to the endpoint, with the
headers, timeout, compression and certificates of the standard `OTEL_EXPORTER_OTLP_*`
variables, which the exporters read themselves. The resource is `service.name=switchboard`
(unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` say otherwise), the version and
the replica's name.

Exporting happens in the SDK's own threads, never on the event loop: a collector that is
down or slow costs a request nothing (a full queue drops spans, and the SDK says so in the
log). `aclose` exports what is still batched when the service stops, within a bound.

The providers are this object's own, not OpenTelemetry's global ones: nothing else in the
process (litellm's callbacks, a library's instrumentation) writes to them, and two apps in one
process (the tests) keep apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_VERSION,
    OTELResourceDetector,
    Resource,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from service import __version__
from service.gateway.tracing.spans import Tracing
from service.settings import Settings

log = logging.getLogger(__name__)

SCOPE = "switchboard.gateway"
"""The instrumentation scope of the spans and metrics."""
_CLIENT_INPUT_LOGGERS = ("opentelemetry.trace.propagation.tracecontext", "opentelemetry.trace.span")
"""OpenTelemetry's loggers that warn of a malformed `traceparent` or `tracestate`, quoting it: a
client's header, which starts a new trace (docs/reference.md §14) and is worth no log line per request."""
FLUSH_TIMEOUT_S = 10.0
"""How long stopping waits for the last spans and metrics to be exported."""


class Telemetry:
    """The SDK's tracer and meter providers, and the `Tracing` the relay is given."""

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        exporters: tuple[SpanExporter, MetricExporter],
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.exporters = exporters
        """Stopped outright when the last export takes too long: they stop retrying."""
        self.tracing = Tracing(
            tracer_provider.get_tracer(SCOPE, __version__), meter_provider.get_meter(SCOPE, __version__)
        )

    @classmethod
    def start(cls, settings: Settings) -> Telemetry:
        """Providers exporting over OTLP as the settings and the `OTEL_*` variables say."""
        resource = _resource(settings.replica)
        traces, metrics = settings.otlp_protocols
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        span_exporter, metric_exporter = _span_exporter(traces), _metric_exporter(metrics)
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        reader = PeriodicExportingMetricReader(metric_exporter)
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
        for name in _CLIENT_INPUT_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        log.info("OpenTelemetry: spans over OTLP %s, metrics over OTLP %s", traces, metrics)
        return cls(tracer_provider, meter_provider, (span_exporter, metric_exporter))

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Export what is still batched, then stop the providers; waits at most `timeout_s`
        (`FLUSH_TIMEOUT_S` by default).

        The SDK's shutdown blocks (it exports), so it runs in a thread of its own, and the event
        loop goes on meanwhile. A daemon thread: a collector that does not answer cannot hold
        the process past `timeout_s`; past it, the exporters are stopped, and stop retrying.
        """
        if timeout_s is None:
            timeout_s = FLUSH_TIMEOUT_S
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down() -> None:
            try:
                self.tracer_provider.shutdown()
                self.meter_provider.shutdown(timeout_millis=timeout_s * 1000)
            except Exception:
                log.exception("OpenTelemetry: shutting down failed")
            finally:
                loop.call_soon_threadsafe(_settle, done)

        threading.Thread(target=shut_down, name="switchboard-otel-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except TimeoutError:
            log.warning("OpenTelemetry: the last spans and metrics were not exported within %g s", timeout_s)
            for exporter in self.exporters:  # an exporter told to stop gives up its retries
                with contextlib.suppress(Exception):
                    exporter.shutdown()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _resource(replica: str) -> Resource:
    """The SDK's resource, Switchboard's name, version and replica over it, and what
    `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` say over those (they win)."""
    ours = Resource({SERVICE_NAME: "switchboard", SERVICE_VERSION: __version__, SERVICE_INSTANCE_ID: replica})
    return Resource.create().merge(ours).merge(OTELResourceDetector().detect())


def _span_exporter(protocol: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    return Http()


def _metric_exporter(protocol: str) -> MetricExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as Grpc

        return Grpc()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as Http

    return Http()

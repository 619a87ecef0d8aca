"""OpenTelemetry traces and metrics of the gateway's requests (docs/reference.md §14), when they are on.

    semconv.py    the names of OpenTelemetry's GenAI conventions, and a request mapped onto them
    spans.py      Tracing: a request's span, a child span per attempt, the `traceparent` sent
                  upstream, the metrics `gen_ai.client.token.usage` and `.operation.duration`
    exporting.py  Telemetry: the SDK's providers and the OTLP exporters, flushed on shutdown

With `SWITCHBOARD_OTEL_EXPORTER=otlp` the gateway's lifecycle imports `exporting` and hands the
relay a `Tracing`. Off (the default), nothing of OpenTelemetry is imported: the relay holds
None and does no tracing work at all. This package's `__init__` and `semconv` import nothing
of it either, so that the command line can say which packages are missing before it starts.
"""

from __future__ import annotations

import importlib.util

PROTOCOLS = ("http/protobuf", "grpc")
"""The OTLP protocols the exporters speak (`OTEL_EXPORTER_OTLP_PROTOCOL`)."""

_PACKAGES = {
    "opentelemetry.sdk": "opentelemetry-sdk",
    "opentelemetry.exporter.otlp.proto.http": "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry.exporter.otlp.proto.grpc": "opentelemetry-exporter-otlp-proto-grpc",
}
_NEEDED = {
    "http/protobuf": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
    "grpc": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc"),
}


def missing_packages(*protocols: str) -> list[str]:
    """The PyPI packages that exporting over `protocols` needs and that are not installed."""
    missing: list[str] = []
    for protocol in protocols:
        for module in _NEEDED[protocol]:
            package = _PACKAGES[module]
            if package not in missing and not _installed(module):
                missing.append(package)
    return missing


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False

"""Optional OpenTelemetry spans: they exist only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and an
OTLP exporter is installed; otherwise every call here is a no-op."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("hybridserve.metrics")

_tracer: Any = None
_tracer_resolved = False


def _get_tracer() -> Any:
    """An OTLP-exporting tracer when an endpoint is configured and the exporter is installed, else None."""
    global _tracer, _tracer_resolved
    if _tracer_resolved:
        return _tracer
    _tracer_resolved = True
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") and not os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-sdk and "
                    "opentelemetry-exporter-otlp-proto-http are not installed: no traces")
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                      "hybridserve")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = provider.get_tracer("hybridserve")
    return _tracer


def start_span(name: str, **attributes: Any) -> Any:
    """A started span (end it yourself), or None when tracing is off."""
    tracer = _get_tracer()
    return None if tracer is None else tracer.start_span(name, attributes=attributes)


def trace_interval(name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A span for an interval measured already (wall-clock nanoseconds), when tracing is on."""
    tracer = _get_tracer()
    if tracer is not None:
        tracer.start_span(name, start_time=start_ns, attributes=attributes).end(end_time=end_ns)

"""Prometheus metrics per model, one facade over two backends, plus optional OpenTelemetry spans.

Under Ray Serve every replica records through ``ray.serve.metrics`` (``use_ray_metrics`` in the
deployment constructors): each node's Ray metrics agent exports them with ``application``,
``deployment`` and ``replica`` labels and a ``ray_`` prefix, which is right across replicas and
nodes. In-process (``hybridserve serve --no-ray``) they live in a ``prometheus_client`` registry
that the HTTP app serves at ``/metrics``. Call sites do not know which: each is one call here.

``FAMILIES`` is the catalogue (docs/metrics.md describes each); the ingress records per API
request (``observe_request``), the model runtime per stage, batch and load. Spans (ingress, queue,
batch, forward) exist only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and an OTLP exporter is
installed; otherwise they are no-ops.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from starlette.responses import JSONResponse, Response

from hybridserve.server.core.errors import HybridServeError, as_hybridserve_error
from hybridserve.server.observability.logs import (
    bind_request_id,
    configure_logging,
    grpc_request_id,
    log_request,
    release_request_id,
)

log = logging.getLogger("hybridserve.metrics")

from hybridserve.server.observability.families import (
    CLIENT_CLOSED_REQUEST,
    FAMILIES,
    Family,
    IN_FLIGHT,
    KUBERAY_METRICS_PORT,
    REQUESTS,
    REQUEST_BYTES,
    REQUEST_SECONDS,
    RESPONSE_BYTES,
    UNKNOWN_MODEL,
)
from hybridserve.server.observability.tracing import start_span

_VERBS = {"counter": "inc", "gauge": "set", "histogram": "observe"}


# ------------------------------------------------------------------ backends


class PrometheusClientBackend:
    """The families in a ``prometheus_client`` registry of this process (served at ``/metrics``)."""

    def __init__(self):
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()
        self.metrics: dict[str, Any] = {}
        self._recorders: dict[tuple, Any] = {}
        for family in FAMILIES:
            extra = {"buckets": family.buckets} if family.kind == "histogram" else {}
            cls = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}[family.kind]
            self.metrics[family.name] = cls(family.name, family.help, family.labels, registry=self.registry, **extra)

    def record(self, family: Family, value: float, labels: dict[str, str]) -> None:
        key = (family.name, *labels.items())  # a series' recorder, looked up once (labels() costs per call)
        recorder = self._recorders.get(key)
        if recorder is None:
            recorder = self._recorders[key] = getattr(self.metrics[family.name].labels(**labels), _VERBS[family.kind])
        recorder(value)

    def declare(self, family: Family, labels: dict[str, str]) -> None:
        self.metrics[family.name].labels(**labels)

    def exposition(self) -> tuple[bytes, str]:
        import prometheus_client as pc

        return pc.generate_latest(self.registry), pc.CONTENT_TYPE_LATEST


class RayServeBackend:
    """The families as ``ray.serve.metrics``: exported by each node's Ray metrics agent.

    Ray exports every ``report interval`` (10 s by default), so recording each request's gauge
    and counter changes straight into Ray (a tag check and a call into its C++ core each) buys
    nothing but per-request CPU: gauges keep their latest value and counters their sum here, and
    a thread hands them to Ray every ``FLUSH_S``. Histograms keep every observation and go at
    once. Ray's export also drops a gauge series that was not set again within two report
    intervals, so the thread sets every gauge series again each ``GAUGE_REFRESH_S``: a model
    that is ready stays ready in Prometheus until its replica is gone.
    """

    FLUSH_S = 1.0
    GAUGE_REFRESH_S = 5.0

    def __init__(self):
        from ray.serve import metrics as serve_metrics

        self.metrics: dict[str, Any] = {}
        for family in FAMILIES:
            if family.kind == "histogram":
                metric = serve_metrics.Histogram(family.name, family.help, list(family.buckets), family.labels)
            else:
                cls = serve_metrics.Counter if family.kind == "counter" else serve_metrics.Gauge
                metric = cls(family.name, family.help, family.labels)
            self.metrics[family.name] = metric
        self._gauges: dict[tuple, tuple[Family, float, dict[str, str]]] = {}
        self._changed: set[tuple] = set()
        self._counts: dict[tuple, tuple[Family, float, dict[str, str]]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._flush_forever, name="hybridserve-metrics", daemon=True).start()

    def record(self, family: Family, value: float, labels: dict[str, str]) -> None:
        if family.kind == "histogram":
            self.metrics[family.name].observe(value, tags=labels)
            return
        key = (family.name, *labels.items())
        with self._lock:
            if family.kind == "gauge":
                self._gauges[key] = (family, value, labels)
                self._changed.add(key)
            else:
                _, total, _ = self._counts.get(key, (family, 0.0, labels))
                self._counts[key] = (family, total + value, labels)

    def declare(self, family: Family, labels: dict[str, str]) -> None:
        # Ray's public ``inc`` refuses 0; its ``_record`` adds 0 to the series with the replica's tags.
        self.metrics[family.name]._record(0.0, tags=labels)

    def flush(self, every_gauge: bool = False) -> None:
        """Hand the buffered counters and the changed gauges (``every_gauge``: all of them) to Ray."""
        with self._lock:
            counts, self._counts = self._counts, {}
            keys = list(self._gauges) if every_gauge else list(self._changed)
            gauges = [self._gauges[key] for key in keys]
            self._changed.clear()
        for family, value, labels in [*counts.values(), *gauges]:
            try:
                getattr(self.metrics[family.name], _VERBS[family.kind])(value, tags=labels)
            except Exception:  # keep flushing the others
                log.exception("recording %s failed", family.name)

    def _flush_forever(self) -> None:
        last_refresh = time.monotonic()
        while True:
            time.sleep(self.FLUSH_S)
            refresh = time.monotonic() - last_refresh >= self.GAUGE_REFRESH_S
            if refresh:
                last_refresh = time.monotonic()
            self.flush(every_gauge=refresh)


_backend: PrometheusClientBackend | RayServeBackend | None = None
_backend_lock = threading.Lock()
_in_flight: Tally[tuple[str, str]] = Tally()
_failing: set[str] = set()


def use_ray_metrics() -> None:
    """Record through Ray Serve's metrics from now on (call first thing in a replica's constructor)."""
    global _backend
    with _backend_lock:
        if not isinstance(_backend, RayServeBackend):
            _backend = RayServeBackend()


def instrument_ray_replica() -> None:
    """Ray Serve metrics and hybridserve's log format in this replica's process (first thing in its constructor)."""
    use_ray_metrics()
    configure_logging()


def backend() -> PrometheusClientBackend | RayServeBackend:
    global _backend
    if _backend is not None:
        return _backend
    with _backend_lock:
        if _backend is None:
            _backend = PrometheusClientBackend()
        return _backend


def _record(family: Family, value: float, **labels: str) -> None:
    """Record one value; a metrics failure is logged once per family, never raised into serving."""
    if family.kind == "counter" and value <= 0:
        return
    try:
        backend().record(family, value, labels)
    except Exception:
        if family.name not in _failing:
            _failing.add(family.name)
            log.exception("recording %s failed (further failures of it are not logged)", family.name)


def _declare(family: Family, **labels: str) -> None:
    """Export a counter series at 0 before its first event, so it exists for ``rate()`` and alerts."""
    try:
        backend().declare(family, labels)
    except Exception:
        log.exception("declaring %s failed", family.name)


def metrics_response() -> Response:
    """The in-process ``/metrics``; under Ray Serve the metrics leave through Ray's export instead."""
    current = backend()
    if isinstance(current, RayServeBackend):
        return JSONResponse({"error": {"code": "not_found", "message": "under Ray Serve, scrape Ray's metrics export "
                                       "port of each node (see docs/metrics.md)"}}, status_code=404)
    body, content_type = current.exposition()
    return Response(body, media_type=content_type)


def metrics_export_port(preferred: int = KUBERAY_METRICS_PORT) -> int:
    """KubeRay's metrics port where it is free on this host, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free port for Ray's metrics export")


def ray_metrics_targets() -> list[str]:
    """The Prometheus endpoint of every alive node's Ray metrics agent (call on a connected driver)."""
    import ray

    return [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes() if node.get("Alive")]


# ------------------------------------------------------------------ ingress: one API request


_current: ContextVar[RequestObservation | None] = ContextVar("hybridserve_observation", default=None)


class RequestObservation:
    """One API request from arrival to answer: in-flight gauge, counters, latency, its log line and span."""

    def __init__(self, api: str, model: str, known: bool, request_id: str | None, bytes_in: int = 0,
                 grpc_context: Any = None):
        self.api, self.requested = api, model
        self.model = model if known else UNKNOWN_MODEL
        self.bytes_in = bytes_in
        self.request_id, self.grpc_context = request_id, grpc_context
        self.outcomes: list[Any] = []
        self.started = time.perf_counter()
        self._finished = False
        self._token = bind_request_id(request_id)
        self._span = start_span("hybridserve.ingress", api=api, model=self.model)
        _current.set(self)
        _in_flight[(self.model, api)] += 1
        _record(IN_FLIGHT, _in_flight[(self.model, api)], model=self.model, api=api)

    def answered(self, response: Any, outcomes: Sequence[Any] = ()) -> Any:
        """Record the request as answered with ``response`` (an HTTP response or a protobuf message)."""
        self.outcomes.extend(outcomes)
        body = getattr(response, "body", None)
        self._finish("ok", 200, len(body) if body is not None else response.ByteSize())
        return response

    def failed(self, exc: BaseException) -> HybridServeError:
        """Record the request as failed with ``exc``'s error code; returns the typed error to answer with."""
        error = as_hybridserve_error(exc)
        self._finish(error.code, error.kind.http_status, 0, error.message)
        return error

    def cancelled(self) -> None:
        """Record a request whose client went away before its answer: status 499 (nginx's client closed request)."""
        self._finish("cancelled", CLIENT_CLOSED_REQUEST, 0)

    def _finish(self, outcome: str, status: int, bytes_out: int, message: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        seconds = time.perf_counter() - self.started
        labels = {"model": self.model, "api": self.api}
        status_class = f"{status // 100}xx"
        _in_flight[(self.model, self.api)] -= 1
        _record(IN_FLIGHT, _in_flight[(self.model, self.api)], **labels)
        _record(REQUESTS, 1, **labels, outcome=outcome, status=status_class)
        _record(REQUEST_SECONDS, seconds, **labels, status=status_class)
        _record(REQUEST_BYTES, self.bytes_in, **labels)
        _record(RESPONSE_BYTES, bytes_out, **labels)
        fields: dict[str, Any] = {"api": self.api, "model": self.model, "outcome": outcome, "status": status,
                                  "duration_ms": round(seconds * 1000, 2), "bytes_in": self.bytes_in,
                                  "bytes_out": bytes_out}
        if self.model == UNKNOWN_MODEL:
            fields["requested_model"] = self.requested[:128]
        if self.outcomes:
            fields["items"] = len(self.outcomes)
            fields["batch_size"] = max(o.batch_size for o in self.outcomes)
            for stage in ("queue", "preprocess", "compute", "postprocess"):
                fields[f"{stage}_ms"] = round(max(o.timings.get(stage, 0.0) for o in self.outcomes) * 1000, 2)
        if message is not None:
            fields["error"] = message[:300]
        log_request(fields)
        if self._span is not None:
            self._span.set_attribute("http.status_code", status)
            self._span.end()
        if self.grpc_context is not None and self.request_id:
            _add_trailer(self.grpc_context, "x-request-id", self.request_id)
        if _current.get() is self:
            _current.set(None)
        release_request_id(self._token)


def observe_request(api: str, model: str, served: Any, request_id: str | None,
                    bytes_in: int | str | None = 0) -> RequestObservation:
    """Start observing a request for ``model``; ``served`` is what knows the model names (a plane's endpoints)."""
    size = int(bytes_in) if isinstance(bytes_in, int) or (isinstance(bytes_in, str) and bytes_in.isdigit()) else 0
    return RequestObservation(api, model, model in served, request_id, size)


def request_cancelled() -> None:
    """Record the request observed in this task, if it is still open, as cancelled (its client went away)."""
    observation = _current.get()
    if observation is not None:
        observation.cancelled()


def observe_rpc(api: str | None, served: Any, request: Any, context: Any) -> RequestObservation | Unobserved:
    """Observe a gRPC inference call as ``api`` ("grpc" or "oip"); any other RPC (``api`` None) is not observed."""
    if api is None:
        return Unobserved()
    model = getattr(request, "model", None) or getattr(request, "model_name", "")
    return RequestObservation(api, model, model in served, grpc_request_id(context), request.ByteSize(), context)


class Unobserved:
    """What ``observe_rpc`` gives RPCs that are not inference: records nothing."""

    def answered(self, response: Any, outcomes: Sequence[Any] = ()) -> Any:
        return response

    def failed(self, exc: BaseException) -> HybridServeError:
        return as_hybridserve_error(exc)

    def cancelled(self) -> None:
        pass


def _add_trailer(context: Any, key: str, value: str) -> None:
    """Add one trailing metadata entry to what the call already set (Ray Serve keeps its ``request_id``)."""
    kept = [(k, v) for k, v in context.trailing_metadata() if k not in (key, "request_id")]
    context.set_trailing_metadata([*kept, (key, value)])


def note_outcomes(outcomes: Sequence[Any]) -> None:
    """Attach data-plane outcomes (batch size, timings) to the request being observed in this task."""
    observation = _current.get()
    if observation is not None:
        observation.outcomes.extend(outcomes)



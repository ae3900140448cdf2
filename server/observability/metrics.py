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
import os
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, Response

from hybridserve.server.core.errors import HybridServeError, as_hybridserve_error
from hybridserve.server.observability.logs import (
    bind_request_id,
    configure_logging,
    grpc_request_id,
    log_request,
    release_request_id,
)

if TYPE_CHECKING:
    import torch

    from hybridserve.server.engine.runtime import InferenceOutcome, ModelRuntime

log = logging.getLogger("hybridserve.metrics")

RAY_PREFIX = "ray_"  # what Ray's metrics export puts before every name
UNKNOWN_MODEL = "_unknown"  # the model label of requests for names the server does not serve
MODEL_STATES = ("compiling", "warming_up", "ready", "failed")
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0, 256.0)
KUBERAY_METRICS_PORT = 8080
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client disconnected; no answer is sent


@dataclass(frozen=True)
class Family:
    """One metric family: ``name`` without the ``_total`` a counter gets when exported."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        return f"{self.name}_total" if self.kind == "counter" else self.name


def _histogram(name: str, help: str, labels: tuple[str, ...], buckets=SECONDS_BUCKETS) -> Family:
    return Family(name, "histogram", help, labels, buckets)


M, API = ("model",), ("model", "api")
REQUESTS = Family("hybridserve_requests", "counter", "API requests for a model, by API, outcome (ok or error code) "
                  "and status class", (*API, "outcome", "status"))
REQUEST_SECONDS = _histogram("hybridserve_request_duration_seconds",
                             "End-to-end time of an API request at the ingress", (*API, "status"))
IN_FLIGHT = Family("hybridserve_requests_in_flight", "gauge", "API requests being answered by this ingress", API)
REQUEST_BYTES = Family("hybridserve_request_bytes", "counter", "Bytes of request payloads received", API)
RESPONSE_BYTES = Family("hybridserve_response_bytes", "counter", "Bytes of successful answers sent", API)
QUEUE_SECONDS = _histogram("hybridserve_queue_wait_seconds", "Time an item waited in the batch queue", M)
PREPROCESS_SECONDS = _histogram("hybridserve_preprocess_seconds", "Decode and preprocess time of a request", M)
COMPUTE_SECONDS = _histogram("hybridserve_compute_seconds", "Forward time of one executed batch", M)
POSTPROCESS_SECONDS = _histogram("hybridserve_postprocess_seconds", "Postprocess and encode time of a request", M)
BATCH_SIZE = _histogram("hybridserve_batch_size", "Items in one executed batch", M, BATCH_SIZE_BUCKETS)
BATCHES = Family("hybridserve_batches", "counter", "Batches executed", M)
QUEUED_ITEMS = Family("hybridserve_queued_items", "gauge", "Items admitted to the batch queue and not finished", M)
CANCELLED_ITEMS = Family("hybridserve_cancelled_items", "counter", "Items dropped from the batch queue before "
                         "compute because their request was cancelled (client disconnected, or deadline passed)", M)
PIXELS = Family("hybridserve_pixels_processed", "counter", "Pixels of the model inputs (per item, after resize "
                "or tiling) of finished requests", M)
LOAD_SECONDS = Family("hybridserve_model_load_seconds", "gauge", "Time the last load took (build, compile, warm-up)", M)
COMPILE_SECONDS = Family("hybridserve_model_compile_seconds", "gauge", "Time compiling the model took", M)
WARMUP_SECONDS = Family("hybridserve_model_warmup_seconds", "gauge", "Time the warm-up pass took", M)
MODEL_INFO = Family("hybridserve_model_info", "gauge", "Always 1: the model's task, architecture, compile "
                    "backend in use and device", ("model", "task", "architecture", "backend", "device"))
LATENCY_OBJECTIVE = Family("hybridserve_model_latency_objective_seconds", "gauge", "The p99 latency objective of "
                           "the model's spec (batching.latency_slo_ms), where it sets one", M)
MODEL_READY = Family("hybridserve_model_ready", "gauge", "1 when the model is loaded and warmed up, else 0", M)
MODEL_STATE = Family("hybridserve_model_state", "gauge", "1 for the load state the model is in (compiling, "
                     "warming_up, ready, failed), 0 for the others", ("model", "state"))
GPU_ALLOCATED = Family("hybridserve_gpu_memory_allocated_bytes", "gauge", "CUDA memory allocated by tensors "
                       "on the model's device", ("model", "device"))
GPU_RESERVED = Family("hybridserve_gpu_memory_reserved_bytes", "gauge", "CUDA memory reserved by the caching "
                      "allocator on the model's device", ("model", "device"))
INT8_FALLBACK = Family("hybridserve_model_int8_fallback", "gauge", "1 when the spec asks for int8 and the model "
                       "serves fp32 (gate failed, no int8 kernels, no calibration images), else 0", M)
FAMILIES: tuple[Family, ...] = (
    REQUESTS, REQUEST_SECONDS, IN_FLIGHT, REQUEST_BYTES, RESPONSE_BYTES, QUEUE_SECONDS, PREPROCESS_SECONDS,
    COMPUTE_SECONDS, POSTPROCESS_SECONDS, BATCH_SIZE, BATCHES, QUEUED_ITEMS, CANCELLED_ITEMS, PIXELS, LOAD_SECONDS,
    COMPILE_SECONDS, WARMUP_SECONDS, MODEL_INFO, LATENCY_OBJECTIVE, MODEL_READY, MODEL_STATE, GPU_ALLOCATED,
    GPU_RESERVED, INT8_FALLBACK,
)
_VERBS = {"counter": "inc", "gauge": "set", "histogram": "observe"}


# ------------------------------------------------------------------ backends


class PrometheusClientBackend:
    """The families in a ``prometheus_client`` registry of this process (served at ``/metrics``)."""

    def __init__(self):
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()
        self.metrics: dict[str, Any] = {}
        for family in FAMILIES:
            extra = {"buckets": family.buckets} if family.kind == "histogram" else {}
            cls = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}[family.kind]
            self.metrics[family.name] = cls(family.name, family.help, family.labels, registry=self.registry, **extra)

    def record(self, family: Family, value: float, labels: dict[str, str]) -> None:
        getattr(self.metrics[family.name].labels(**labels), _VERBS[family.kind])(value)

    def declare(self, family: Family, labels: dict[str, str]) -> None:
        self.metrics[family.name].labels(**labels)

    def exposition(self) -> tuple[bytes, str]:
        import prometheus_client as pc

        return pc.generate_latest(self.registry), pc.CONTENT_TYPE_LATEST


class RayServeBackend:
    """The families as ``ray.serve.metrics``: exported by each node's Ray metrics agent.

    Ray's export drops a gauge series that was not set again within two report intervals (20 s by
    default), so a thread sets every gauge series again each ``GAUGE_REFRESH_S``: a model that is
    ready stays ready in Prometheus until its replica is gone.
    """

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
        self._gauges_lock = threading.Lock()
        threading.Thread(target=self._refresh_gauges, name="hybridserve-gauges", daemon=True).start()

    def record(self, family: Family, value: float, labels: dict[str, str]) -> None:
        getattr(self.metrics[family.name], _VERBS[family.kind])(value, tags=labels)
        if family.kind == "gauge":
            with self._gauges_lock:
                self._gauges[(family.name, *sorted(labels.items()))] = (family, value, labels)

    def declare(self, family: Family, labels: dict[str, str]) -> None:
        # Ray's public ``inc`` refuses 0; its ``_record`` adds 0 to the series with the replica's tags.
        self.metrics[family.name]._record(0.0, tags=labels)

    def _refresh_gauges(self) -> None:
        while True:
            time.sleep(self.GAUGE_REFRESH_S)
            with self._gauges_lock:
                current = list(self._gauges.values())
            for family, value, labels in current:
                try:
                    self.metrics[family.name].set(value, tags=labels)
                except Exception:  # keep refreshing the others
                    log.exception("refreshing %s failed", family.name)


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
        self.outcomes: list[InferenceOutcome] = []
        self.started = time.perf_counter()
        self._finished = False
        self._token = bind_request_id(request_id)
        self._span = start_span("hybridserve.ingress", api=api, model=self.model)
        _current.set(self)
        _in_flight[(self.model, api)] += 1
        _record(IN_FLIGHT, _in_flight[(self.model, api)], model=self.model, api=api)

    def answered(self, response: Any, outcomes: Sequence[InferenceOutcome] = ()) -> Any:
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

    def answered(self, response: Any, outcomes: Sequence[InferenceOutcome] = ()) -> Any:
        return response

    def failed(self, exc: BaseException) -> HybridServeError:
        return as_hybridserve_error(exc)

    def cancelled(self) -> None:
        pass


def _add_trailer(context: Any, key: str, value: str) -> None:
    """Add one trailing metadata entry to what the call already set (Ray Serve keeps its ``request_id``)."""
    kept = [(k, v) for k, v in context.trailing_metadata() if k not in (key, "request_id")]
    context.set_trailing_metadata([*kept, (key, value)])


def note_outcomes(outcomes: Sequence[InferenceOutcome]) -> None:
    """Attach data-plane outcomes (batch size, timings) to the request being observed in this task."""
    observation = _current.get()
    if observation is not None:
        observation.outcomes.extend(outcomes)


# ------------------------------------------------------------------ model runtime


def _set_state(model: str, state: str) -> None:
    for each in MODEL_STATES:
        _record(MODEL_STATE, 1.0 if each == state else 0.0, model=model, state=each)


@contextmanager
def load_stage(model: str, stage: str) -> Iterator[None]:
    """Time the ``compile`` or ``warmup`` stage of a load; the state gauge shows it while it runs."""
    _set_state(model, {"compile": "compiling", "warmup": "warming_up"}[stage])
    started = time.perf_counter()
    yield
    _record(COMPILE_SECONDS if stage == "compile" else WARMUP_SECONDS, time.perf_counter() - started, model=model)


def model_loaded(runtime: ModelRuntime) -> None:
    """After a load (ready or failed): load time, readiness, state, backend info, GPU memory."""
    spec = runtime.spec
    ready = runtime.status == "ready"
    _set_state(spec.name, "ready" if ready else "failed")
    _record(MODEL_READY, 1.0 if ready else 0.0, model=spec.name)
    _record(LOAD_SECONDS, runtime.load_seconds or 0.0, model=spec.name)
    _declare(CANCELLED_ITEMS, model=spec.name)
    _record(MODEL_INFO, 1.0, model=spec.name, task=spec.task, architecture=spec.architecture,
            backend=runtime.backend or "none", device=str(runtime.device))
    served = runtime.compiled.precision if runtime.compiled else None
    _record(INT8_FALLBACK, float(spec.compile.precision == "int8" and served != "int8"), model=spec.name)
    if spec.batching.latency_slo_ms is not None:
        _record(LATENCY_OBJECTIVE, spec.batching.latency_slo_ms / 1000.0, model=spec.name)
    gpu_memory(spec.name, runtime.device)


def gpu_memory(model: str, device: torch.device) -> None:
    if device.type != "cuda":
        return
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    name = f"cuda:{index}"
    _record(GPU_ALLOCATED, float(torch.cuda.memory_allocated(index)), model=model, device=name)
    _record(GPU_RESERVED, float(torch.cuda.memory_reserved(index)), model=model, device=name)


def queued_items(model: str, count: int) -> None:
    _record(QUEUED_ITEMS, float(count), model=model)


def items_cancelled(model: str, count: int) -> None:
    _record(CANCELLED_ITEMS, float(count), model=model)


def batch_done(model: str, queue_waits: Sequence[float], compute_s: float, device: torch.device) -> None:
    """One executed batch: its size, forward time, each item's queue wait (and GPU memory after it)."""
    _record(BATCHES, 1, model=model)
    _record(BATCH_SIZE, float(len(queue_waits)), model=model)
    _record(COMPUTE_SECONDS, compute_s, model=model)
    for wait in queue_waits:
        _record(QUEUE_SECONDS, wait, model=model)
    gpu_memory(model, device)
    if _get_tracer() is not None:
        finished = time.time_ns()
        formed = finished - int(compute_s * 1e9)
        trace_interval("hybridserve.forward", formed, finished, model=model, batch_size=len(queue_waits))
        for wait in queue_waits:
            trace_interval("hybridserve.queue", formed - int(wait * 1e9), formed, model=model)


def inference_done(model: str, items: Sequence[Any], timings: dict[str, float]) -> None:
    """One data-plane request finished: its preprocess and postprocess time, the pixels it fed the model."""
    _record(PREPROCESS_SECONDS, timings["preprocess"], model=model)
    _record(POSTPROCESS_SECONDS, timings["postprocess"], model=model)
    _record(PIXELS, float(sum(_pixels(item) for item in items)), model=model)


def _pixels(item: Any) -> int:
    tensor = item[0] if isinstance(item, tuple) else item  # full-reference pairs count once
    return int(tensor.shape[-1]) * int(tensor.shape[-2])


# ------------------------------------------------------------------ optional OpenTelemetry spans


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

"""The metric catalogue: every family hybridserve exports (docs/metrics.md describes each)."""

from __future__ import annotations

from dataclasses import dataclass

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

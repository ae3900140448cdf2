"""What the model runtime reports, as the engine's ``RuntimeObserver``: load stages, readiness, queue
depth, batches and per-request stage times, recorded through the metrics facade (and spans)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hybridserve.server.observability.families import (
    BATCHES,
    BATCH_SIZE,
    CANCELLED_ITEMS,
    COMPILE_SECONDS,
    COMPUTE_SECONDS,
    GPU_ALLOCATED,
    GPU_RESERVED,
    INT8_FALLBACK,
    LATENCY_OBJECTIVE,
    LOAD_SECONDS,
    MODEL_INFO,
    MODEL_READY,
    MODEL_STATE,
    MODEL_STATES,
    PIXELS,
    POSTPROCESS_SECONDS,
    PREPROCESS_SECONDS,
    QUEUED_ITEMS,
    QUEUE_SECONDS,
    WARMUP_SECONDS,
)
from hybridserve.server.observability.metrics import _declare, _record
from hybridserve.server.observability.tracing import _get_tracer, trace_interval


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


def model_loaded(runtime: Any) -> None:
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


def gpu_memory(model: str, device: Any) -> None:
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


def batch_done(model: str, queue_waits: Sequence[float], compute_s: float, device: Any) -> None:
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



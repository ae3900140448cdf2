"""ModelRuntime: one loaded model and its batched step, where the model computes.

``load`` builds, compiles and warms the model up (it is ready only after a warm-up request has
gone through preprocess, forward and postprocess); ``run_batch`` runs one batch of items. The
per-request pipeline around it is ``Endpoint``'s, wherever requests arrive: in this process, or
in an ingress replica that reaches this runtime's Ray deployment once per batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridserve.models import create_model
from hybridserve.server.engine.observer import NULL_OBSERVER, RuntimeObserver
from hybridserve.server.compiler.compile import CompileResult, compile_model
from hybridserve.server.core.errors import DeadlineExceeded, HybridServeError, InternalError
from hybridserve.server.tasks import TaskHandler, task_of
from hybridserve.server.core.images import ImageLimits
from hybridserve.server.core.spec import ModelSpec

log = logging.getLogger("hybridserve.runtime")
_entry_states = threading.Lock()  # the batch thread and the event loop both move entries on


@dataclass
class Entry:
    """One batch item on its way through the queue: ``queued``, then ``computing`` or ``cancelled``."""

    item: Any
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)
    state: str = "queued"

    def leave_queue(self, state: str) -> bool:
        """Move a queued entry to ``state``; False if it had left the queue already (the other side won)."""
        with _entry_states:
            if self.state != "queued":
                return False
            self.state = state
            return True


@dataclass
class BatchOutput:
    output: Any = None
    error: HybridServeError | None = None
    batch_size: int = 0
    queue_s: float = 0.0
    compute_s: float = 0.0


def batch_cost(outputs: Sequence[Any]) -> tuple[int, float] | None:
    """(items computed, compute seconds) of one batch, as ``run_batch`` reported it; None when
    nothing computed (every item expired or was cancelled) or the results are not ``BatchOutput``s."""
    for out in outputs:
        if isinstance(out, BatchOutput) and out.batch_size:
            return out.batch_size, out.compute_s
    return None


@dataclass(frozen=True)
class ModelState:
    """How a loaded model stands, as ``GET /v1/models/{name}`` reports it (picklable: it crosses Ray)."""

    status: str  # loading | ready | failed
    reason: str | None = None
    backend: str | None = None
    load_seconds: float | None = None
    device: str | None = None
    precision: str | None = None
    precision_reason: str | None = None
    fp32_layers: tuple[str, ...] = ()


@dataclass
class InferenceOutcome:
    """A finished request: its result plus what the server reports about how it ran."""

    result: Any
    batch_size: int
    timings: dict[str, float]


def model_threads(spec: ModelSpec) -> int:
    """Torch threads a model computes on: its spec's CPUs, at least one."""
    return max(1, int(spec.device.cpus))


def configure_threads(cpus: float) -> int:
    """Pin torch's intra-op threads to the CPUs this replica owns (oversubscription is ruinous)."""
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def work_pool(threads: int = 1) -> ThreadPoolExecutor:
    """The threads that preprocess and postprocess off the event loop, one pool per serving process.

    One thread unless the process has CPUs to spare beyond its models' torch threads: every thread
    in the pool contends for the GIL with the event loop and with the batch threads, whose eager
    forward needs the GIL between ops. asyncio's default pool (CPUs + 4 threads) cost an eager
    EfficientFormerV2-S0 15 % of its throughput in a 1-CPU replica (docs/performance.md)."""
    return ThreadPoolExecutor(max(1, threads), thread_name_prefix="hybridserve-work")


class ModelRuntime:
    def __init__(self, spec: ModelSpec, device: str | None = None, limits: ImageLimits | None = None,
                 observer: RuntimeObserver = NULL_OBSERVER):
        self.spec = spec
        self.device = torch.device(device or ("cuda" if spec.device.type == "cuda" else "cpu"))
        self.status = "loading"
        self.reason: str | None = None
        self.backend: str | None = None
        self.compiled: CompileResult | None = None
        self.load_seconds: float | None = None
        self.handler: TaskHandler | None = None
        self.limits = limits or ImageLimits()
        self.observer = observer

    # ------------------------------------------------------------ loading

    def load(self) -> None:
        """Build, compile and warm up the model. Failures are kept as status, never raised."""
        started = time.perf_counter()
        try:
            spec = self.spec
            loaded = create_model(
                spec.architecture,
                weights=spec.weights,
                weights_sha256=spec.weights_sha256,
                base_dir=spec.base_dir,
                args=spec.architecture_args,
            )
            loaded.module.to(self.device)
            handler = task_of(spec.task).handler(spec, loaded, self.device, self.limits)
            with self.observer.load_stage(spec.name, "compile"):
                self.compiled = compile_model(handler, spec.compile, self.device)
            handler.module, self.backend = self.compiled.module, self.compiled.backend
            self.handler = handler
            with self.observer.load_stage(spec.name, "warmup"):
                self._warm_up()
            self.status = "ready"
        except Exception as exc:  # a broken model must not take the server down
            self.status, self.reason = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", self.spec.name, self.reason)
        self.load_seconds = round(time.perf_counter() - started, 3)
        self.observer.model_loaded(self)
        cache = self.compiled.cache if self.compiled else None
        log.info("model %s %s in %.2fs (backend %s%s)", self.spec.name, self.status, self.load_seconds, self.backend,
                 f", compile cache {cache}" if cache else "")

    def _warm_up(self) -> None:
        """Run one request through the whole pipeline; compiled backends also run every batch size or bucket."""
        handler = self.handler
        prepared = handler.preprocess(handler.warmup_request())
        handler.postprocess(prepared, handler.forward(prepared.items))
        for size in self.compiled.warmup_sizes:
            handler.forward([self.compiled.example] * size)

    # ------------------------------------------------------------ serving

    def run_batch(self, entries: Sequence[Entry]) -> list[BatchOutput]:
        """The batched step: drop expired and cancelled items, run one forward, hand each item its output."""
        now = time.monotonic()
        live = [i for i, e in enumerate(entries)
                if (e.deadline is None or e.deadline > now) and e.leave_queue("computing")]
        # Expired items get the error; cancelled ones get it too, but nobody waits for their answer.
        results = [BatchOutput(error=DeadlineExceeded("deadline expired while queued")) for _ in entries]
        if not live:
            return results
        started = time.perf_counter()
        try:
            outputs = self.handler.forward([entries[i].item for i in live])
        except Exception as exc:
            log.exception("forward failed for model %s", self.spec.name)
            error = InternalError(f"model {self.spec.name!r} failed on this batch ({type(exc).__name__})")
            return [BatchOutput(error=error) for _ in entries]
        if len(outputs) != len(live):
            raise InternalError(f"{type(self.handler).__name__}.forward returned {len(outputs)} outputs for {len(live)} items")
        compute = time.perf_counter() - started
        self.observer.batch_done(self.spec.name, [now - entries[i].enqueued for i in live], compute, self.device)
        for index, output in zip(live, outputs):
            results[index] = BatchOutput(
                output=output, batch_size=len(live), queue_s=now - entries[index].enqueued, compute_s=compute,
            )
        return results

    def state(self) -> ModelState:
        compiled = self.compiled
        reason = compiled and (compiled.precision_reason or (compiled.gate or {}).get("reason"))
        return ModelState(self.status, self.reason, self.backend, self.load_seconds, self.device.type,
                          compiled.precision if compiled else None, reason or None,
                          tuple(compiled.fp32_layers) if compiled else ())

    def traits(self) -> dict:
        """What preprocess and postprocess need of the loaded model, without its weights (see ``Endpoint``)."""
        loaded = self.handler.loaded
        return {"architecture": loaded.architecture, "scale": loaded.scale, "pad_multiple": loaded.pad_multiple,
                "in_channels": loaded.in_channels, "extra": {**loaded.extra, "min_size": self.handler.min_side}}

"""The ingress side of the per-batch Ray hop: a remote model as an ``Endpoint`` sees it.

``RayBatcher`` forms micro-batches in the ingress replica (the same loop as in-process) and sends
each batch as ONE handle call to the model's deployment: items cross as numpy arrays (Ray's
object store passes them without copies), each with the seconds left before its deadline (clocks
are not shared across nodes). Items whose request was cancelled, or whose deadline has passed,
are dropped before the hop. Per-item errors come back per item; a batch whose replica failed or
vanished answers 503 (``model_not_ready``, Retry-After) for each of its items.

``RemoteModel`` asks a replica how the model stands and, once it is ready, builds the task
handler from the traits the replica reports (scale, padding, minimum size), so the ingress
decodes and preprocesses without holding the weights.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import torch

from hybridserve.models import LoadedModel
from hybridserve.server.core.errors import DeadlineExceeded, HybridServeError, ModelNotReady, as_hybridserve_error
from hybridserve.server.core.images import ImageLimits
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.engine.batching import BATCHES_IN_FLIGHT, Batcher
from hybridserve.server.engine.runtime import BatchOutput, Entry, ModelState
from hybridserve.server.tasks import TaskHandler, task_of

INFO_TIMEOUT_S = 2.0


def to_arrays(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, tuple):
        return tuple(to_arrays(part) for part in value)
    return value


def to_tensors(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value if value.flags.writeable else value.copy())
    if isinstance(value, tuple):
        return tuple(to_tensors(part) for part in value)
    return value


def batch_payload(entries: list[Entry]) -> list[tuple[Any, float | None]]:
    """What crosses the hop: each item's arrays and the seconds left before its deadline."""
    now = time.monotonic()
    return [(to_arrays(e.item), None if e.deadline is None else e.deadline - now) for e in entries]


def batch_entries(payload: list[tuple[Any, float | None]]) -> list[Entry]:
    """The replica's side of ``batch_payload``: entries with deadlines on this node's clock."""
    now = time.monotonic()
    return [Entry(to_tensors(item), None if left is None else now + left) for item, left in payload]


class RayBatcher(Batcher):
    def __init__(self, spec: ModelSpec, handle: Any):
        self.spec = spec
        self.handle = handle
        batching = spec.batching
        super().__init__(self._execute, batching.max_batch_size, batching.max_wait_ms, batching.latency_slo_ms,
                         max_in_flight=BATCHES_IN_FLIGHT, tune=batching.tune)

    async def _execute(self, entries: list[Entry]) -> list[BatchOutput]:
        now = time.monotonic()
        results: list[BatchOutput | None] = [None] * len(entries)
        live = []
        for index, entry in enumerate(entries):
            if entry.deadline is not None and entry.deadline <= now:
                results[index] = BatchOutput(error=DeadlineExceeded("deadline expired while queued"))
            elif entry.leave_queue("computing"):
                live.append(index)
            else:  # cancelled: nobody waits for it
                results[index] = BatchOutput()
        if live:
            for index, out in zip(live, await self._call([entries[i] for i in live])):
                results[index] = out
        return results

    async def _call(self, entries: list[Entry]) -> list[BatchOutput]:
        try:
            outputs = await self.handle.run_batch.remote(batch_payload(entries))
        except (Exception, asyncio.CancelledError) as exc:
            # Ray cancels a call whose replica died; only a cancellation of this batch task is ours.
            if isinstance(exc, asyncio.CancelledError) and asyncio.current_task().cancelling():
                raise
            error = as_hybridserve_error(exc)
            if not isinstance(error, HybridServeError) or error.code == "internal":
                error = ModelNotReady(f"model {self.spec.name!r} is unavailable ({type(exc).__name__})",
                                      retry_after=1.0)
            return [BatchOutput(error=error) for _ in entries]
        for out in outputs:
            out.output = to_tensors(out.output)
        return outputs


class RemoteModel:
    """A model served by its own deployment: its state from a replica, a handler from its traits."""

    def __init__(self, spec: ModelSpec, handle: Any, limits: ImageLimits):
        self.spec = spec
        self.handle = handle
        self.limits = limits
        self.handler: TaskHandler | None = None

    async def state(self) -> ModelState:
        try:
            state, traits = await asyncio.wait_for(self.handle.describe.remote(), INFO_TIMEOUT_S)
        except (Exception, asyncio.CancelledError) as exc:  # still loading, or its replica died
            if isinstance(exc, asyncio.CancelledError) and asyncio.current_task().cancelling():
                raise
            return ModelState("loading", reason=f"no replica answered ({type(exc).__name__})")
        if state.status == "ready" and self.handler is None:
            loaded = LoadedModel(module=None, **traits)
            self.handler = task_of(self.spec.task).handler(self.spec, loaded, torch.device("cpu"), self.limits)
        return state

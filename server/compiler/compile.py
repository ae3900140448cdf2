"""Compile backends: turn an eager module into the fastest one the hardware and model allow.

``compile_model`` builds the serving callable with ``eager`` (the reference), ``inductor``
(``torch.compile``), ``aot`` (``torch.export`` + AOTInductor ``.pt2``) or ``tensorrt``
(torch-tensorrt's dynamo path, CUDA only). A backend that is unavailable or fails falls back
along tensorrt → aot → inductor → eager with one warning naming every reason; never a crash.

A compiled program serves the model's item shape with a dynamic batch (exported from a batch-2
example, ``Dim("batch", min=1, max=max_batch_size)``) or, where that fails or the spec lists
``compile.batch_buckets``, one static program per bucket with batches padded up to it; items
of other shapes run eager. Artifacts are cached under ``$HYBRIDSERVE_CACHE/compiled/<key>/``;
every compiled model is checked against eager at load time and a mismatch fails the load.
``precision: int8`` (CPU) goes through ``int8.build_int8`` first: calibrated PT2E
quantisation, verified int8 kernels and an accuracy gate; where that fails the model is
served in fp32 with one warning, a metric and the reason. docs/performance.md has the details.

The parts: ``runner`` (serving compiled programs, the eager cross-check), ``backends`` (the
builders), ``artifacts`` (cache key and store), ``aot`` (AOTInductor packages), and for int8
``quantize``, ``calibration``, ``gate`` and ``kernels``.
"""

from __future__ import annotations

import logging
import shutil
import time

import torch
from torch import nn

from hybridserve.server.compiler.artifacts import ArtifactStore, artifact_key
from hybridserve.server.compiler.backends import BUILDERS, availability
from hybridserve.server.compiler.int8 import build_int8
from hybridserve.server.compiler.runner import (
    BatchRunner, CompileMismatch, CompileResult, check_against_eager, example_batch, example_item,
)
from hybridserve.server.core.spec import Compile
from hybridserve.server.tasks.base import Item, TaskHandler

log = logging.getLogger("hybridserve.compile")

FALLBACK_ORDER = ("tensorrt", "aot", "inductor", "eager")


# ---------------------------------------------------------------- entry point


def _serving_module(handler: TaskHandler, config: Compile, device: torch.device) -> tuple[nn.Module, str]:
    module, precision = handler.module, config.precision
    if precision in ("fp16", "bf16"):
        if device.type == "cpu":
            log.warning("precision %s is not used on CPU (slower than fp32 here); serving fp32", precision)
            handler.dtype, precision = torch.float32, "fp32"
        else:
            module = module.to(handler.dtype)
    return module, precision


def compile_model(handler: TaskHandler, config: Compile, device: torch.device) -> CompileResult:
    """Build the serving callable with ``config.backend`` or the first fallback that works."""
    eager, precision = _serving_module(handler, config, device)
    item = example_item(handler)
    reason = gate = None
    if precision == "int8":
        quantized, reason, gate = build_int8(handler, eager, config, item)
        if quantized is not None:
            return quantized
        log.warning("model %s: int8 not served (%s); serving fp32", handler.spec.name, reason)
        precision = "fp32"
    chain = FALLBACK_ORDER[FALLBACK_ORDER.index(config.backend):]
    failures: list[str] = []
    result = None
    for backend in chain[:-1]:
        try:
            availability(backend, device)
            result = _compiled(handler, eager, backend, config, precision, item)
            break
        except CompileMismatch:
            raise
        except Exception as exc:
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{backend}: {type(exc).__name__}{': ' + cause[:300] if cause else ''}")
    if result is None:
        result = CompileResult(eager, "eager", None, (), item)
    if failures:
        log.warning("model %s: compile backend %r not used (%s); serving with %r", handler.spec.name,
                    config.backend, "; ".join(failures), result.backend)
    result.precision, result.precision_reason, result.gate = precision, reason, gate
    return result


def _compiled(handler: TaskHandler, eager: nn.Module, backend: str, config: Compile, precision: str,
              item: Item) -> CompileResult:
    spec, device, dtype = handler.spec, handler.device, handler.dtype
    max_batch = spec.batching.max_batch_size
    buckets = config.batch_buckets
    parts = item if isinstance(item, tuple) else (item,)
    item_shapes = tuple(tuple(p.shape) for p in parts)
    shapes = {"items": item_shapes, "max_batch": max_batch, "buckets": buckets}
    key, fields = artifact_key(handler, eager, backend, shapes, precision)
    store = ArtifactStore(key)

    def examples(size: int) -> tuple[torch.Tensor, ...]:
        return example_batch(item, size, device, dtype)

    def checks(runner: BatchRunner) -> list[tuple[torch.Tensor, ...]]:  # every program, and the padding
        return [examples(n) for n in sorted({1, min(3, max_batch), *runner.buckets})]

    meta = store.meta()
    if meta is not None:
        started = time.perf_counter()
        try:
            programs, _ = BUILDERS[backend](eager, examples, max_batch, buckets, store.path, meta)
            runner = BatchRunner(programs, eager, item_shapes, max_batch)
            check_against_eager(eager, runner, checks(runner), precision, spec.name)
            log.info("model %s: loaded %s artifact %s in %.2fs (cache hit)", spec.name, backend, store.path,
                     time.perf_counter() - started)
            return CompileResult(runner, backend, "hit", runner.warmup_sizes, item, store.path)
        except Exception as exc:  # stale or unreadable artifact: build it again
            log.warning("model %s: cached %s artifact %s unusable (%s: %s); rebuilding", spec.name, backend,
                        store.path, type(exc).__name__, exc)
            store.discard()
    started = time.perf_counter()
    staging = store.staging()
    try:
        programs, files = BUILDERS[backend](eager, examples, max_batch, buckets, staging, None)
        runner = BatchRunner(programs, eager, item_shapes, max_batch)
        error = check_against_eager(eager, runner, checks(runner), precision, spec.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    store.commit(staging, {**fields, "files": files, "max_relative_error": error,
                           "compile_seconds": round(time.perf_counter() - started, 3)})
    log.info("model %s: compiled with %s in %.2fs (cache miss; artifact %s; max relative error vs eager %.2g)",
             spec.name, backend, time.perf_counter() - started, store.path, error)
    return CompileResult(runner, backend, "miss", runner.warmup_sizes, item, store.path)

"""``precision: int8`` on CPU: calibrate, quantise, keep the layers that break the gate in fp32, compile, verify.

``build_int8`` returns the int8 ``CompileResult`` or, where no int8 build passes, ``None``
with the reason; ``compile_model`` then serves fp32. The steps, for each compiled backend of
the fallback chain (``aot``, ``inductor``):

1. export the fp32 model, quantise it (``quantize``) on the calibration items and measure
   the simulated int8 graph with the gate (``gate``); if it fails, rank the layers by
   ``sensitivity`` and keep the 1, 2, 4, ... most sensitive in fp32 until it passes or
   ``accuracy_gate.max_fp32_layers`` is reached;
2. where the simulated graph passes, compile it with freezing (Inductor fuses the quantise
   steps into oneDNN int8 kernels), check that the program calls int8 kernels (``kernels``),
   and run the gate again on the compiled program, the one that will serve;
3. cache it all under one key (weights, code, shapes, calibration images and settings, gate
   settings and data, torch and torchao versions): a later load reuses the quantised graph,
   the compiled artifact and the gate's verdict, pass or fail.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hybridserve.models.weights import cache_dir
from hybridserve.server.compiler import calibration
from hybridserve.server.compiler.artifacts import ArtifactStore, artifact_key, version
from hybridserve.server.compiler.backends import BUILDERS, availability
from hybridserve.server.compiler.gate import Gate, GateReport, item_batches
from hybridserve.server.compiler.kernels import MissingInt8Kernels, verify_int8
from hybridserve.server.compiler.quantize import (
    export_graph, has_vnni, quantizable_layers, quantize, register_quantized_ops,
)
from hybridserve.server.compiler.sensitivity import sensitivity
from hybridserve.server.compiler.runner import (
    BatchRunner, CompileResult, default_buckets, example_batch, max_relative_error,
)
from hybridserve.server.core.spec import Compile
from hybridserve.server.tasks.base import InferenceRequest, Item, TaskHandler

log = logging.getLogger("hybridserve.compile")
INT8_BACKENDS = ("aot", "inductor")
PROBE_ITEMS = 8
OUTPUT_TOLERANCE = 1e-3  # a cached int8 program against the outputs it gave when built


class _Freezing:
    """A torch.compile program that always (re)compiles with freezing on, the setting int8 fusion needs."""

    def __init__(self, program: Callable[..., Any]):
        self.program = program

    def __call__(self, *inputs: torch.Tensor) -> Any:
        with torch._inductor.config.patch(freezing=True):
            return self.program(*inputs)


def _items(handler: TaskHandler, arrays: list, shape: tuple, count: int) -> list[Item]:
    """Preprocessed items of the compiled item shape (restoration: full tiles only)."""
    items: list[Item] = []
    for array in arrays:
        for item in handler.preprocess(InferenceRequest(image=array)).items:
            parts = item if isinstance(item, tuple) else (item,)
            if tuple(tuple(p.shape) for p in parts) == shape:
                items.append(item)
    if not items:
        raise calibration.CalibrationError(f"model {handler.spec.name!r}: no calibration image gives an item of "
                                           f"the served shape {shape}")
    return items[:count]


def _search(graph: torch.fx.GraphModule, batches: list, probe: list, config: Compile, gate: Gate,
            serve: Callable[[torch.fx.GraphModule], Callable[..., Any]]
            ) -> tuple[torch.fx.GraphModule, list[str], GateReport, int]:
    """Quantise; while the simulated graph fails the gate, keep more of the most sensitive layers in fp32.

    ``serve`` wraps a graph as the server would run it (items of other shapes go to eager)."""
    layers = quantizable_layers(graph)
    if not layers:
        raise MissingInt8Kernels("the model has no conv or linear layer to run in int8")
    limit = config.accuracy_gate.max_fp32_layers
    limit = len(layers) - 1 if limit is None else min(limit, len(layers) - 1)
    quantized = quantize(graph, batches, config.calibration)
    report = gate.check(serve(quantized))
    fp32: list[str] = []
    if not report.passed and limit > 0:
        ranked = [name for name, _ in sensitivity(graph, quantized, layers, probe)]
        keep = 1
        while not report.passed:
            fp32 = ranked[:keep]
            quantized = quantize(graph, batches, config.calibration, fp32)
            report = gate.check(serve(quantized))
            log.info("int8 gate with %d layer(s) in fp32: %s", keep, report.reason)
            if keep >= limit:
                break
            keep = min(2 * keep, limit)
    return quantized, fp32, report, len(layers) - len(fp32)


def build_int8(handler: TaskHandler, eager: nn.Module, config: Compile,
               item: Item) -> tuple[CompileResult | None, str | None, dict[str, Any] | None]:
    """The int8 build of the first backend that gives one, else ``(None, reason, gate report or None)``."""
    spec, device = handler.spec, handler.device
    parts = item if isinstance(item, tuple) else (item,)
    shape = tuple(tuple(p.shape) for p in parts)
    failures: list[str] = []
    try:
        if device.type != "cpu":
            raise NotImplementedError("int8 is built for CPUs (oneDNN) only in this version")
        arrays = calibration.images(spec, config.calibration.images, config.calibration.count)
        cal_items = _items(handler, arrays, shape, config.calibration.count)
        gate_arrays = arrays if config.accuracy_gate.images is None else calibration.images(
            spec, config.accuracy_gate.images, config.accuracy_gate.count)
        gate = Gate(handler, config, _items(handler, gate_arrays, shape, config.accuracy_gate.count),
                    cache_dir() / "int8")
    except (calibration.CalibrationError, NotImplementedError, OSError) as exc:
        return None, str(exc), None
    extra = {"int8": {"calibration": calibration.digest(arrays), "gate_images": calibration.digest(gate_arrays),
                      "settings": config.calibration.model_dump(), "gate": config.accuracy_gate.model_dump(),
                      "torchao": version("torchao"), "vnni": has_vnni()}}
    chain = [b for b in ("tensorrt", "aot", "inductor")[("tensorrt", "aot", "inductor").index(config.backend):]
             if b in INT8_BACKENDS]
    for backend in chain:
        try:
            availability(backend, device)
            return _build(handler, eager, backend, config, item, shape, cal_items, gate, extra), None, None
        except _GateFailed as failed:
            return None, failed.report["reason"], failed.report
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{backend}: {type(exc).__name__}{': ' + reason[:300] if reason else ''}")
    return None, "; ".join(failures), None


class _GateFailed(Exception):
    def __init__(self, report: dict[str, Any]):
        super().__init__(report["reason"])
        self.report = report


def _build(handler, eager, backend, config, item, shape, cal_items, gate, extra) -> CompileResult:
    spec = handler.spec
    max_batch = spec.batching.max_batch_size
    key, fields = artifact_key(handler, eager, backend, {"items": shape, "max_batch": max_batch,
                                                         "buckets": config.batch_buckets}, "int8", extra)
    store = ArtifactStore(key)

    def examples(size: int) -> tuple[torch.Tensor, ...]:
        return example_batch(item, size, handler.device, torch.float32)

    meta = store.meta()
    if meta is not None and not meta["gate"]["passed"]:
        raise _GateFailed(meta["gate"])
    started = time.perf_counter()
    phases: dict[str, float] = {}  # seconds of each step of a build: where an int8 build's time goes

    def lap(phase: str) -> None:
        phases[phase] = round(time.perf_counter() - started - sum(phases.values()), 3)

    folder = store.path if meta is not None else store.staging()
    try:
        if meta is None:
            graph = export_graph(eager, examples(min(2, max_batch)), max_batch)
            batches = item_batches(cal_items, max_batch)
            quantized, fp32, simulated, layers = _search(
                graph, batches, item_batches(cal_items[:PROBE_ITEMS], max_batch), config, gate,
                lambda g: BatchRunner({None: g}, eager, shape, max_batch))
            lap("quantize_and_gate")
            if not simulated.passed:  # the fused program would fail too: record the verdict, compile nothing
                report = {**simulated.to_dict(), "simulated": simulated.to_dict()}
                store.commit(folder, {**fields, "files": {}, "fp32_layers": fp32, "gate": report, "phases": phases,
                                      "compile_seconds": round(time.perf_counter() - started, 3)})
                raise _GateFailed(report)
            program = torch.export.export(quantized, examples(min(2, max_batch)), strict=False, dynamic_shapes=tuple(
                {0: torch.export.Dim("batch", min=1, max=max_batch)} for _ in examples(1)))
            torch.export.save(program, folder / "quantized.pt2")
        else:
            register_quantized_ops()
            quantized, fp32, simulated, layers = (torch.export.load(folder / "quantized.pt2").module(),
                                                  meta["fp32_layers"], None, meta["kernels"]["quantized_layers"])
        # Freezing (which fuses the int8 kernels) applies only without autograd: AOTInductor exports
        # and compiles a graph recorded with grad on as plain fp32 (the pytorch/ao#4566 trap).
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            # Static buckets: under a symbolic batch Inductor's int8 conv layouts break (a stride
            # assertion) and AOTInductor's int8 program drifts (24 dB SNR where the graph gives 54).
            buckets = config.batch_buckets or default_buckets(max_batch)
            programs, files = BUILDERS[backend](quantized, examples, max_batch, buckets, folder, meta)
        lap("compile")
        if backend == "inductor":
            programs = {size: _Freezing(p) for size, p in programs.items()}
        runner = BatchRunner(programs, eager, shape, max_batch)
        kernels = verify_int8(backend, programs, files, folder, examples, layers)
        lap("verify")
        probe = examples(min(3, max_batch))
        with torch.inference_mode():
            outputs = runner(*probe)
        if meta is not None:
            error = max_relative_error(torch.load(folder / "outputs.pt", weights_only=True), outputs)
            if error > OUTPUT_TOLERANCE:
                raise RuntimeError(f"cached int8 artifact gives other outputs than when built (error {error:.3g})")
            report = meta["gate"]
        else:
            torch.save(outputs, folder / "outputs.pt")
            report = {**gate.check(runner).to_dict(), "simulated": simulated.to_dict()}
            lap("gate")
    except _GateFailed:
        raise
    except BaseException:
        if meta is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if meta is None:
        store.commit(folder, {**fields, "files": files, "fp32_layers": fp32, "kernels": kernels, "gate": report,
                              "phases": phases, "compile_seconds": round(time.perf_counter() - started, 3)})
        if not report["passed"]:
            raise _GateFailed(report)
    log.info("model %s: int8 %s build %s in %.2fs (%s; %d int8 kernels, %d layer(s) in fp32; gate: %s)", spec.name,
             backend, "loaded" if meta is not None else "made", time.perf_counter() - started,
             ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()), kernels["kernels"], len(fp32), report["reason"])
    return CompileResult(runner, backend, "hit" if meta is not None else "miss", runner.warmup_sizes, item,
                         store.path, precision="int8", fp32_layers=tuple(fp32), gate=report)


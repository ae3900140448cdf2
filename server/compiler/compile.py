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
docs/performance.md has the details.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hybridserve.models.weights import cache_dir
from hybridserve.server.compiler.aot import load_package, probe_package
from hybridserve.server.tasks.base import InferenceRequest, Item, TaskHandler
from hybridserve.server.core.spec import Compile

log = logging.getLogger("hybridserve.compile")

FALLBACK_ORDER = ("tensorrt", "aot", "inductor", "eager")
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 1e-2}
Program = Callable[..., Any]


class CompileMismatch(RuntimeError):
    """A compiled model's outputs differ from eager beyond the precision's tolerance."""


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (library not installed, no CUDA device)."""


@dataclass
class CompileResult:
    """What ``compile_model`` hands the runtime: the callable to serve and how it was built."""

    module: Callable[..., Any]
    backend: str
    cache: str | None  # "hit", "miss", or None for eager
    warmup_sizes: tuple[int, ...]
    example: Item
    artifact: Path | None = None


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


class BatchRunner:
    """Serves batches with compiled programs: pads to buckets, splits big batches, sends odd shapes to eager.

    ``programs`` maps a static batch size to its program, or ``None`` to one program that takes
    any batch from 1 to ``max_batch``.
    """

    def __init__(self, programs: dict[int | None, Program], eager: nn.Module,
                 item_shapes: tuple[tuple[int, ...], ...], max_batch: int):
        self.programs = programs
        self.eager = eager
        self.item_shapes = item_shapes
        self.buckets = tuple(sorted(size for size in programs if size is not None))
        self.dynamic = None in programs
        self.limit = max_batch if self.dynamic else self.buckets[-1]

    @property
    def warmup_sizes(self) -> tuple[int, ...]:
        if self.dynamic:
            return tuple(sorted({1, min(2, self.limit), self.limit}))
        return self.buckets

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if tuple(tuple(t.shape[1:]) for t in inputs) != self.item_shapes:
            return self.eager(*inputs)
        count = inputs[0].shape[0]
        if count > self.limit:
            parts = [self(*(t[i:i + self.limit] for t in inputs)) for i in range(0, count, self.limit)]
            return _map_outputs(lambda *chunks: torch.cat(chunks), *parts)
        if self.dynamic:
            return self.programs[None](*inputs)
        size = next(s for s in self.buckets if s >= count)
        if size > count:  # repeat the last item: real values keep every layer in its normal range
            inputs = tuple(torch.cat([t, t[-1:].expand(size - count, *t.shape[1:])]) for t in inputs)
        return _map_outputs(lambda out: out[:count], self.programs[size](*inputs))


def _map_outputs(fn: Callable[..., torch.Tensor], *outputs: Any) -> Any:
    """Apply ``fn`` leaf-wise to one or more outputs of the same structure (tensor, tuple, list, dict)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return fn(*outputs)
    if isinstance(first, dict):
        return {key: _map_outputs(fn, *(o[key] for o in outputs)) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_map_outputs(fn, *parts) for parts in zip(*outputs))
    return first


def _leaves(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [leaf for key in sorted(output) for leaf in _leaves(output[key])]
    if isinstance(output, (tuple, list)):
        return [leaf for part in output for leaf in _leaves(part)]
    return []


def max_relative_error(reference: Any, candidate: Any) -> float:
    """Largest absolute difference over each output's largest magnitude; inf if structure or shape differ."""
    expected, actual = _leaves(reference), _leaves(candidate)
    if len(expected) != len(actual):
        return float("inf")
    worst = 0.0
    for ref, got in zip(expected, actual):
        if ref.shape != got.shape:
            return float("inf")
        if not ref.is_floating_point():
            if not torch.equal(ref.cpu(), got.cpu()):
                return float("inf")
            continue
        ref, got = ref.detach().float().cpu(), got.detach().float().cpu()
        if not torch.isfinite(got).all() and not torch.equal(torch.isfinite(ref), torch.isfinite(got)):
            return float("inf")
        scale = ref.abs().nan_to_num(0.0, 0.0, 0.0).max().clamp_min(1e-6)
        worst = max(worst, float(((ref - got).abs().nan_to_num(0.0, 0.0, 0.0).max() / scale)))
    return worst


def check_against_eager(eager: nn.Module, compiled: Callable[..., Any], batches: Sequence[tuple[torch.Tensor, ...]],
                        precision: str, name: str) -> float:
    """Run every batch through both; raise CompileMismatch beyond the precision's tolerance."""
    tolerance = TOLERANCE[precision]
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            error = max_relative_error(eager(*batch), compiled(*batch))
            if error > tolerance:
                raise CompileMismatch(
                    f"compiled model {name!r} differs from eager at batch {batch[0].shape[0]}: max relative "
                    f"error {error:.3g} > {tolerance:g} ({precision})")
            worst = max(worst, error)
    return worst


# ---------------------------------------------------------------- examples and keys


def example_item(handler: TaskHandler) -> Item:
    """One preprocessed item of the shape the model serves (a full restoration tile, or the input size)."""
    request = handler.warmup_request()
    if handler.spec.task == "restoration":
        side = max(handler.spec.preprocessing.tile, handler.min_side)
        image = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        request = InferenceRequest(image=image, reference=image if handler.spec.needs_reference else None)
    return handler.preprocess(request).items[0]


def example_batch(item: Item, size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``size`` distinct items derived from ``item`` (deterministic), as model inputs."""
    parts = item if isinstance(item, tuple) else (item,)
    generator = torch.Generator().manual_seed(size)
    batch = []
    for part in parts:
        rows = part.unsqueeze(0).repeat(size, *([1] * part.dim()))
        noise = torch.rand(rows.shape, generator=generator) * 0.1
        noise[0] = 0
        batch.append((rows + noise).to(device, dtype))
    return tuple(batch)


def _weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _code_digest(module: nn.Module) -> str:
    """Hash of the module's class names and of the source files defining them (torch's by its version)."""
    torch_root = str(Path(torch.__file__).parent)
    files = set()
    names = sorted({f"{type(sub).__module__}.{type(sub).__qualname__}" for sub in module.modules()})
    for sub in module.modules():
        try:
            source = inspect.getsourcefile(type(sub))
        except TypeError:
            continue
        if source and not source.startswith(torch_root):
            files.add(source)
    digest = hashlib.sha256(";".join(names).encode())
    for path in sorted(files):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}"
    return f"cpu:{torch.backends.cpu.get_cpu_capability()}:{platform.machine()}"


def artifact_key(handler: TaskHandler, eager: nn.Module, backend: str, shapes: dict[str, Any],
                 precision: str) -> tuple[str, dict[str, Any]]:
    """The cache key of a compiled artifact and the fields it was made from."""
    spec = handler.spec
    fields = {
        "backend": backend,
        "architecture": spec.architecture,
        "architecture_args": spec.architecture_args,
        "weights": _weights_digest(eager),
        "code": _code_digest(eager),
        "shapes": shapes,
        "precision": precision,
        "device": _device_name(handler.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_tensorrt": _version("torch-tensorrt") if backend == "tensorrt" else None,
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], fields


class ArtifactStore:
    """One cache entry: a folder with the artifact files and ``meta.json``, written atomically."""

    def __init__(self, key: str, root: Path | None = None):
        self.root = root or cache_dir() / "compiled"
        self.path = self.root / key

    def meta(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def staging(self) -> Path:
        folder = self.root / f".{self.path.name}.{os.getpid()}.tmp"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def commit(self, staging: Path, meta: dict[str, Any]) -> None:
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        try:
            os.rename(staging, self.path)
        except OSError:  # another replica committed the same key first
            shutil.rmtree(staging, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------- backends


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], max_batch: int,
            batch: int | None) -> torch.export.ExportedProgram:
    """Export with a dynamic batch (``batch=None``, from a batch-2 example) or a static one."""
    if batch is None:
        dim = torch.export.Dim("batch", min=1, max=max_batch)
        return torch.export.export(module, example, dynamic_shapes=tuple({0: dim} for _ in example), strict=False)
    return torch.export.export(module, example, strict=False)


def _build_aot(module, examples, max_batch, buckets, folder, meta):
    """AOTInductor ``.pt2`` packages: one dynamic-batch package, else one per bucket."""
    from torch._inductor import aoti_compile_and_package

    if meta is not None:
        return {(None if key == "dynamic" else int(key)):
                load_package(folder / name, examples(min(2, max_batch) if key == "dynamic" else int(key)))
                for key, name in meta["files"].items()}, meta["files"]
    files: dict[str, str] = {}
    if buckets is None:
        try:
            program = _export(module, examples(min(2, max_batch)), max_batch, None)
            files["dynamic"] = Path(aoti_compile_and_package(program, package_path=str(folder / "dynamic.pt2"))).name
        except Exception as exc:  # e.g. an architecture that fixes the batch through int(...)
            log.info("dynamic-batch export failed (%s: %s); compiling static batch buckets",
                     type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            buckets = default_buckets(max_batch)
    for size in buckets or ():
        program = _export(module, examples(size), max_batch, size)
        files[str(size)] = Path(aoti_compile_and_package(program, package_path=str(folder / f"b{size}.pt2"))).name
    for key, name in files.items():  # a loader that crashes fails this backend, not the server
        probe_package(folder / name, examples(min(2, max_batch) if key == "dynamic" else int(key)))
    return _build_aot(module, examples, max_batch, buckets, folder, {"files": files})


def _build_inductor(module, examples, max_batch, buckets, folder, meta):
    """torch.compile; the inductor cache blob makes a warm start skip code generation and C++ builds."""
    blob = folder / "inductor.bin"
    if meta is not None and blob.is_file():
        torch.compiler.load_cache_artifacts(blob.read_bytes())
    dynamic = buckets is None if meta is None else "dynamic" in meta["files"]
    sizes = buckets or default_buckets(max_batch)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, len(sizes) + 4)
    programs: dict[int | None, Program] = {}
    with torch.inference_mode():
        if dynamic:
            compiled = torch.compile(module)
            first = examples(min(2, max_batch))
            for tensor in first:
                torch._dynamo.mark_dynamic(tensor, 0)
            try:
                compiled(*first)
                for size in sorted({1, max_batch}):
                    compiled(*examples(size))
                programs[None] = compiled
            except Exception as exc:  # the model fixes its batch size: static buckets
                log.info("dynamic-batch compile failed (%s); compiling static batch buckets", type(exc).__name__)
                dynamic = False
        if not dynamic:
            compiled = torch.compile(module, dynamic=False)
            for size in sizes:
                compiled(*examples(size))
                programs[size] = compiled
    if meta is None:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            blob.write_bytes(saved[0])
    return programs, {"dynamic" if dynamic else "static": blob.name}


def _build_tensorrt(module, examples, max_batch, buckets, folder, meta):
    """torch-tensorrt dynamo path, one engine with min/opt/max batch; saved as an exported program."""
    path = folder / "tensorrt.ep"
    if meta is None:
        import torch_tensorrt

        example = examples(min(2, max_batch))
        inputs = [torch_tensorrt.Input(min_shape=(1, *t.shape[1:]), opt_shape=(max(1, max_batch // 2), *t.shape[1:]),
                                       max_shape=(max_batch, *t.shape[1:]), dtype=t.dtype) for t in example]
        program = _export(module, example, max_batch, None)
        engine = torch_tensorrt.dynamo.compile(program, arg_inputs=inputs, use_explicit_typing=True,
                                               min_block_size=1, device=example[0].device)
        torch_tensorrt.save(engine, str(path), output_format="exported_program", arg_inputs=inputs)
    return {None: torch.export.load(str(path)).module()}, {"dynamic": path.name}


BUILDERS = {"aot": _build_aot, "inductor": _build_inductor, "tensorrt": _build_tensorrt}


def _availability(backend: str, device: torch.device) -> None:
    if backend == "tensorrt":
        if device.type != "cuda":
            raise BackendUnavailable("needs a CUDA device")
        if importlib.util.find_spec("torch_tensorrt") is None:
            raise BackendUnavailable("torch-tensorrt is not installed (pip install 'hybridserve[tensorrt]')")
    if backend in ("aot", "inductor") and device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise BackendUnavailable("no C++ compiler on PATH")


# ---------------------------------------------------------------- entry point


def _serving_module(handler: TaskHandler, config: Compile, device: torch.device) -> tuple[nn.Module, str]:
    module, precision = handler.module, config.precision
    if precision != "fp32":
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
    chain = FALLBACK_ORDER[FALLBACK_ORDER.index(config.backend):]
    failures: list[str] = []
    result = None
    for backend in chain[:-1]:
        try:
            _availability(backend, device)
            result = _compiled(handler, eager, backend, config, precision, item)
            break
        except CompileMismatch:
            raise
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{backend}: {type(exc).__name__}{': ' + reason[:300] if reason else ''}")
    if result is None:
        result = CompileResult(eager, "eager", None, (), item)
    if failures:
        log.warning("model %s: compile backend %r not used (%s); serving with %r", handler.spec.name,
                    config.backend, "; ".join(failures), result.backend)
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

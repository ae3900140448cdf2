"""Compile backends: ``aot`` (torch.export + AOTInductor), ``inductor`` (torch.compile), ``tensorrt``.

Each builder takes the module, a function giving example batches, the largest batch, the
static buckets (``None``: one dynamic batch dimension), the artifact folder and the cached
``meta`` (``None``: build now), and returns ``{batch size or None: program}`` and the files
it wrote. ``availability`` raises ``BackendUnavailable`` where a backend cannot run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from hybridserve.server.compiler.aot import load_package, probe_package
from hybridserve.server.compiler.runner import Program, default_buckets

log = logging.getLogger("hybridserve.compile")


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (library not installed, no CUDA device)."""


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


def availability(backend: str, device: torch.device) -> None:
    if backend == "tensorrt":
        if device.type != "cuda":
            raise BackendUnavailable("needs a CUDA device")
        if importlib.util.find_spec("torch_tensorrt") is None:
            raise BackendUnavailable("torch-tensorrt is not installed (pip install 'hybridserve[tensorrt]')")
    if backend in ("aot", "inductor") and device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise BackendUnavailable("no C++ compiler on PATH")



"""Compiled artifacts on disk: their cache key (weights, code, shapes, precision, device, versions) and store.

An artifact is one folder under ``$HYBRIDSERVE_CACHE/compiled/<key>/`` holding the backend's
files and ``meta.json``, written to a staging folder and renamed into place, so a replica
never reads half an artifact.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridserve.models.weights import cache_dir
from hybridserve.server.tasks.base import TaskHandler


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


def version(package: str) -> str | None:
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
                 precision: str, extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The cache key of a compiled artifact and the fields it was made from (plus ``extra``'s, e.g. int8's)."""
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
        "torch_tensorrt": version("torch-tensorrt") if backend == "tensorrt" else None,
        **(extra or {}),
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



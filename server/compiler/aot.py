"""AOTInductor packages (``.pt2``): probe a fresh build in a child process, then load it.

``probe_package`` loads and runs a package in a child process before the server loads it: a
loader that crashes the process (a segmentation fault in AOTInductor's package loader, seen with
torch 2.11 on an H200) then fails the ``aot`` backend, which falls back to the next one, instead
of killing the server or its replica. Probing runs once per build; cached artifacts were probed.
``load_package`` returns the package's model, called GIL-free through its C ABI on CPU.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("hybridserve.compile")

PROBE_TIMEOUT_S = 600


def probe_package(package: Path, example: tuple[torch.Tensor, ...]) -> None:
    """Load ``package`` and run ``example`` through it in a child process; raise if that fails or crashes."""
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs.pt"
        torch.save([t.detach().cpu() for t in example], inputs)
        device = str(example[0].device)
        try:
            done = subprocess.run([sys.executable, "-m", "hybridserve.server.compiler.aot", str(package), str(inputs), device],
                                  capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{package.name}: loading it in a child process took over {PROBE_TIMEOUT_S}s") from None
    if done.returncode != 0:
        how = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
               else f"exit status {done.returncode}")
        last = (done.stderr.strip().splitlines() or [""])[-1][:300]
        raise RuntimeError(f"{package.name}: loading it in a child process failed ({how}){': ' + last if last else ''}")


def _probe_main(package: str, inputs: str, device: str) -> None:
    from torch._inductor import aoti_load_package

    example = [t.to(device) for t in torch.load(inputs, weights_only=True)]
    with torch.inference_mode():
        aoti_load_package(package)(*example)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _same(a: Any, b: Any) -> bool:
    """Equal structure and shapes, values within 1e-6 of the largest magnitude."""
    left, right = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    if len(left) != len(right):
        return False
    for x, y in zip(left, right):
        if not isinstance(x, torch.Tensor) or x.shape != y.shape:
            return False
        scale = x.abs().max().clamp_min(1e-6) if x.numel() else 1.0
        if x.numel() and float((x.float() - y.float()).abs().max() / scale) > 1e-6:
            return False
    return True


class GilFreeAOTProgram:
    """An AOTInductor package's model called through its C ABI with ctypes, on CPU.

    The package loader's Python binding holds the GIL for the whole run (399 of 400 py-spy
    ``--gil`` samples in a model thread), which stalls a server's event loop during every batch;
    a ``ctypes.CDLL`` call releases it (2 of 400). Same library, same kernels, same outputs.
    """

    def __init__(self, package: Path, loader: Any):
        with zipfile.ZipFile(package) as archive:
            libraries = [n for n in archive.namelist() if n.endswith(".so") and "/data/aotinductor/" in n]
            if len(libraries) != 1:
                raise RuntimeError(f"expected one model library in {package.name}, found {len(libraries)}")
            target = package.with_suffix(".so")
            if not target.is_file():
                target.write_bytes(archive.read(libraries[0]))
        self._lib = ctypes.CDLL(str(target))
        self._handle = ctypes.c_void_p()
        self._check(self._lib.AOTInductorModelContainerCreateWithDevice(
            ctypes.byref(self._handle), ctypes.c_size_t(1), b"cpu", None))
        outputs = ctypes.c_size_t()
        self._check(self._lib.AOTInductorModelContainerGetNumOutputs(self._handle, ctypes.byref(outputs)))
        self._outputs = outputs.value
        self._out_spec = torch.utils._pytree.treespec_loads(loader.loader.get_call_spec()[1])

    @staticmethod
    def _check(code: int) -> None:
        if code != 0:
            raise RuntimeError(f"AOTInductor runtime error {code}")

    def __call__(self, *inputs: torch.Tensor) -> Any:
        # Input handles are stolen by the run; output handles are ours to steal back.
        capsules = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors([t.contiguous() for t in inputs])
        handles = (ctypes.c_void_p * len(capsules))(*(_CAPSULE_POINTER(c, None) for c in capsules))
        results = (ctypes.c_void_p * self._outputs)()
        self._check(self._lib.AOTInductorModelContainerRun(self._handle, handles, ctypes.c_size_t(len(capsules)),
                                                           results, ctypes.c_size_t(self._outputs), None, None))
        tensors = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [_CAPSULE_NEW(results[i], None, None) for i in range(self._outputs)])
        return torch.utils._pytree.tree_unflatten(tensors, self._out_spec)

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.AOTInductorModelContainerDelete(self._handle)


_CAPSULE_POINTER = ctypes.pythonapi.PyCapsule_GetPointer
_CAPSULE_POINTER.restype, _CAPSULE_POINTER.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_CAPSULE_NEW = ctypes.pythonapi.PyCapsule_New
_CAPSULE_NEW.restype, _CAPSULE_NEW.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def load_package(package: Path, example: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    """The package's model, GIL-free on CPU where the ctypes path gives the loader's exact outputs."""
    from torch._inductor import aoti_load_package

    loader = aoti_load_package(str(package))
    if example[0].device.type != "cpu":
        return loader
    try:
        program = GilFreeAOTProgram(package, loader)
        with torch.inference_mode():
            if _same(loader(*example), program(*example)):
                return program
        log.warning("%s: the ctypes call differs from the package loader; using the loader", package.name)
    except (OSError, RuntimeError, AttributeError) as exc:
        log.warning("%s: ctypes call unavailable (%s); using the package loader", package.name, exc)
    return loader


if __name__ == "__main__":
    _probe_main(*sys.argv[1:4])

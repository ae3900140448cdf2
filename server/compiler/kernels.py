"""Int8 kernel verification: a quantised build that does not run int8 kernels is a failed build.

A quantised graph that a backend did not fuse still runs, in fp32, between quantise and
dequantise steps: slower than fp32 and never int8 (AOTInductor without freezing is the
known case, pytorch/ao#4566). So every int8 build is checked for the oneDNN int8 ops:
``inductor`` by profiling one batch through the compiled program (the ``onednn::qconv*`` /
``onednn::qlinear*`` calls it makes, cache hit or miss alike), ``aot`` by reading the
package's generated C++ for its calls of the same kernels. No int8 kernel at all raises
``MissingInt8Kernels``; fewer kernels than quantised layers is reported, not hidden.
"""

from __future__ import annotations

import re
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

INT8_EVENT = re.compile(r"onednn::(q(?:conv|linear)\w*pointwise\w*)")
AOT_CALL = re.compile(r"aoti_torch_cpu__(q(?:conv|linear)\w*?)(?:_tensor)?\(")


class MissingInt8Kernels(RuntimeError):
    """The compiled program of an int8 build calls no int8 kernel."""


def profiled_kernels(program: Callable[..., Any], example: tuple[torch.Tensor, ...]) -> Counter[str]:
    """The oneDNN int8 ops one call of ``program`` runs, with how often each ran."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        program(*example)
    return Counter(match.group(1) for event in prof.events() if (match := INT8_EVENT.match(event.name))
                   and not (event.cpu_parent and INT8_EVENT.match(event.cpu_parent.name)))  # outermost calls only


def package_kernels(package: Path) -> Counter[str]:
    """The int8 kernels an AOTInductor package's generated C++ calls."""
    found: Counter[str] = Counter()
    with zipfile.ZipFile(package) as archive:
        for name in archive.namelist():
            if name.endswith(".cpp"):
                found.update(AOT_CALL.findall(archive.read(name).decode(errors="replace")))
    return found


def verify_int8(backend: str, programs: dict[int | None, Callable[..., Any]], files: dict[str, str], folder: Path,
                example: Callable[[int], tuple[torch.Tensor, ...]], layers: int) -> dict[str, Any]:
    """Count the int8 kernels of every program; raise MissingInt8Kernels where one has none."""
    report: dict[str, Any] = {"quantized_layers": layers, "programs": {}}
    for size, program in programs.items():
        key = "dynamic" if size is None else str(size)
        if backend == "aot":
            found = package_kernels(folder / files[key])
        else:
            with torch.inference_mode():  # inference tensors, as served (others would recompile the program)
                batch = example(2 if size is None else size)
            found = profiled_kernels(program, batch)
        report["programs"][key] = dict(found)
        if not found:
            raise MissingInt8Kernels(
                f"the {backend} build of the int8 model calls no int8 kernel (no oneDNN qconv/qlinear in its "
                f"{'generated code' if backend == 'aot' else 'profile'}): it would run fp32 between quantise steps")
    report["kernels"] = min(sum(kinds.values()) for kinds in report["programs"].values())
    return report

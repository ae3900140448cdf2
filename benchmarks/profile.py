"""A py-spy profile of a server under load: which Python code holds the GIL, and for how long.

py-spy samples with ``--gil`` (only the thread holding the GIL is recorded), so a process's
samples over the sampling ticks is how busy its interpreter was; where an interpreter is near
100 %, its Python code, not the model (which releases the GIL), bounds the throughput.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE = 100  # samples per second


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float, output: Path) -> subprocess.Popen | None:
    """Sample ``pid`` and its subprocesses for ``seconds``: stacks of the threads holding the GIL."""
    tool = py_spy()
    if tool is None:
        return None
    return subprocess.Popen([tool, "record", "--pid", str(pid), "--subprocesses", "--duration", str(int(seconds)),
                             "--rate", str(RATE), "--gil", "--nonblocking", "--format", "raw", "--output", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# Where a sample's time goes: the first category matched scanning its stack from the leaf.
CATEGORIES = (
    ("model forward", ("AOTICompiledModel", "run_model", "BatchRunner.__call__", "_call_impl", "forward (")),
    ("preprocess (decode, resize, tensor)", ("preprocess", "decode_image", "to_tensor", "PIL/")),
    ("postprocess", ("postprocess", "_select")),
    ("batch queue", ("server/engine/batching.py", "run_batch", "serve/batching.py")),
    ("HTTP, routing, JSON", ("uvicorn/", "starlette/", "fastapi/", "http_api.py", "pydantic", "json/", "httptools")),
    ("Ray RPC, proxy, router", ("ray/",)),
    ("asyncio and thread hand-offs", ("asyncio/", "threading.py", "futures/", "concurrent/")),
)


def summarise(collapsed: Path, seconds: float, top: int = 10) -> str:
    """GIL share by process, by category and by leaf function, from py-spy's ``frame;frame;... count`` lines."""
    leaves, processes, categories, total = Counter(), Counter(), Counter(), 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        samples = int(count)
        total += samples
        processes[next(f for f in reversed(frames) if f.startswith("process "))[:70]] += samples
        leaves[_short(frames[-1])] += samples
        categories[_category(frames[1:])] += samples
    if not total:
        return "(no samples)"

    def table(counter: Counter, limit: int) -> list[str]:
        return [f"  {100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(limit)]

    ticks = RATE * seconds
    busy = [f"  {100 * n / ticks:5.1f}%  {name}" for name, n in processes.most_common(8)]
    return "\n".join(["GIL held, share of the sampling time, by process:", *busy,
                      "GIL samples by category (leaf-most match):", *table(categories, len(CATEGORIES) + 1),
                      "GIL samples by leaf function:", *table(leaves, top)])


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, patterns in CATEGORIES:
            if any(pattern in frame for pattern in patterns):
                return name
    return "other"


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    parts = Path(path).parts
    return f"{name} ({'/'.join(parts[-2:])}:{line})" if parts else name

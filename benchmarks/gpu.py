"""GPU benchmark, no Ray: what only a CUDA device shows. ``python -m benchmarks.gpu --out DIR``.

Runs where torch sees a CUDA device (the GPU machine has no Ray, so the in-process server is
what gets measured end to end). For the built-in classifier and CRAFT x4 on 128x128 inputs:

* the limit per backend and precision: the loaded model's batched forward, CUDA-synchronised,
  at each batch size (best of interleaved rounds), with each load's time and cache state;
* served: ``hybridserve serve --no-ray`` on the GPU, closed-loop HTTP load at concurrency 1, 8
  and 32, with dynamic batching and with batch size 1 (the batching gain).

Writes ``gpu.json`` and ``gpu.md`` (the section ``--write BENCHMARKS.md`` puts between the
GPU markers of that file).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.inprocess import load_runtime
from benchmarks.loadgen import Target, closed_loop
from benchmarks.servers import JSON_HEADERS, ServerProcess, free_port
from benchmarks.workloads import ROOT, Workload, workloads, write_repository
from hybridserve.server.tasks import InferenceRequest
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.engine.tuning import candidate_sizes

BEGIN, END = "<!-- gpu:begin (written by python -m benchmarks.gpu) -->", "<!-- gpu:end -->"
# (backend, precision) per workload, measured before the served rows; LATE ones after every
# served row, as the time budget allows (CRAFT's windowed attention exports only with static
# batch buckets, minutes of compiling each).
VARIANTS = {
    "classifier": [("eager", "fp32"), ("eager", "fp16"), ("inductor", "fp16"), ("aot", "fp16"), ("tensorrt", "fp16")],
    "craft-x4": [("eager", "fp32"), ("eager", "fp16")],
}
LATE = {"craft-x4": [("aot", "fp16")]}
BUCKETS = {"craft-x4": [8]}
MAX_BATCH = {"classifier": 128, "craft-x4": 16}
SERVED = {"classifier": ("aot", "fp16"), "craft-x4": ("eager", "fp16")}
CONCURRENCIES = [1, 8, 32, 128]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_spec(w: Workload, backend: str, precision: str, max_batch: int, wait_ms: float = 2.0):
    name = f"{w.name}-{backend}-{precision}" + ("-b1" if max_batch == 1 else "")
    compiled = {"backend": backend, "precision": precision}
    if backend != "eager" and w.name in BUCKETS and max_batch > 1:
        compiled["batch_buckets"] = BUCKETS[w.name]
    data = {**w.spec, "name": name, "device": {"type": device()}, "compile": compiled,
            "batching": {"max_batch_size": max_batch, "max_wait_ms": wait_ms if max_batch > 1 else 0.0,
                         "max_queue": 512}}
    return ModelSpec.model_validate(data)


def synced_seconds(call, min_calls: int = 5, min_seconds: float = 0.5) -> float:
    call()
    sync()
    times, started = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def limits(w: Workload, variants: list[tuple[str, str]], deadline: float, rows: list[dict], rounds: int = 2) -> None:
    """Append one row per (backend, precision) to ``rows`` (the caller saves them as they come)."""
    for backend, precision in variants:
        if time.monotonic() > deadline:
            rows.append({"backend": backend, "precision": precision, "skipped": "time budget spent"})
            continue
        if backend == "tensorrt" and importlib.util.find_spec("torch_tensorrt") is None:
            rows.append({"backend": backend, "precision": precision, "skipped": "torch-tensorrt is not installed"})
            continue
        spec = gpu_spec(w, backend, precision, MAX_BATCH[w.name])
        try:
            runtime = load_runtime(spec)
        except RuntimeError as exc:
            rows.append({"backend": backend, "precision": precision, "skipped": str(exc)[:300]})
            continue
        print(f"{spec.name}: {runtime.backend} loaded in {runtime.load_seconds:.1f}s", flush=True)
        request = InferenceRequest(image=base64.b64decode(json.loads(w.payload)["image"]))
        item = runtime.handler.preprocess(request).items[0]
        best: dict[int, float] = {}
        with torch.inference_mode():
            for _ in range(rounds):
                for size in candidate_sizes(MAX_BATCH[w.name]):
                    rate = size / synced_seconds(lambda: runtime.handler.forward([item] * size))
                    best[size] = max(best.get(size, 0.0), rate)
        rows.append({"backend": backend, "precision": precision, "served_as": runtime.backend,
                     "load_s": runtime.load_seconds, "cache": runtime.compiled.cache, "images_per_s": best})
        del runtime
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


async def served(w: Workload, folder: Path, seconds: float) -> list[dict]:
    backend, precision = SERVED[w.name]
    batched = gpu_spec(w, backend, precision, MAX_BATCH[w.name])  # the limit's program: a cache hit
    single = gpu_spec(w, backend, precision, 1)
    repository = write_repository(folder / f"{w.name}-repo", [batched, single])
    port = free_port()
    server = ServerProcess("hybridserve-gpu", [sys.executable, "-m", "hybridserve.server.cli.main", "serve", "--no-ray",
                                               "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0", "--repository",
                                               str(repository)],
                           f"http://127.0.0.1:{port}/readyz", folder / f"{w.name}-server.log")
    server.start()
    rows = []
    try:
        if not server.wait_ready(600):
            return [{"error": "server not ready", "log": server.tail(30)}]
        for spec, concurrencies in ((batched, CONCURRENCIES), (single, CONCURRENCIES[2:3] or CONCURRENCIES[-1:])):
            target = Target(f"http://127.0.0.1:{port}/v1/models/{spec.name}/{w.verb}", w.payload, JSON_HEADERS)
            for concurrency in concurrencies:
                run = await closed_loop(target, concurrency, seconds, server_pid=server.process.pid)
                rows.append({"model": spec.name, "max_batch": spec.batching.max_batch_size,
                             "concurrency": concurrency, "images_per_s": run.throughput, "p50_ms": run.p50_ms,
                             "p99_ms": run.p99_ms, "errors": run.errors, "client_cpu": run.client_cpu_share})
    finally:
        server.stop()
    return rows


def machine() -> dict:
    cuda = torch.cuda.is_available()
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    return {"gpu": torch.cuda.get_device_name(0) if cuda else f"no GPU ({platform.processor() or 'CPU'})",
            "gpu_memory_gib": round(memory, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "torch_tensorrt": importlib.util.find_spec("torch_tensorrt") is not None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def render(results: dict) -> str:
    m = results["machine"]
    lines = [BEGIN, "", "## GPU", "",
             f"Run on {m['date']}: {m['gpu']} ({m['gpu_memory_gib']} GiB), torch {m['torch']} (CUDA {m['cuda']}), "
             f"Python {m['python']}; torch-tensorrt installed: {'yes' if m['torch_tensorrt'] else 'no'}. "
             "No Ray on that machine: the served rows are `hybridserve serve --no-ray` on the GPU, load from "
             "the same machine. Command: `python -m benchmarks.gpu`.", ""]
    for name, w in results["workloads"].items():
        lines += [f"### {name}: in-process limit (images/s, CUDA-synchronised, best of 2 rounds)", ""]
        sizes = sorted({int(s) for row in w["limits"] for s in row.get("images_per_s", {})})
        lines += ["| backend | precision | served as | load s (cache) | " + " | ".join(f"batch {s}" for s in sizes) + " |",
                  "|---|---|---|---:|" + "---:|" * len(sizes)]
        for row in w["limits"]:
            if "skipped" in row:
                lines.append(f"| {row['backend']} | {row['precision']} | not run: {row['skipped'][:120]} |"
                             + " |" * (len(sizes) + 1))
                continue
            rates = {int(k): v for k, v in row["images_per_s"].items()}
            lines.append(f"| {row['backend']} | {row['precision']} | {row['served_as']} | {row['load_s']:.1f} "
                         f"({row['cache'] or '—'}) | " + " | ".join(f"{rates[s]:,.0f}" if s in rates else "—"
                                                                    for s in sizes) + " |")
        lines += ["", f"### {name}: served over HTTP on the GPU", "",
                  "| model | max batch | concurrency | images/s | p50 ms | p99 ms | errors | load-generator CPU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in w["served"]:
            if "error" in row:
                lines.append(f"| {row['error']} | | | | | | | |")
                continue
            p50, p99 = (f"{row[key]:.1f}" if row[key] is not None else "—" for key in ("p50_ms", "p99_ms"))
            lines.append(f"| {row['model']} | {row['max_batch']} | {row['concurrency']} | {row['images_per_s']:,.1f} | "
                         f"{p50} | {p99} | {row['errors']} | {row['client_cpu']:.0%} |")
        lines.append("")
    return "\n".join(lines + [END])


def write_section(path: Path, section: str) -> None:
    text = path.read_text()
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        text = before + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-results")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new limit rows after this")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring window per served point")
    parser.add_argument("--write", type=Path, help="render OUT/gpu.json into this file's GPU section and exit")
    parser.add_argument("--backends", nargs="*", default=["eager", "inductor", "aot", "tensorrt"],
                        help="measure only these backends")
    parser.add_argument("--smoke", action="store_true", help="a tiny run on the CPU: checks this script, measures nothing")
    args = parser.parse_args(argv)
    if args.write:
        write_section(args.write, render(json.loads((args.out / "gpu.json").read_text())))
        return 0
    if args.smoke:
        VARIANTS.update(classifier=[("eager", "fp32")], **{"craft-x4": [("eager", "fp32")]})
        MAX_BATCH.update(classifier=4, **{"craft-x4": 2})
        SERVED.update(classifier=("eager", "fp32"), **{"craft-x4": ("eager", "fp32")})
        CONCURRENCIES[:] = [1, 4]
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--smoke checks the script on the CPU)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for table in (VARIANTS, LATE):
        for name, variants in table.items():
            table[name] = [v for v in variants if v[0] in args.backends]
    if SERVED["classifier"][0] not in args.backends:
        SERVED["classifier"] = ("eager", "fp16")
    deadline = time.monotonic() + args.budget_s
    results = {"machine": machine(), "workloads": {}}
    chosen = workloads()

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(results, indent=1))
        (args.out / "gpu.md").write_text(render(results))

    with tempfile.TemporaryDirectory() as tmp:
        for w in chosen:
            entry = results["workloads"].setdefault(w.name, {"limits": [], "served": []})
            limits(w, VARIANTS[w.name], deadline, entry["limits"])
            save()
            entry["served"] = asyncio.run(served(w, Path(tmp), args.seconds))
            save()
        for w in chosen:
            limits(w, [] if args.smoke else LATE.get(w.name, []), deadline, results["workloads"][w.name]["limits"])
            save()
    print(render(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

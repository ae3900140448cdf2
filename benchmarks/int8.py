"""int8 against fp32 on this CPU: ``python -m benchmarks.int8 [--models NAME ...] [--write BENCHMARKS.md]``.

Each model is loaded twice with the inductor backend, the same spec but ``compile.precision``:
fp32, and int8 (PT2E with torchao's X86InductorQuantizer, freezing, the oneDNN int8 kernels
verified, the accuracy gate at load). Every load runs one torch thread (``configure_threads(1)``),
batches of at most 8 with the default static buckets 1, 2, 4, 8. Per model:

* accuracy: the gate's verdict (held-out top-1 or PSNR through ``hybridserve eval``'s code for
  the built-ins; output SNR against fp32 for the random-weight timm models), and the agreement
  with fp32 on held-out images (top-1 agreement for classifiers, output SNR; PSNR of the pixels
  for the restorer);
* layers: conv/linear layers quantised, layers the sensitivity pass kept in fp32, int8 kernels
  one forward calls; build: seconds of each cold build (``meta.json``: a cached artifact keeps
  the time it took when made) and where the int8 build's time went;
* speed: median ms of the batched forward at batch 1 and 8, fp32 and int8 interleaved in every round;
* served: images/s through the in-process data plane (what ``hybridserve serve --no-ray`` runs
  behind HTTP: decode, preprocess, dynamic batching up to 8, forward, postprocess), a closed
  loop of 8 concurrent requests, fp32 and int8 alternating.

Writes ``int8.json`` and ``int8.md`` under ``--out``; ``--write FILE`` puts the section between
the int8 markers of FILE (re-read just before writing; nothing else in it changes).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.inprocess import load_runtime, seconds_per_call
from hybridserve.models.weights import cache_dir
from hybridserve.server.compiler.gate import agreement
from hybridserve.server.compiler.quantize import has_vnni
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.engine.batching import AsyncBatcher
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.engine.endpoint import Endpoint, LocalModel
from hybridserve.server.engine.runtime import ModelRuntime, configure_threads
from hybridserve.server.repository import builtin_repository, load_spec
from hybridserve.server.tasks import InferenceRequest

BEGIN, END = "<!-- int8:begin (written by python -m benchmarks.int8) -->", "<!-- int8:end -->"
ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ("classifier", "denoiser")
TIMM = {"mobilevitv2-050": "mobilevitv2_050", "efficientformerv2-s0": "efficientformerv2_s0", "fastvit-t8": "fastvit_t8"}
MAX_BATCH, CONCURRENCY, DENOISER_SIGMA = 8, 8, 25.0
BUCKETS = [1, 2, 4, 8]  # int8 always builds static buckets: fp32 gets the same ones
PHASES = ("quantize_and_gate", "compile", "verify", "gate")  # an int8 build's steps, in order (int8.py)


# ---------------------------------------------------------------- images and specs


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _crops(names: tuple[str, ...], per_photo: int, seed: int, side: int = 256) -> list[np.ndarray]:
    """Deterministic square crops of the scikit-image photographs (real pictures, no download)."""
    from hybridserve.models.training import photos

    rng, out = np.random.default_rng(seed), []
    for photo in photos.load_photos(names):
        height, width = photo.shape[:2]
        size = min(side, height, width)
        for _ in range(per_photo):
            top, left = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
            out.append(np.ascontiguousarray(photo[top:top + size, left:left + size]))
    return out


def _folder(name: str, arrays: list[np.ndarray]) -> Path:
    """A folder of PNGs under the cache (a stable path: it is part of the int8 cache key)."""
    folder = cache_dir() / "bench-int8" / name
    if not (folder / ".complete").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for index, array in enumerate(arrays):
            (folder / f"{index:03d}.png").write_bytes(_png(array))
        (folder / ".complete").touch()
    return folder


def held_out_images(name: str) -> list[np.ndarray]:
    """Images no calibration saw: the agreement measurement and the served requests."""
    from hybridserve.models.training import photos

    if name == "classifier":
        from hybridserve.models.training.digits import load_split

        return [np.ascontiguousarray(pixels[:, :, None]) for pixels in load_split()[1].images]
    if name == "denoiser":
        rng = np.random.default_rng(2024)
        return [photos.add_noise(crop, DENOISER_SIGMA, rng) for crop in _crops(photos.HELD_OUT_PHOTOS, 2, 7)]
    return _crops(photos.HELD_OUT_PHOTOS, 8, 1, side=288)


def specs(name: str) -> tuple[ModelSpec, ModelSpec]:
    """The fp32 and int8 specs of one model: the same but for the precision and its int8 settings."""
    if name in BUILTINS:
        base = load_spec(builtin_repository() / f"{name}.yaml")
        data = base.model_dump(exclude={"base_dir"}, exclude_defaults=True)
        int8 = {"calibration": {"images": "builtin", "count": 64}}  # gate: auto, the held-out set
    else:
        from hybridserve.models.training import photos

        data = {"name": name, "task": "classification", "architecture": f"timm:{TIMM[name]}",
                "preprocessing": {"input_size": [224, 224], "resize": "center_crop"},
                "labels": [str(i) for i in range(1000)]}
        calibration = _folder("calibration", _crops(photos.TRAIN_PHOTOS, 4, 0, side=288))
        gate = _folder("gate", held_out_images(name))
        int8 = {"calibration": {"images": str(calibration), "count": 52},
                "accuracy_gate": {"metric": "snr", "images": str(gate), "count": 32}}
    data.update(batching={"max_batch_size": MAX_BATCH, "max_wait_ms": 2.0, "max_queue": 256}, device={"cpus": 1})
    made = []
    for precision, extra in (("fp32", {}), ("int8", int8)):
        spec = ModelSpec.model_validate({**data, "name": f"{name}-{precision}",
                                         "compile": {"backend": "inductor", "precision": precision,
                                                     "batch_buckets": BUCKETS, **extra}})
        made.append(spec.model_copy(update={"base_dir": builtin_repository()}) if name in BUILTINS else spec)
    return made[0], made[1]


# ---------------------------------------------------------------- measurements


def _outputs(runtime: ModelRuntime, items: list[Any]) -> list[torch.Tensor]:
    """The model's first output for ``items``, stacked per batch of up to ``MAX_BATCH``."""
    batches = []
    with torch.inference_mode():
        for start in range(0, len(items), MAX_BATCH):
            outputs = runtime.handler.forward(items[start:start + MAX_BATCH])
            batches.append(torch.stack([o if isinstance(o, torch.Tensor) else o[0] for o in outputs]))
    return batches


def agreement_with_fp32(fp32: ModelRuntime, int8: ModelRuntime, images: list[np.ndarray]) -> dict[str, float]:
    """Top-1 agreement (classifiers) or PSNR (restorer) and output SNR of int8 against fp32, per item."""
    items = [item for image in images for item in fp32.handler.preprocess(InferenceRequest(image=image)).items]
    reference, candidate = _outputs(fp32, items), _outputs(int8, items)
    result = {"items": len(items), "snr_db": agreement("snr", reference, candidate)}
    key = "top1_agreement" if fp32.spec.task == "classification" else "psnr"
    result[key] = agreement(key, reference, candidate)
    return result


def forward_ms(runtimes: dict[str, ModelRuntime], rounds: int, seconds: float) -> dict[str, dict[int, float]]:
    """Median ms of the batched forward at batch 1 and 8; the precisions interleaved in every round."""
    samples: dict[str, dict[int, list[float]]] = {key: {1: [], MAX_BATCH: []} for key in runtimes}
    for _ in range(rounds):
        for key, runtime in runtimes.items():
            item = runtime.compiled.example if runtime.compiled else None
            for size in (1, MAX_BATCH):
                with torch.inference_mode():
                    took = seconds_per_call(lambda: runtime.handler.forward([item] * size), 3, seconds)
                samples[key][size].append(1000.0 * took)
    return {key: {size: statistics.median(values) for size, values in by_size.items()} for key, by_size in samples.items()}


async def _closed_loop(plane: DataPlane, name: str, payload: bytes, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await plane.infer(name, None, InferenceRequest(image=payload), timeout_s=120.0)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.perf_counter() - started)


def served(runtimes: dict[str, ModelRuntime], payload: bytes, rounds: int, seconds: float) -> dict[str, float]:
    """Images/s through the in-process data plane, the precisions alternating; the median round each."""

    async def measure() -> dict[str, float]:
        plane = DataPlane({key: Endpoint(LocalModel(runtime), AsyncBatcher(runtime.run_batch, MAX_BATCH, 2.0))
                           for key, runtime in runtimes.items()})
        rates: dict[str, list[float]] = {key: [] for key in runtimes}
        for key in runtimes:  # warm the pipeline once
            await _closed_loop(plane, key, payload, min(1.0, seconds))
        for index in range(rounds):
            for key in (list(runtimes) if index % 2 == 0 else list(runtimes)[::-1]):
                rates[key].append(await _closed_loop(plane, key, payload, seconds))
        return {key: statistics.median(values) for key, values in rates.items()}

    return asyncio.run(measure())


def _meta(runtime: ModelRuntime) -> dict[str, Any]:
    artifact = runtime.compiled.artifact if runtime.compiled else None
    try:
        return json.loads((artifact / "meta.json").read_text()) if artifact else {}
    except OSError:
        return {}


def measure_model(name: str, rounds: int, seconds: float, served_seconds: float) -> dict[str, Any]:
    fp32_spec, int8_spec = specs(name)
    row: dict[str, Any] = {"model": name}
    runtimes = {}
    for key, spec in (("fp32", fp32_spec), ("int8", int8_spec)):
        started = time.perf_counter()
        torch.manual_seed(0)  # timm's random weights: the same for both loads, and for every run (the cache key)
        runtimes[key] = load_runtime(spec)
        meta = _meta(runtimes[key])
        row[key] = {"load_s": round(time.perf_counter() - started, 1), "cache": runtimes[key].compiled.cache,
                    "build_s": meta.get("compile_seconds"), "backend": runtimes[key].backend,
                    "precision": runtimes[key].compiled.precision}
        print(f"[{time.strftime('%H:%M:%S')}] {name} {key}: {row[key]}", flush=True)
    compiled, meta = runtimes["int8"].compiled, _meta(runtimes["int8"])
    if meta.get("weights") != _meta(runtimes["fp32"]).get("weights"):
        raise RuntimeError("the fp32 and int8 loads got different weights: nothing to compare")
    row["gate"] = compiled.gate
    row["precision_reason"] = compiled.precision_reason
    row["fp32_layers"] = list(compiled.fp32_layers)
    row["quantized_layers"] = (meta.get("kernels") or {}).get("quantized_layers")
    row["int8_kernels"] = (meta.get("kernels") or {}).get("kernels")
    row["phases"] = meta.get("phases")
    images = held_out_images(name)
    row["agreement"] = agreement_with_fp32(runtimes["fp32"], runtimes["int8"], images)
    row["forward_ms"] = forward_ms(runtimes, rounds, seconds)
    payload = _png(images[0])
    row["served"] = served(runtimes, payload, max(2, rounds // 2), served_seconds)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps({k: row[k] for k in ('forward_ms', 'served')})}",
          flush=True)
    return row


# ---------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if flag in flags]
    return {"cpu": fields.get("Model name", "?").strip(), "cpus": os.cpu_count(), "isa": isa, "vnni": has_vnni(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load": [round(x, 2) for x in os.getloadavg()]}


def _ratio(fp32: float | None, int8: float | None) -> str:
    return f"{fp32 / int8:.2f}x" if fp32 and int8 else "—"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [BEGIN, "", "## int8 against fp32 on the CPU (issue 16)", "",
             f"Run on {m['date']}: {m['cpu']}, {m['cpus']} CPUs ({', '.join(m['isa'])}; int8 dot products "
             f"{'with VNNI: 8-bit activations' if m['vnni'] else 'without VNNI: 7-bit activations'}), torch "
             f"{m['torch']}, Python {m['python']}; load average at the start {', '.join(map(str, m['load']))} "
             "(a machine shared with other work). Command: `python -m benchmarks.int8"
             f"{' ' + results['args'] if results['args'] else ''}`. One torch thread for every number (the same "
             "for fp32 and int8); backend inductor for both, batches of up to 8 in static buckets 1, 2, 4, 8.", "",
             "Accuracy and build. Gate: what the int8 build had to keep at load (built-ins: held-out top-1 or "
             "PSNR through `hybridserve eval`'s code; timm models, random weights: output SNR against fp32 on "
             "held-out photo crops). Agreement: int8 against fp32 on held-out images, per item.", "",
             "| model | served | gate | fp32 | int8 | allowed | agreement with fp32 | layers int8 / kept fp32 "
             "| int8 kernels per forward | build s fp32 / int8 | int8 build: where the time went |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|---|"]
    for row in results["models"]:
        if "error" in row:
            lines.append(f"| {row['model']} | not measured: {row['error'][:200]} |" + " |" * 9)
            continue
        gate, agree = row["gate"] or {}, row["agreement"]
        served_as = row["int8"]["precision"] + ("" if row["int8"]["precision"] == "int8"
                                                else f" ({(row['precision_reason'] or '')[:120]})")
        metric = gate.get("metric", "—")
        reference = f"{gate['reference']:.2f}" if gate.get("reference") is not None else "—"
        allowed = (f"drop <= {gate['threshold']:g}" if gate.get("reference") is not None
                   else f">= {gate['threshold']:g}") if gate else "—"
        value = f"{gate['value']:.2f}" if gate else "—"
        shares = ", ".join([f"top-1 {agree['top1_agreement']:.1%}" if "top1_agreement" in agree else
                            f"PSNR {agree['psnr']:.1f} dB", f"SNR {agree['snr_db']:.1f} dB"]) + f" ({agree['items']} items)"
        layers = f"{row['quantized_layers'] if row['quantized_layers'] is not None else '—'} / {len(row['fp32_layers'])}"
        phases = ", ".join(f"{k.replace('_', ' ')} {(row['phases'] or {})[k]:.0f}" for k in PHASES
                           if k in (row["phases"] or {})) or "—"
        build = f"{row['fp32']['build_s'] or 0:.0f} / {row['int8']['build_s'] or 0:.0f}"
        lines.append(f"| {row['model']} | {served_as} | {metric} | {reference} | {value} | {allowed} | {shares} | "
                     f"{layers} | {row['int8_kernels'] or '—'} | {build} | {phases} |")
    lines += ["", "Speed: median ms per batched forward (fp32 and int8 interleaved, "
              f"{results['rounds']} rounds); served: images/s through the in-process data plane at concurrency "
              f"{CONCURRENCY} (decode, preprocess, dynamic batching, forward, postprocess; no HTTP).", "",
              "| model | batch 1 fp32 ms | batch 1 int8 ms | speed-up | batch 8 fp32 ms | batch 8 int8 ms | speed-up "
              "| served fp32 img/s | served int8 img/s | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["models"]:
        if "error" in row:
            continue
        ms, rate = {k: {int(s): v for s, v in d.items()} for k, d in row["forward_ms"].items()}, row["served"]
        lines.append(f"| {row['model']} | {ms['fp32'][1]:.2f} | {ms['int8'][1]:.2f} | {_ratio(ms['fp32'][1], ms['int8'][1])} "
                     f"| {ms['fp32'][MAX_BATCH]:.2f} | {ms['int8'][MAX_BATCH]:.2f} | "
                     f"{_ratio(ms['fp32'][MAX_BATCH], ms['int8'][MAX_BATCH])} | {rate['fp32']:.1f} | {rate['int8']:.1f} | "
                     f"{_ratio(rate['int8'], rate['fp32'])} |")
    return "\n".join(lines + ["", END])


def write_section(path: Path, section: str) -> None:
    """Replace the int8 section of ``path`` (or append it), re-reading the file first."""
    text = path.read_text()
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        path.write_text(f"{text.rstrip()}\n\n{section}\n")
    else:
        path.write_text(text[:begin] + section + text[end + len(END):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[*BUILTINS, *TIMM], choices=[*BUILTINS, *TIMM])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the forward timings")
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per forward timing")
    parser.add_argument("--served-seconds", type=float, default=5.0, help="measuring time per served round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int8")
    parser.add_argument("--write", type=Path, help="put OUT/int8.md into this file's int8 section and exit")
    args = parser.parse_args(argv)
    if args.write:
        write_section(args.write, (args.out / "int8.md").read_text().strip())
        return 0
    configure_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    given = " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {"machine": machine(), "args": given, "rounds": args.rounds, "models": []}
    for name in args.models:
        try:
            results["models"].append(measure_model(name, args.rounds, args.seconds, args.served_seconds))
        except Exception as exc:  # one model's failure is a row, not a lost run
            results["models"].append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
        (args.out / "int8.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "int8.md").write_text(render(results) + "\n")
    print(render(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

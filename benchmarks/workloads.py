"""The benchmarked models, their request payloads, and the model repository the servers load.

Three workloads: the built-in digit classifier (a few milliseconds per image: overhead-bound),
EfficientFormerV2-S0 from timm with random weights (``benchmarks/specs/``, about 26 ms per
image on one core: compute-bound) on a 224x224 photo, and CRAFT x4 from ``../shared/eval`` on
128x128 inputs (compute-bound, where present). Every server gets the same JSON request,
``{"image": <base64 PNG>}``, and answers JSON (restored images as base64 PNG), so the wire and
codec work is equal across servers; every server runs the spec's ``device.cpus`` torch threads.

Each workload is served under several names from one repository: ``<name>-eager``,
``<name>-<backend>`` (the compiled one), ``<name>-<backend>-nobatch`` (batch size 1, for
the batching gain) and ``<name>-<backend>-slo`` (adaptive batching under a latency objective).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.repository import builtin_repository, load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = Path(__file__).resolve().parent / "specs"
EVAL = ROOT.parent / "shared" / "eval"
CRAFT_WEIGHTS = EVAL / "sr" / "checkpoints" / "craft_x4.pth"
CRAFT_INPUT = EVAL / "sr" / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"


@dataclass(frozen=True)
class Workload:
    name: str
    spec: dict  # spec fields, weights as an absolute path
    payload: bytes  # the JSON request body
    compiled_backend: str
    compile_batches: tuple[int, int]  # batch sizes of the compile speed-up table
    seconds_per_point: float  # measuring time per (server, concurrency)
    latency_slo_ms: float | None = None  # for the adaptive-batching variant
    batching_gain: bool = True  # measure the batch-1 variants (the batching gain) too
    rounds: int = 2  # interleaved rounds of server measurements
    compute_bound: bool = False  # the model's compute, not serving overhead, bounds throughput

    @property
    def threads(self) -> int:
        """Torch threads of every server and of the in-process measurements: the spec's ``device.cpus``."""
        return max(1, int(ModelSpec.model_validate({**self.spec, "name": "x"}).device.cpus))

    @property
    def default_backend(self) -> str:
        """The compile backend the spec declares: what the default ``hybridserve serve`` serves."""
        return ModelSpec.model_validate({**self.spec, "name": "x"}).compile.backend

    @property
    def verb(self) -> str:
        return ModelSpec.model_validate({**self.spec, "name": "x"}).verb

    def variant(self, backend: str, batching: str = "") -> str:
        """Served model name; ``batching`` is "" (the spec's), "nobatch" (batch 1), "slo" (adaptive) or
        "compile-table" (a maximum batch size that covers ``compile_batches``)."""
        return f"{self.name}-{backend}" + (f"-{batching}" if batching else "")

    def spec_for(self, backend: str, batching: str = "") -> ModelSpec:
        data = {**self.spec, "name": self.variant(backend, batching), "compile": {"backend": backend}}
        if batching == "nobatch":
            data["batching"] = {**data.get("batching", {}), "max_batch_size": 1, "max_wait_ms": 0}
        elif batching == "slo":
            data["batching"] = {**data.get("batching", {}), "latency_slo_ms": self.latency_slo_ms}
        elif batching == "compile-table":  # large enough for the table's batch sizes
            largest = max(*self.compile_batches, data.get("batching", {}).get("max_batch_size", 8))
            data["batching"] = {**data.get("batching", {}), "max_batch_size": largest}
        return ModelSpec.model_validate(data)


def _json_image(png: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(png).decode("ascii")}).encode()


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def classifier_workload() -> Workload:
    from sklearn.datasets import load_digits

    from hybridserve.models.training.digits import digit_image

    path = builtin_repository() / "classifier.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["weights"] = str((path.parent / spec["weights"]).resolve())
    buffer = io.BytesIO()
    digit_image(load_digits().images[0]).save(buffer, format="PNG")
    return Workload("classifier", spec, _json_image(buffer.getvalue()), "aot", (1, 8), 8.0, latency_slo_ms=50.0)


def craft_workload() -> Workload | None:
    if not (CRAFT_WEIGHTS.is_file() and CRAFT_INPUT.is_file()):
        return None
    spec = {
        "task": "restoration",
        "architecture": "spandrel",
        "weights": str(CRAFT_WEIGHTS),
        "preprocessing": {"normalize": False, "tile": 128, "tile_overlap": 16},
        "restoration": {"kind": "super-resolution"},
        # Batch size 1: on this CPU a batch of 4 costs 2x more per image than 4 single images
        # (see the compile table), so batching servers would only lose here.
        "batching": {"max_batch_size": 1, "max_wait_ms": 0.0},
    }
    image = np.asarray(Image.open(CRAFT_INPUT).convert("RGB"))[:128, :128]
    return Workload("craft-x4", spec, _json_image(_png(np.ascontiguousarray(image), "RGB")), "aot", (1, 4), 30.0,
                    batching_gain=False, rounds=1, compute_bound=True)


def timm_workload() -> Workload:
    """A compute-bound hybrid nobody here tuned for, on a photo (scikit-image's cat, 224x224)."""
    from skimage import data

    spec = yaml.safe_load((SPECS / "efficientformerv2-s0.yaml").read_text())
    photo = Image.fromarray(data.chelsea())
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    photo = photo.crop((left, top, left + side, top + side)).resize((224, 224), Image.Resampling.BICUBIC)
    # Two rounds: one server's throughput moved by up to 15 % between rounds here (a shared VM).
    return Workload(spec.pop("name"), spec, _json_image(_png(np.asarray(photo), "RGB")), "aot", (1, 8), 20.0,
                    batching_gain=False, compute_bound=True)


def workloads(only: list[str] | None = None) -> list[Workload]:
    found = [w for w in (classifier_workload(), timm_workload(), craft_workload()) if w is not None]
    return [w for w in found if not only or w.name in only]


def write_repository(folder: Path, specs: list[ModelSpec]) -> Path:
    """A model repository folder holding ``specs`` (what ``hybridserve serve --repository`` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        data = spec.model_dump(mode="json", exclude={"base_dir"}, exclude_defaults=True)
        data.update(name=spec.name, task=spec.task)
        (folder / f"{spec.name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for spec in specs:  # what the servers will read must load back as the same spec
        assert load_spec(folder / f"{spec.name}.yaml").model_dump(exclude={"base_dir"}) == spec.model_dump(
            exclude={"base_dir"})
    return folder

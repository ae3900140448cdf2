"""ModelSpec: one YAML file per model, the declarative contract of a served model.

A spec carries what timm's pretrained config carries (architecture, weights, the
preprocessing contract, labels) and what Triton's model config carries (batching,
replicas, placement, compile backend). Specs are frozen and reject unknown keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hybridserve_client.schemas import TASK_VERBS, Task


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocessing(_Frozen):
    input_size: tuple[int, int] | None = Field(
        default=None, description="(height, width) the model expects; required unless the task tiles."
    )
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize: Literal["stretch", "letterbox", "center_crop", "none"] = "stretch"
    color: Literal["rgb", "gray"] = "rgb"
    normalize: bool = Field(default=True, description="Apply mean/std (restoration models take [0, 1]).")
    tile: Annotated[int, Field(ge=16, le=2048)] = Field(
        default=128, description="Tile size (input pixels) of models that run in tiles: restoration, tiled segmentation.")
    tile_overlap: Annotated[int, Field(ge=0, le=512)] = 16

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        channels = 1 if self.color == "gray" else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values for color={self.color!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if self.tile_overlap * 2 >= self.tile:
            raise ValueError("tile_overlap must be less than half of tile")
        return self


class Batching(_Frozen):
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 8
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = 5.0
    max_queue: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=256, description="Items waiting per replica beyond which requests are refused (503)."
    )
    latency_slo_ms: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="If set, batch size and wait adapt at run time to keep p99 under it."
    )
    tune: bool = Field(
        default=True, description="Fill batches to the size, up to max_batch_size, that measured fastest per item "
                                  "on live batches (without a latency objective); false: always up to max_batch_size."
    )


class Autoscaling(_Frozen):
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 8.0

    @model_validator(mode="after")
    def _check(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class Device(_Frozen):
    type: Literal["cpu", "cuda"] = "cpu"
    gpus: Annotated[float, Field(ge=0, le=8)] = Field(default=0, description="GPUs per replica; fractions share a GPU.")
    cpus: Annotated[float, Field(gt=0, le=256)] = Field(default=1, description="CPUs per replica = torch threads.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per replica.")

    @model_validator(mode="after")
    def _check(self) -> Device:
        if self.type == "cuda" and self.gpus == 0:
            return self.model_copy(update={"gpus": 1.0})
        if self.type == "cpu" and self.gpus:
            raise ValueError("device.gpus needs type: cuda")
        return self


class Calibration(_Frozen):
    """The images int8 activation ranges are measured on."""

    images: str | None = Field(
        default=None, description="Folder of representative images (relative to the spec), or `builtin`: a "
        "built-in model's own training images. Required for int8 unless the model is a built-in.")
    count: Annotated[int, Field(ge=1, le=100_000)] = Field(default=64, description="Images used (the first, sorted).")
    activations: Literal["histogram", "minmax", "percentile"] = Field(
        default="histogram", description="Activation range: histogram (least squared error), min/max, or percentile.")
    percentile: Annotated[float, Field(gt=90, le=100)] = 99.99


class AccuracyGate(_Frozen):
    """What an int8 build must keep against fp32 before it is served (else the model is served in fp32)."""

    metric: Literal["auto", "heldout", "top1_agreement", "snr", "psnr"] = Field(
        default="auto", description="heldout: a built-in's held-out top-1 or PSNR (hybridserve eval); "
        "top1_agreement, snr, psnr (dB): int8 outputs against fp32 on the gate images. auto: heldout for a "
        "built-in, else top1_agreement (classification), psnr (restoration) or snr.")
    max_drop: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="heldout: largest drop allowed (top-1 points, or dB). Default 0.5 points / 0.1 dB.")
    min_value: float | None = Field(
        default=None, description="Agreement metrics: smallest value allowed. Defaults: top1_agreement 0.99, "
        "snr 20 dB, psnr 40 dB.")
    images: str | None = Field(default=None, description="Folder of gate images; default the calibration folder.")
    count: Annotated[int, Field(ge=1, le=100_000)] = 200
    max_fp32_layers: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Most layers the sensitivity pass may keep in fp32 (default: all but one).")


class Compile(_Frozen):
    backend: Literal["eager", "inductor", "aot", "tensorrt"] = "eager"
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    calibration: Calibration = Calibration()
    accuracy_gate: AccuracyGate = AccuracyGate()
    batch_buckets: tuple[Annotated[int, Field(ge=1, le=1024)], ...] | None = Field(
        default=None,
        description="Static batch sizes a compiled model is built for (batches are padded up to the next one). "
        "Unset: one dynamic batch dimension where the model exports with one, else powers of two.",
    )

    @model_validator(mode="after")
    def _check(self) -> Compile:
        if self.batch_buckets is not None:
            if not self.batch_buckets:
                raise ValueError("batch_buckets needs at least one size")
            if list(self.batch_buckets) != sorted(set(self.batch_buckets)):
                raise ValueError("batch_buckets must be increasing, without repeats")
        if self.precision == "int8" and self.backend == "eager":
            raise ValueError("precision int8 needs a compiled backend (inductor or aot): eager has no int8 kernels")
        return self


class Restoration(_Frozen):
    kind: Literal["super-resolution", "denoising", "other"] = "super-resolution"


class IQA(_Frozen):
    kind: Literal["no-reference", "full-reference"] = "no-reference"
    range: tuple[float, float] = (0.0, 1.0)
    higher_is_better: bool = True


class Segmentation(_Frozen):
    output_size: Literal["input", "model"] = Field(
        default="input", description="input: the mask is the sent image's size (logits upsampled to it); model: "
        "the size the model saw (the image resized to preprocessing.input_size, its letterbox padding cut off).")
    tiled: bool = Field(
        default=False, description="Run images at their own size in overlapping preprocessing.tile windows "
        "(tile_overlap apart, logits blended), instead of resizing them to preprocessing.input_size (leave it unset).")


# Task-specific sections of a spec: each is allowed only on its task, and filled with its defaults there.
SECTIONS: dict[str, type[_Frozen]] = {"restoration": Restoration, "iqa": IQA, "segmentation": Segmentation}


class ModelSpec(_Frozen):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
    task: Task
    architecture: str = Field(description="hybridserve:<name>, timm:<name>, spandrel, transformers:<kind>, python:<m>:<f>")
    architecture_args: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(default=None, description="File (relative to the spec), hf-hub:<repo>[/<file>], or https URL.")
    weights_sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    description: str | None = None
    preprocessing: Preprocessing = Preprocessing()
    labels: tuple[str, ...] = ()
    batching: Batching = Batching()
    replicas: Annotated[int, Field(ge=1, le=1024)] = 1
    autoscaling: Autoscaling | None = None
    device: Device = Device()
    compile: Compile = Compile()
    restoration: Restoration | None = None
    iqa: IQA | None = None
    segmentation: Segmentation | None = None
    base_dir: Path | None = Field(default=None, exclude=True, description="Folder of the spec file (set by the loader).")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.weights and self.weights.startswith("https://") and not self.weights_sha256:
            raise ValueError("weights from an https URL need weights_sha256")
        for section in SECTIONS:
            if getattr(self, section) is not None and self.task != section:
                raise ValueError(f"the {section} section is only for task: {section}")
        if self.task in SECTIONS and getattr(self, self.task) is None:
            return self.model_copy(update={self.task: SECTIONS[self.task]()})
        return self

    @property
    def verb(self) -> str:
        return TASK_VERBS[self.task]

    @property
    def needs_reference(self) -> bool:
        return self.iqa is not None and self.iqa.kind == "full-reference"


class SpecError(ValueError):
    """A spec file is unreadable or invalid; the message names the file, key and reason."""

"""The int8 accuracy gate: what a quantised build must keep against fp32 before it is served.

``heldout`` runs ``hybridserve eval``'s evaluation (``hybridserve.server.evaluation``) on a
built-in model's held-out set with the fp32 module and with the candidate, and allows a drop
of ``max_drop`` (top-1 points, or dB of PSNR). The agreement metrics compare the candidate
with fp32 on the gate images' items: ``top1_agreement`` (share of items with the same top
class), ``snr`` (output signal-to-noise ratio, dB) and ``psnr`` (of restored [0, 1] pixels,
dB), each with a floor ``min_value``. ``GateReport`` is what ``GET /v1/models/{name}``'s
reason and the artifact's ``meta.json`` carry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridserve_client.results import RestoredImage
from hybridserve.server.compiler import calibration
from hybridserve.server.compiler.quantize import Batch, output_snr
from hybridserve.server.compiler.runner import output_leaves
from hybridserve.server.core.spec import Compile
from hybridserve.server.tasks import InferenceRequest, Options, task_for_verb
from hybridserve.server.tasks.base import Item, TaskHandler

HELDOUT_MAX_DROP = {"classification": 0.5, "restoration": 0.1}  # top-1 points; dB of PSNR
MIN_VALUE = {"top1_agreement": 0.99, "snr": 20.0, "psnr": 40.0}
UNITS = {"top1": "% top-1", "psnr": " dB PSNR", "top1_agreement": " top-1 agreement", "snr": " dB SNR"}


@dataclass(frozen=True)
class GateReport:
    metric: str  # "heldout:top1", "heldout:psnr", "top1_agreement", "snr" or "psnr"
    value: float  # the int8 build's
    reference: float | None  # fp32's (held-out metrics)
    threshold: float  # largest drop (held-out) or smallest value (agreement)
    passed: bool
    images: int

    @property
    def reason(self) -> str:
        name = self.metric.split(":")[-1]
        unit = UNITS[name]
        if self.reference is not None:
            drop = self.reference - self.value
            points = "points" if name == "top1" else "dB"
            return (f"held-out {name} {self.value:.2f}{unit} vs fp32 {self.reference:.2f}: drop {drop:.2f} {points} "
                    f"{'<=' if self.passed else '>'} {self.threshold:g} on {self.images} images")
        return (f"{self.value:.4g}{unit} against fp32 {'>=' if self.passed else '<'} {self.threshold:g} "
                f"on {self.images} items")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason}


class _Predictor:
    """``hybridserve eval``'s predictor over a handler running ``module`` (the fp32 model or the candidate).

    It answers as the in-process client does (typed results; restored images as ``RestoredImage``)."""

    def __init__(self, handler: TaskHandler, module: Callable[..., Any]):
        self.handler, self.module = handler, module

    def _answers(self, verb: str, images: Sequence[Any], options: Options) -> list[Any]:
        """The typed results a client gets for ``images``, the batches run by ``module``."""
        handler = self.handler
        prepared = [handler.preprocess(InferenceRequest(image=_payload(image), options=options)) for image in images]
        items = [item for p in prepared for item in p.items]
        served, handler.module = handler.module, self.module
        try:
            size = handler.spec.batching.max_batch_size
            outputs = [out for start in range(0, len(items), size) for out in handler.forward(items[start:start + size])]
        finally:
            handler.module = served
        task, answers, start = task_for_verb(verb), [], 0
        for p in prepared:
            output = handler.postprocess(p, outputs[start:start + len(p.items)])
            answers.append(task.typed(handler.spec, output, options))
            start += len(p.items)
        return answers

    def classify(self, model: str, images: Sequence[Any], top_k: int | None = None) -> list[Any]:
        return self._answers("classify", images, Options(top_k=top_k))

    def restore(self, model: str, images: Sequence[Any], format: str = "png") -> list[RestoredImage]:
        return [RestoredImage.from_schema(result) for result in self._answers("restore", images, Options(format=format))]


def _payload(image: Any) -> bytes | np.ndarray:
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    array = np.asarray(image)
    return np.ascontiguousarray(array[:, :, None] if array.ndim == 2 else array)


def item_batches(items: Sequence[Item], size: int) -> list[Batch]:
    """Items stacked into model-input batches of at most ``size``."""
    batches = []
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        parts = [c if isinstance(c, tuple) else (c,) for c in chunk]
        batches.append(tuple(torch.stack(column) for column in zip(*parts)))
    return batches


class Gate:
    """The gate of one model: its metric, threshold and data, and the fp32 reference measured once."""

    def __init__(self, handler: TaskHandler, config: Compile, items: Sequence[Item], cache: Path):
        gate, spec = config.accuracy_gate, handler.spec
        self.handler = handler
        metric = gate.metric
        if metric == "auto":
            metric = "heldout" if calibration.builtin_kind(spec) and spec.task in HELDOUT_MAX_DROP else {
                "classification": "top1_agreement", "restoration": "psnr"}.get(spec.task, "snr")
        if metric == "heldout":
            if spec.task not in HELDOUT_MAX_DROP:
                raise calibration.CalibrationError(f"no held-out gate for {spec.task} models: use an agreement metric")
            self.dataset = calibration.heldout_set(spec, cache / "heldout" / spec.name)
            self.threshold = gate.max_drop if gate.max_drop is not None else HELDOUT_MAX_DROP[spec.task]
        else:
            self.threshold = gate.min_value if gate.min_value is not None else MIN_VALUE[metric]
        self.metric = metric
        self.batches = item_batches(list(items)[:gate.count], spec.batching.max_batch_size)
        self.count = min(len(items), gate.count)
        self._reference: Any = None

    def _heldout(self, module: Callable[..., Any]) -> float:
        from hybridserve.server.evaluation import evaluate

        options = {"channels": "rgb"} if self.handler.spec.task == "restoration" and self.dataset.scale == 1 else {}
        report = evaluate(_Predictor(self.handler, module), self.handler.spec.name, self.dataset, **options)
        return report.value * (100.0 if report.primary == "top1" else 1.0)

    def _outputs(self, module: Callable[..., Any]) -> list[Any]:
        with torch.inference_mode():
            return [module(*batch) for batch in self.batches]

    def check(self, module: Callable[..., Any]) -> GateReport:
        """Measure ``module`` against fp32 (fp32's own value is measured on the first call)."""
        eager = self.handler.module
        if self.metric == "heldout":
            if self._reference is None:
                self._reference = self._heldout(eager)
            value = self._heldout(module)
            primary = "top1" if self.handler.spec.task == "classification" else "psnr"
            return GateReport(f"heldout:{primary}", value, self._reference, self.threshold,
                              self._reference - value <= self.threshold + 1e-9, len(self.dataset))
        if self._reference is None:
            self._reference = self._outputs(eager)
        value = agreement(self.metric, self._reference, self._outputs(module))
        return GateReport(self.metric, value, None, self.threshold, value >= self.threshold, self.count)


def agreement(metric: str, reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """top1_agreement (share), snr or psnr (dB) of ``candidate`` outputs against ``reference``."""
    if metric == "snr":
        return output_snr(reference, candidate)
    first = [(output_leaves(a)[0].float(), output_leaves(b)[0].float()) for a, b in zip(reference, candidate)]
    if metric == "top1_agreement":
        same = sum(int((a.flatten(1).argmax(1) == b.flatten(1).argmax(1)).sum()) for a, b in first)
        return same / max(1, sum(a.shape[0] for a, _ in first))
    error = sum(float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).sum()) for a, b in first)
    total = sum(a.numel() for a, _ in first)
    return math.inf if error == 0 else 10 * math.log10(total / error)

"""``EvalReport``: what an evaluation measured, as numbers, a dict (``--json``) and a table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

PRIMARY_METRIC = {"classification": "top1", "detection": "map", "restoration": "psnr", "iqa": "srcc",
                  "segmentation": "miou"}
METRIC_TITLES = {
    "top1": "top-1 accuracy", "top5": "top-5 accuracy", "map": "mAP@[.5:.95] (COCO)", "map50": "mAP@0.5 (COCO)",
    "map75": "mAP@0.75 (COCO)", "psnr": "PSNR (dB)", "ssim": "SSIM", "srcc": "SRCC", "plcc": "PLCC", "krcc": "KRCC",
    "srcc_per_group": "SRCC within a group (mean)", "plcc_per_group": "PLCC within a group (mean)",
    "krcc_per_group": "KRCC within a group (mean)", "miou": "mean IoU", "pixel_accuracy": "pixel accuracy",
    "mean_accuracy": "mean class accuracy",
}


@dataclass
class EvalReport:
    """One model on one dataset: ``metrics`` holds the numbers, ``primary`` names the field's headline one.

    ``protocol`` says how the numbers were computed (channels, crop, thresholds, ...) and
    ``rows`` holds a per-item or per-class breakdown (a list of dicts with the same keys).
    """

    task: str
    model: str
    dataset: str
    count: int
    metrics: dict[str, float]
    seconds: float
    target: str = "in-process"
    protocol: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def primary(self) -> str:
        return PRIMARY_METRIC[self.task]

    @property
    def value(self) -> float:
        """The headline number (top-1, COCO mAP, PSNR, SRCC or mean IoU)."""
        return self.metrics[self.primary]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN, which JSON lacks, becomes null)."""
        return _finite({**asdict(self), "primary": self.primary})

    def table(self) -> str:
        """The report as the ``hybridserve eval`` command prints it."""
        lines = [f"{self.task} · model {self.model} · {self.target} · {self.dataset} ({self.count} "
                 f"{'rows' if self.task == 'iqa' else 'images'}) · {self.seconds:.1f} s"]
        if self.protocol:
            lines.append("protocol: " + ", ".join(f"{k} {v}" for k, v in self.protocol.items()))
        if self.rows:
            lines.append("")
            lines.extend(_grid(self.rows))
        lines.append("")
        width = max(len(METRIC_TITLES.get(k, k)) for k in self.metrics)
        for key, number in self.metrics.items():
            marker = "  <- " + self.primary if key == self.primary else ""
            lines.append(f"{METRIC_TITLES.get(key, key):<{width}}  {_number(number)}{marker}")
        return "\n".join(lines)


def _grid(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(rows[0])
    cells = [[_number(row[c]) if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    header = "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()
    body = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return [header, "  ".join("-" * w for w in widths), *body]


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value

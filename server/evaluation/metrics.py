"""The standard metric of each task, computed from predictions and ground truth.

- classification: top-k accuracy (the true label among the k best predictions);
- detection: COCO mAP@[.5:.95] and mAP@0.5 by ``pycocotools``' ``COCOeval`` (101-point
  interpolated precision, at most 100 detections an image), and AP@0.5 per category;
- restoration: PSNR and SSIM of 8-bit images on luma Y (BT.601, not rounded) or RGB, with
  ``crop`` pixels dropped at every border: the SR papers' protocol. When output and target are
  both grayscale, both metrics run on the gray values (a denoiser of gray images); a gray
  target of a colour model counts as RGB with three equal channels. The computations are the served
  ``hybridserve:psnr`` and ``hybridserve:ssim`` modules (``models/builtin/metrics.py``);
- IQA: Spearman (SRCC), Pearson (PLCC) and Kendall (KRCC) correlation between predicted
  scores and MOS (``scipy.stats``), over all rows and, when rows carry a group, the mean of the
  correlations within each group;
- segmentation: per-class IoU (intersection over union of the pixels of the class in the truth
  and in the prediction, both summed over the whole dataset, as Pascal VOC, Cityscapes and
  mmsegmentation compute it), mean IoU over the classes present in the truth or the prediction,
  pixel accuracy; pixels labelled ``ignore_index`` count for nothing.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hybridserve.models.builtin.metrics import PSNR, SSIM

RESTORATION_CHANNELS = ("y", "rgb")


def top_k_accuracy(predicted: Sequence[Sequence[str]], truth: Sequence[str], k: int) -> float:
    """Fraction of items whose true label is among their first ``k`` predicted labels."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} labels")
    return float(np.mean([label in labels[:k] for labels, label in zip(predicted, truth)]))


def coco_detection_metrics(coco: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, Any]:
    """COCOeval on bounding boxes: ``map`` (AP@[.5:.95]), ``map50``, ``map75``, per-category AP@0.5.

    ``detections`` are COCO results: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = coco
        truth.createIndex()
        names = {int(c["id"]): c["name"] for c in coco["categories"]}
        if not detections:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0, "per_category_map50": {n: 0.0 for n in names.values()}}
        found = truth.loadRes(detections)
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.params.imgIds = sorted(int(i["id"]) for i in coco["images"])
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # precision: [iou thresholds, recall points, categories, area ranges, max detections]
    precision = evaluation.eval["precision"]
    per_category = {}
    for index, category in enumerate(evaluation.params.catIds):
        curve = precision[0, :, index, 0, -1]
        per_category[names[category]] = float(curve[curve > -1].mean()) if (curve > -1).any() else float("nan")
    stats = evaluation.stats
    return {"map": float(stats[0]), "map50": float(stats[1]), "map75": float(stats[2]),
            "per_category_map50": per_category}


class RestorationMetrics:
    """PSNR and SSIM of a restored 8-bit image against its target, under one protocol.

    ``gray_images`` counts the pairs measured on their one gray channel.
    """

    def __init__(self, channels: str = "y", crop: int = 0):
        if channels not in RESTORATION_CHANNELS:
            raise ValueError(f"channels must be one of {', '.join(RESTORATION_CHANNELS)}, got {channels!r}")
        self.channels = channels
        self.crop = int(crop)
        self._colour = (PSNR(channels, self.crop), SSIM(channels, self.crop))
        self._gray = (PSNR("rgb", self.crop), SSIM("rgb", self.crop))  # one channel, taken as it is
        self.gray_images = 0

    def __call__(self, output: np.ndarray, target: np.ndarray) -> tuple[float, float]:
        output, target = _hwc(output), _hwc(target)
        if output.shape[2] != target.shape[2]:  # a colour model's answer for a gray picture, or the reverse
            output, target = (np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x for x in (output, target))
        if output.shape != target.shape:
            raise ValueError(f"restored image is {output.shape[1]}x{output.shape[0]}, target is "
                             f"{target.shape[1]}x{target.shape[0]}: the sizes must match")
        psnr, ssim = self._gray if target.shape[2] == 1 else self._colour
        self.gray_images += target.shape[2] == 1
        a, b = (torch.from_numpy(np.require(x, requirements=["C", "W"])).permute(2, 0, 1)[None].double() / 255.0
                for x in (target, output))
        with torch.inference_mode():
            return float(psnr(a, b)), float(ssim(a, b))


def _hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"restoration metrics take 8-bit images, got {image.dtype}")
    if image.ndim == 2:
        return image[:, :, None]
    return image[:, :, :3]


def correlations(predicted: Sequence[float], mos: Sequence[float]) -> dict[str, float]:
    """SRCC, PLCC and KRCC of predicted scores against subjective scores (NaN when undefined)."""
    from scipy import stats

    predicted, mos = np.asarray(predicted, dtype=np.float64), np.asarray(mos, dtype=np.float64)
    if len(predicted) < 2 or np.ptp(predicted) == 0 or np.ptp(mos) == 0:
        return {"srcc": float("nan"), "plcc": float("nan"), "krcc": float("nan")}
    return {"srcc": float(stats.spearmanr(predicted, mos).statistic),
            "plcc": float(stats.pearsonr(predicted, mos).statistic),
            "krcc": float(stats.kendalltau(predicted, mos).statistic)}


def grouped_correlations(predicted: Sequence[float], mos: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """The mean over groups of each group's correlations (groups of one row are skipped)."""
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    values = [correlations([predicted[i] for i in rows], [mos[i] for i in rows])
              for rows in by_group.values() if len(rows) > 1]
    return {f"{name}_per_group": float(np.nanmean([v[name] for v in values])) if values else float("nan")
            for name in ("srcc", "plcc", "krcc")}


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int,
                     ignore_index: int | None = None) -> np.ndarray:
    """(classes, classes) pixel counts, truth by row, prediction by column; ``ignore_index`` pixels left out.

    A truth value outside ``0 .. classes - 1`` (other than ``ignore_index``) is an error.
    """
    truth, predicted = np.asarray(truth).reshape(-1), np.asarray(predicted).reshape(-1)
    if truth.shape != predicted.shape:
        raise ValueError(f"{truth.size} labelled pixels for {predicted.size} predicted ones")
    if ignore_index is not None:
        keep = truth != ignore_index
        truth, predicted = truth[keep], predicted[keep]
    if truth.size and (truth.min() < 0 or truth.max() >= classes):
        raise ValueError(f"label value {int(truth.max() if truth.max() >= classes else truth.min())} is not a class "
                         f"index of a {classes}-class model (nor the ignore index {ignore_index})")
    pairs = truth.astype(np.int64) * classes + predicted.astype(np.int64)
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """``miou``, ``pixel_accuracy``, ``mean_accuracy`` and per-class ``iou`` / ``accuracy`` (NaN where undefined)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    right = np.diag(confusion)
    in_truth, in_prediction = confusion.sum(axis=1), confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = right / (in_truth + in_prediction - right)
        accuracy = right / in_truth
    total = confusion.sum()

    def mean(values: np.ndarray) -> float:
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    return {"miou": mean(iou), "pixel_accuracy": float(right.sum() / total) if total else float("nan"),
            "mean_accuracy": mean(accuracy), "iou": iou.tolist(), "accuracy": accuracy.tolist(),
            "pixels": in_truth.astype(np.int64).tolist()}

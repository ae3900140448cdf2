"""Mean average precision at an IoU threshold (PASCAL VOC style, all-point interpolation).

For each class, detections of all images are ranked by score; a detection is a true
positive when its IoU with a not-yet-matched ground-truth box of the same class and image
reaches the threshold (greedy, best IoU first), otherwise a false positive. AP is the area
under the precision-recall curve after making precision monotonically non-increasing
(VOC 2010+ "all points"). mAP averages AP over the classes that have ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hybridserve.models.training.scenes import Scene, scene_batch


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections: boxes (K, 4) xyxy, scores (K,), labels (K,)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class ImageTruth:
    """One image's ground truth: boxes (M, 4) xyxy (same units as detections), labels (M,)."""

    boxes: np.ndarray
    labels: np.ndarray


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (A, 4) x (B, 4) -> (A, B)."""
    boxes, others = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(others, np.float64).reshape(-1, 4)
    top_left = np.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    other_area = np.prod(np.clip(others[:, 2:] - others[:, :2], 0, None), axis=1)
    union = area[:, None] + other_area[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope, all points (recall ascending)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def class_average_precision(
    detections: Sequence[ImageDetections], truths: Sequence[ImageTruth], label: int, iou_threshold: float
) -> float | None:
    """AP of one class over all images; None when the class has no ground truth."""
    gt_boxes = [t.boxes[t.labels == label] for t in truths]
    total_truth = sum(len(b) for b in gt_boxes)
    if total_truth == 0:
        return None
    entries = [
        (float(score), image, box)
        for image, det in enumerate(detections)
        for box, score in zip(det.boxes[det.labels == label], det.scores[det.labels == label])
    ]
    entries.sort(key=lambda entry: -entry[0])
    matched = [np.zeros(len(b), dtype=bool) for b in gt_boxes]
    hits = np.zeros(len(entries))
    for rank, (_, image, box) in enumerate(entries):
        if len(gt_boxes[image]) == 0:
            continue
        ious = box_iou(box[None], gt_boxes[image])[0]
        ious[matched[image]] = -1.0
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold:
            matched[image][best] = True
            hits[rank] = 1.0
    true_positives = np.cumsum(hits)
    recall = true_positives / total_truth
    precision = true_positives / np.arange(1, len(entries) + 1)
    return average_precision(recall, precision)


def mean_average_precision(
    detections: Sequence[ImageDetections],
    truths: Sequence[ImageTruth],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> tuple[float, dict[int, float]]:
    """mAP over classes with ground truth, and each such class's AP."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection sets for {len(truths)} images")
    per_class = {}
    for label in range(num_classes):
        ap = class_average_precision(detections, truths, label, iou_threshold)
        if ap is not None:
            per_class[label] = ap
    if not per_class:
        raise ValueError("no ground-truth boxes: mAP is undefined")
    return float(np.mean(list(per_class.values()))), per_class


@torch.no_grad()
def evaluate_on_scenes(
    model: nn.Module,
    scenes: Sequence[Scene],
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    batch_size: int = 50,
) -> tuple[float, dict[int, float]]:
    """mAP@0.5 of a detector (task contract output) on generated scenes, in pixel units."""
    detections = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        boxes, scores, labels = model(scene_batch(chunk, mean, std))
        for scene, image_boxes, image_scores, image_labels in zip(chunk, boxes, scores, labels):
            height, width = scene.image.shape[:2]
            scale = np.array([width, height, width, height], dtype=np.float64)
            detections.append(
                ImageDetections(image_boxes.double().numpy() * scale, image_scores.numpy(), image_labels.numpy())
            )
    truths = [ImageTruth(scene.boxes, scene.labels) for scene in scenes]
    return mean_average_precision(detections, truths, num_classes)

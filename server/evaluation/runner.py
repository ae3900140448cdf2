"""The library API: ``evaluate(predictor, model, dataset)`` -> ``EvalReport``, one function per task.

A *predictor* is anything with the inference methods of ``hybridserve_client.Client``:
``classify(model, image, top_k=...)``, ``detect(model, image, score_threshold=...,
max_detections=...)``, ``restore(model, image)``, ``assess(model, image, reference=...)`` and
``segment(model, image)``, each taking one image or a list of them (a list answers a list, in
order). A ``Client`` on a server's URL measures the served path; ``LocalPredictor``
(``inprocess.py``) the same pipeline in this process. Images go out as the files hold them
(paths) or as uint8 arrays (noisy inputs made here); lists of ``concurrency`` images are in
flight at a time, so a batching server sees real batches. ``progress`` is called with the
number of items done after every list.

    from hybridserve_client import Client
    from hybridserve.server.evaluation import ClassificationSet, evaluate

    with Client("http://localhost:8000") as client:
        report = evaluate(client, "classifier", ClassificationSet.from_folder("digits/"))
    print(report.value, report.metrics)        # top-1, and every metric
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from hybridserve.server.evaluation.datasets import (
    ClassificationSet,
    Dataset,
    DetectionSet,
    IQASet,
    RestorationSet,
    SegmentationSet,
    load_class_map,
)
from hybridserve.server.evaluation.metrics import (
    RestorationMetrics,
    coco_detection_metrics,
    confusion_matrix,
    correlations,
    grouped_correlations,
    segmentation_metrics,
    top_k_accuracy,
)
from hybridserve.server.evaluation.report import EvalReport

Progress = Callable[[int], None]


class Predictor(Protocol):
    """The inference methods of ``hybridserve_client.Client``."""

    def classify(self, model: str, image: Any, top_k: int | None = None) -> Any: ...

    def detect(self, model: str, image: Any, score_threshold: float | None = None,
               max_detections: int | None = None) -> Any: ...

    def restore(self, model: str, image: Any, format: str = "png") -> Any: ...

    def assess(self, model: str, image: Any, reference: Any = None) -> Any: ...

    def segment(self, model: str, image: Any) -> Any: ...


def _in_lists(items: Sequence[Any], size: int, call: Callable[[list[Any]], list[Any]],
              progress: Progress | None) -> list[Any]:
    if size < 1:
        raise ValueError(f"concurrency must be at least 1, got {size}")
    results: list[Any] = []
    for start in range(0, len(items), size):
        chunk = list(items[start:start + size])
        answers = call(chunk)
        if len(answers) != len(chunk):
            raise RuntimeError(f"the predictor answered {len(answers)} results for {len(chunk)} images")
        results.extend(answers)
        if progress is not None:
            progress(len(chunk))
    return results


def evaluate_classification(predictor: Predictor, model: str, dataset: ClassificationSet, *, top_k: int = 5,
                            concurrency: int = 8, progress: Progress | None = None, target: str = "in-process"
                            ) -> EvalReport:
    """Top-1 and top-``top_k`` accuracy; ``rows`` holds each class's top-1 accuracy."""
    started = time.perf_counter()
    paths = [path for path, _ in dataset.samples]
    results = _in_lists(paths, concurrency, lambda chunk: predictor.classify(model, chunk, top_k=top_k), progress)
    predicted = [[p.label for p in result.predictions] for result in results]
    truth = [dataset.label_of(name) for _, name in dataset.samples]
    metrics = {"top1": top_k_accuracy(predicted, truth, 1)}
    if top_k > 1:
        metrics[f"top{top_k}"] = top_k_accuracy(predicted, truth, top_k)
    rows = []
    for label in sorted(set(truth), key=truth.index):
        members = [i for i, t in enumerate(truth) if t == label]
        rows.append({"label": label, "images": len(members),
                     "top-1": top_k_accuracy([predicted[i] for i in members], [label] * len(members), 1)})
    return EvalReport("classification", model, dataset.name, len(dataset), metrics,
                      time.perf_counter() - started, target, {"top_k": top_k}, rows)


def evaluate_detection(predictor: Predictor, model: str, dataset: DetectionSet, *, score_threshold: float = 0.0,
                       max_detections: int = 100, concurrency: int = 8, progress: Progress | None = None,
                       target: str = "in-process") -> EvalReport:
    """COCO mAP@[.5:.95] and mAP@0.5 (pycocotools); ``rows`` holds AP@0.5 per category."""
    started = time.perf_counter()
    category_of = dataset.category_ids()
    results = _in_lists([image.path for image in dataset.images], concurrency,
                        lambda chunk: predictor.detect(model, chunk, score_threshold=score_threshold,
                                                       max_detections=max_detections), progress)
    found, unknown = [], set()
    for image, result in zip(dataset.images, results):
        if (result.width, result.height) != (image.width, image.height):
            raise ValueError(f"{image.path.name}: the annotation file says {image.width}x{image.height}, "
                             f"the model saw {result.width}x{result.height}")
        for detection in result.detections:
            if detection.label not in category_of:
                unknown.add(detection.label)
                continue
            x1, y1, x2, y2 = detection.box
            found.append({"image_id": image.id, "category_id": category_of[detection.label],
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "score": detection.score})
    if unknown and not found:
        raise ValueError(f"no served label ({', '.join(sorted(unknown))}) is a category of {dataset.annotation_file}: "
                         "give a label map (category name -> served label)")
    scores = coco_detection_metrics(dataset.coco, found)
    rows = [{"category": name, "AP@0.5": ap} for name, ap in scores.pop("per_category_map50").items()]
    protocol = {"score_threshold": score_threshold, "max_detections": max_detections}
    if unknown:
        protocol["ignored_labels"] = ", ".join(sorted(unknown))
    return EvalReport("detection", model, dataset.name, len(dataset), scores, time.perf_counter() - started,
                      target, protocol, rows)


def evaluate_restoration(predictor: Predictor, model: str, dataset: RestorationSet, *, channels: str = "y",
                         crop: int | None = None, concurrency: int = 4, progress: Progress | None = None,
                         target: str = "in-process") -> EvalReport:
    """Mean PSNR and SSIM over the images; ``crop`` defaults to the scale (0 for denoising).

    The SR papers' protocol (../shared/eval/README.md): the target cropped to input size x
    scale, the 8-bit output as the server returns it, ``crop`` pixels dropped at every border,
    luma Y (BT.601, not rounded) or RGB, PSNR with peak 255; ``rows`` holds every image's scores.
    """
    started = time.perf_counter()
    crop = (dataset.scale if dataset.scale > 1 else 0) if crop is None else crop
    measure = RestorationMetrics(channels, crop)


    def restore(chunk: list[Any]) -> list[dict[str, Any]]:  # loaded a list at a time: targets can be large
        loaded = [dataset.load(pair) for pair in chunk]
        results = predictor.restore(model, [source for source, _ in loaded])
        return [dict(zip(("image", "psnr", "ssim"), (pair.name, *measure(result.array(), target_pixels))))
                for pair, (_, target_pixels), result in zip(chunk, loaded, results)]

    rows = _in_lists(dataset.pairs, concurrency, restore, progress)
    if measure.gray_images:  # grayscale output and target: measured on the gray values
        mixed = f"{channels} ({measure.gray_images} gray images: gray)"
        channels = "gray" if measure.gray_images == len(rows) else mixed
    metrics = {"psnr": sum(r["psnr"] for r in rows) / len(rows), "ssim": sum(r["ssim"] for r in rows) / len(rows)}
    protocol = {"channels": channels, "crop": crop, "scale": dataset.scale}
    if dataset.noise_sigma is not None:
        protocol.update(noise_sigma=dataset.noise_sigma, seed=dataset.seed)
    return EvalReport("restoration", model, dataset.name, len(dataset), metrics, time.perf_counter() - started,
                      target, protocol, rows)


def evaluate_iqa(predictor: Predictor, model: str, dataset: IQASet, *, concurrency: int = 8,
                 progress: Progress | None = None, target: str = "in-process") -> EvalReport:
    """SRCC, PLCC and KRCC of the model's scores against MOS (and within groups, where the CSV has them)."""
    started = time.perf_counter()
    rows = dataset.rows
    full_reference = rows[0].reference is not None
    if any((row.reference is not None) != full_reference for row in rows):
        raise ValueError(f"{dataset.csv_file}: give a reference for every row or for none")

    def assess(chunk: list[Any]) -> list[Any]:
        images = [row.image for row in chunk]
        return predictor.assess(model, images, reference=[row.reference for row in chunk] if full_reference else None)

    scores = [result.score for result in _in_lists(rows, concurrency, assess, progress)]
    mos = [row.mos for row in rows]
    metrics = correlations(scores, mos)
    groups = [row.group for row in rows]
    if all(group is not None for group in groups):
        metrics.update(grouped_correlations(scores, mos, groups))
    protocol = {"kind": "full-reference" if full_reference else "no-reference",
                "groups": len(set(groups)) if groups[0] is not None else 0}
    return EvalReport("iqa", model, dataset.name, len(dataset), metrics, time.perf_counter() - started, target,
                      protocol)


def evaluate_segmentation(predictor: Predictor, model: str, dataset: SegmentationSet, *, concurrency: int = 8,
                          progress: Progress | None = None, target: str = "in-process") -> EvalReport:
    """Mean IoU, pixel accuracy and mean class accuracy over the dataset's pixels; ``rows`` per class.

    The served mask (the image's size, a class index per pixel) is compared with the label
    image pixel for pixel; counts are summed over every image before dividing.
    """
    started = time.perf_counter()
    labels: list[str] = []
    confusion: Any = 0

    def segment(chunk: list[Any]) -> list[Any]:
        nonlocal labels, confusion
        results = predictor.segment(model, [image for image, _ in chunk])
        for (image, label_file), result in zip(chunk, results):
            labels = labels or list(result.labels)
            mask, truth = result.mask_array(), load_class_map(label_file)
            if mask.shape != truth.shape:
                raise ValueError(f"{label_file.name} is {truth.shape[1]}x{truth.shape[0]}, the mask of "
                                 f"{image.name} {mask.shape[1]}x{mask.shape[0]}: the sizes must match")
            try:
                confusion = confusion + confusion_matrix(truth, mask, len(labels), dataset.ignore_index)
            except ValueError as exc:
                raise ValueError(f"{label_file}: {exc}") from None
        return results

    _in_lists(dataset.pairs, concurrency, segment, progress)
    scores = segmentation_metrics(confusion)
    rows = [{"class": name, "pixels": pixels, "IoU": iou, "accuracy": accuracy}
            for name, pixels, iou, accuracy in zip(labels, scores.pop("pixels"), scores.pop("iou"),
                                                   scores.pop("accuracy"))]
    return EvalReport("segmentation", model, dataset.name, len(dataset), scores, time.perf_counter() - started,
                      target, {"ignore_index": dataset.ignore_index}, rows)


def evaluate(predictor: Predictor, model: str, dataset: Dataset, **options: Any) -> EvalReport:
    """Evaluate ``model`` on ``dataset`` with the task's function (chosen by the dataset's type)."""
    if isinstance(dataset, ClassificationSet):
        return evaluate_classification(predictor, model, dataset, **options)
    if isinstance(dataset, DetectionSet):
        return evaluate_detection(predictor, model, dataset, **options)
    if isinstance(dataset, RestorationSet):
        return evaluate_restoration(predictor, model, dataset, **options)
    if isinstance(dataset, IQASet):
        return evaluate_iqa(predictor, model, dataset, **options)
    if isinstance(dataset, SegmentationSet):
        return evaluate_segmentation(predictor, model, dataset, **options)
    raise TypeError(f"no evaluation for a {type(dataset).__name__}")

"""``hybridserve eval`` in-process on the built-in models' held-out sets, written to disk by the exporter.

The exporter writes the held-out data in the standard layouts (ImageFolder, COCO JSON, CSV,
image and label-image folders); the eval command reads those files and must give the numbers
of the model cards (models/repository/classifier.md, detector.md, quality.md, segmenter.md),
which were measured by calling the models directly on the same held-out data.
tests/test_eval_live.py checks the same numbers through a running server.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hybridserve.models.training import export_heldout
from hybridserve.models.training.detection_eval import ImageDetections, ImageTruth, mean_average_precision
from hybridserve.server.cli.main import main
from hybridserve.server.evaluation import ClassificationSet, DetectionSet, LocalPredictor, SegmentationSet, evaluate
from hybridserve.server.evaluation.datasets import DatasetError
from hybridserve.server.evaluation.metrics import coco_detection_metrics, confusion_matrix, segmentation_metrics

CARD_TOP1 = 449 / 450  # classifier.md: 99.78% (449 / 450)
CARD_MAP50_VOC = 0.944  # detector.md: first 200 held-out scenes, VOC all-point mAP@0.5
CARD_SRCC_WITHIN = {"blur": 1.00, "noise": 0.99, "jpeg": 0.91}  # quality.md, within a photograph
CARD_SRCC_POOLED = {"blur": 0.59, "noise": 0.53, "jpeg": 0.44}  # quality.md, pooled over the photographs
# segmenter.md, first 200 held-out scenes: mean IoU and IoU per class (background, circle, square, triangle)
CARD_MIOU, CARD_CLASS_IOU = 0.944, (0.987, 0.941, 0.958, 0.888)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    for task in export_heldout.TASKS:
        assert export_heldout.main(["--task", task, "--out", str(root / task)]) == 0
    return root


def eval_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_exported_layouts_are_the_standard_ones(heldout) -> None:
    classes = sorted(p.name for p in (heldout / "classification").iterdir())
    assert classes == [str(d) for d in range(10)]
    assert sum(len(list((heldout / "classification" / c).glob("*.png"))) for c in classes) == 450
    coco = json.loads((heldout / "detection" / "annotations.json").read_text())
    assert len(coco["images"]) == 200 and [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
    assert all(len(a["bbox"]) == 4 and a["iscrowd"] == 0 for a in coco["annotations"])
    assert (heldout / "iqa" / "blur.csv").read_text().splitlines()[0] == "image,mos,group"
    segmentation = SegmentationSet.from_folders(heldout / "segmentation")
    assert len(segmentation) == 200 and segmentation.ignore_index == 255
    image, label = segmentation.pairs[0]
    assert image.name == label.name and label.parent.name == "labels"
    assert set(np.unique(np.asarray(Image.open(label))).tolist()) <= {0, 1, 2, 3}


def test_classifier_reproduces_its_card(heldout, capsys) -> None:
    report = eval_json(capsys, "classification", "classifier", str(heldout / "classification"))
    assert report["count"] == 450 and report["primary"] == "top1"
    assert report["metrics"]["top1"] == pytest.approx(CARD_TOP1)
    assert report["metrics"]["top5"] >= report["metrics"]["top1"]
    assert {row["label"] for row in report["rows"]} == {str(d) for d in range(10)}


def test_label_map_renames_class_folders(heldout, tmp_path) -> None:
    """Folders named otherwise than the served labels, mapped back by a label map; a spread subset."""
    for folder in (heldout / "classification").iterdir():
        (tmp_path / f"digit-{folder.name}").symlink_to(folder, target_is_directory=True)
    mapping = {f"digit-{d}": str(d) for d in range(10)}
    dataset = ClassificationSet.from_folder(tmp_path, mapping)
    with LocalPredictor(["classifier"]) as predictor:
        from hybridserve.server.evaluation import subset

        report = evaluate(predictor, "classifier", subset(dataset, 100), top_k=3)
        unmapped = evaluate(predictor, "classifier", subset(ClassificationSet.from_folder(tmp_path), 20))
    assert report.count == 100 and {row["label"] for row in report.rows} == {str(d) for d in range(10)}
    assert report.metrics["top1"] >= 0.97 and set(report.metrics) == {"top1", "top3"}
    assert unmapped.metrics["top1"] == 0.0  # "digit-7" is never the served label "7"


def test_detector_reproduces_its_card_through_pycocotools(heldout, capsys) -> None:
    annotations = heldout / "detection" / "annotations.json"
    report = eval_json(capsys, "detection", "detector", str(annotations))
    metrics = report["metrics"]
    assert report["count"] == 200 and report["primary"] == "map"
    assert 0.3 < metrics["map"] < metrics["map75"] < metrics["map50"]
    # The card's 0.944 is VOC all-point AP; COCO interpolates at 101 recall points: close, not equal.
    assert metrics["map50"] == pytest.approx(CARD_MAP50_VOC, abs=0.01)
    # The same served detections scored the card's way give the card's number.
    dataset = DetectionSet.from_coco(annotations)
    names = ["circle", "square", "triangle"]
    with LocalPredictor(["detector"]) as predictor:
        results = predictor.detect("detector", [image.path for image in dataset.images], score_threshold=0.0)
    found = [ImageDetections(np.array([d.box for d in r.detections]).reshape(-1, 4),
                             np.array([d.score for d in r.detections]), np.array([d.index for d in r.detections]))
             for r in results]
    truths = []
    for image in dataset.images:
        boxes = [a["bbox"] for a in dataset.coco["annotations"] if a["image_id"] == image.id]
        labels = [a["category_id"] - 1 for a in dataset.coco["annotations"] if a["image_id"] == image.id]
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes]).reshape(-1, 4)
        truths.append(ImageTruth(xyxy, np.array(labels)))
    voc, _ = mean_average_precision(found, truths, len(names))
    assert round(voc, 3) == CARD_MAP50_VOC


def test_coco_wrapper_on_known_cases() -> None:
    coco = {"images": [{"id": 1, "width": 50, "height": 50, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "area": 400,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}],
            "categories": [{"id": 7, "name": "circle"}, {"id": 9, "name": "square"}]}
    perfect = [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "score": 0.9},
               {"image_id": 1, "category_id": 9, "bbox": [0, 0, 5, 5], "score": 0.8}]
    assert coco_detection_metrics(coco, perfect)["map"] == pytest.approx(1.0)
    # The square found at IoU 16/25 = 0.64: it counts at IoU 0.5, 0.55 and 0.6, not from 0.65 up.
    shifted = [perfect[0], {**perfect[1], "bbox": [1, 1, 4, 4]}]
    scores = coco_detection_metrics(coco, shifted)
    assert scores["map50"] == pytest.approx(1.0)
    assert scores["per_category_map50"] == {"circle": pytest.approx(1.0), "square": pytest.approx(1.0)}
    assert scores["map"] == pytest.approx((1.0 + 3 / 10) / 2)
    assert coco_detection_metrics(coco, [])["map"] == 0.0


@pytest.mark.parametrize("kind", ["blur", "noise", "jpeg"])
def test_quality_model_reproduces_its_card_spearman(heldout, capsys, kind: str) -> None:
    report = eval_json(capsys, "iqa", "quality", str(heldout / "iqa" / f"{kind}.csv"))
    metrics = report["metrics"]
    assert report["count"] == 24 and report["protocol"] == {"kind": "no-reference", "groups": 4}
    assert metrics["srcc_per_group"] == pytest.approx(CARD_SRCC_WITHIN[kind], abs=0.005)
    assert metrics["srcc"] == pytest.approx(CARD_SRCC_POOLED[kind], abs=0.02)
    assert -1 <= metrics["plcc"] <= 1 and -1 <= metrics["krcc"] <= 1


def test_segmenter_reproduces_its_card_mean_iou(heldout, capsys) -> None:
    report = eval_json(capsys, "segmentation", "segmenter", str(heldout / "segmentation"))
    assert report["count"] == 200 and report["primary"] == "miou"
    assert round(report["metrics"]["miou"], 3) == CARD_MIOU
    assert [row["class"] for row in report["rows"]] == ["background", "circle", "square", "triangle"]
    assert [round(row["IoU"], 3) for row in report["rows"]] == pytest.approx(CARD_CLASS_IOU, abs=0.0011)
    assert sum(row["pixels"] for row in report["rows"]) == 200 * 128 * 128
    assert report["metrics"]["pixel_accuracy"] == pytest.approx(0.988, abs=0.0005)  # the card's pixel accuracy


def test_segmentation_metrics_on_known_cases() -> None:
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 255], [2, 2, 2, 255]])
    predicted = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [2, 2, 0, 3]])
    confusion = confusion_matrix(truth, predicted, 4, ignore_index=255)
    assert confusion.sum() == 10 and confusion.tolist() == [[3, 1, 0, 0], [0, 3, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    scores = segmentation_metrics(confusion)
    # background 3 / (4 + 4 - 3), class 1 3 / (3 + 4 - 3), class 2 2 / 3; class 3 nowhere: left out of the mean
    assert scores["iou"][:3] == pytest.approx([3 / 5, 3 / 4, 2 / 3]) and np.isnan(scores["iou"][3])
    assert scores["miou"] == pytest.approx((3 / 5 + 3 / 4 + 2 / 3) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(8 / 10)
    with pytest.raises(ValueError, match="label value 7"):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), 4, ignore_index=255)


def test_segmentation_layout_errors_name_the_file(heldout, tmp_path, capsys) -> None:
    with pytest.raises(DatasetError, match="images/ and labels/"):
        SegmentationSet.from_folders(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    with pytest.raises(DatasetError, match="no label image named like a.png"):
        SegmentationSet.from_folders(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "labels" / "a.png")
    assert main(["eval", "segmentation", "segmenter", str(tmp_path), "--no-progress"]) == 2
    assert "one channel of class indices" in capsys.readouterr().err


def test_wrong_task_and_bad_data_exit_2(heldout, capsys) -> None:
    assert main(["eval", "detection", "classifier", str(heldout / "detection" / "annotations.json")]) == 2
    assert "does classification, not detection" in capsys.readouterr().err
    assert main(["eval", "classification", "classifier", str(heldout / "iqa" / "blur.csv")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_package_exports_its_api() -> None:
    import hybridserve.server.evaluation as evaluation

    assert evaluation.__all__ and all(hasattr(evaluation, name) for name in evaluation.__all__)
    assert {"evaluate", "EvalReport", "LocalPredictor", "Predictor"} <= set(evaluation.__all__)

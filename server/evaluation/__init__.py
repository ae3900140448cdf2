"""hybridserve.server.evaluation: a model's standard metric on a dataset, as a library and as ``hybridserve eval``.

    from hybridserve.server.evaluation import LocalPredictor, RestorationSet, evaluate

    with LocalPredictor(["denoiser"]) as predictor:  # or hybridserve_client.Client(url)
        report = evaluate(predictor, "denoiser", RestorationSet.from_clean("clean/", noise_sigma=25))
    print(report.value)  # the field's headline number: top-1, COCO mAP, PSNR, SRCC or mean IoU

``datasets`` reads the five on-disk layouts (``files`` the files in them), ``metrics``
computes each task's metric, ``runner`` runs a predictor (anything with
``hybridserve_client.Client``'s inference methods) over a dataset, ``report`` holds the
result, ``inprocess`` is the predictor over models loaded in this process and ``cli`` the
command. docs/eval.md shows it at work.
"""

from hybridserve.server.evaluation.datasets import (
    ClassificationSet,
    DatasetError,
    DetectionSet,
    IQASet,
    RestorationSet,
    SegmentationSet,
    subset,
)
from hybridserve.server.evaluation.inprocess import LocalPredictor
from hybridserve.server.evaluation.report import EvalReport
from hybridserve.server.evaluation.runner import (
    Predictor,
    evaluate,
    evaluate_classification,
    evaluate_detection,
    evaluate_iqa,
    evaluate_restoration,
    evaluate_segmentation,
)

__all__ = [
    "ClassificationSet",
    "DatasetError",
    "DetectionSet",
    "EvalReport",
    "IQASet",
    "LocalPredictor",
    "Predictor",
    "RestorationSet",
    "SegmentationSet",
    "evaluate",
    "evaluate_classification",
    "evaluate_detection",
    "evaluate_iqa",
    "evaluate_restoration",
    "evaluate_segmentation",
    "subset",
]

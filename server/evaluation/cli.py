"""``hybridserve eval``: a model's standard metric on a dataset, in-process or through a running server.

    hybridserve eval classification classifier heldout/classification
    hybridserve eval detection detector heldout/detection/annotations.json
    hybridserve eval restoration craft-x4 ../shared/eval/sr/Set5 --scale 4 --url http://localhost:8000
    hybridserve eval restoration dncnn-25 ../shared/eval/denoise/Set12 --noise-sigma 25 --seed 0
    hybridserve eval iqa quality heldout/iqa/blur.csv --url grpc://localhost:9000
    hybridserve eval segmentation segmenter heldout/segmentation

Without ``--url`` the model is loaded from ``--repository`` (default: the built-in models) into
this process; with it, every image goes through ``hybridserve_client.Client`` (HTTP or gRPC),
so the served path is what gets measured. A progress bar goes to stderr, the table (or, with
``--json``, the report as JSON) to stdout. Exit status: 0 on success, 2 on a usage or data error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from hybridserve.server.evaluation.datasets import (
    ClassificationSet,
    DatasetError,
    DetectionSet,
    IQASet,
    RestorationSet,
    SegmentationSet,
    read_label_map,
    subset,
)
from hybridserve.server.evaluation.metrics import RESTORATION_CHANNELS
from hybridserve.server.evaluation.runner import evaluate

TASKS = ("classification", "detection", "restoration", "iqa", "segmentation")


class ProgressBar:
    """A one-line progress bar on a terminal; on anything else, nothing until the last item."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None, enabled: bool = True):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.started = time.perf_counter()
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()

    def __call__(self, count: int) -> None:
        self.done += count
        if self.live or (self.enabled and self.done >= self.total):
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:.1f}/s"
            self.stream.write(("\r" if self.live else "") + line + ("\n" if self.done >= self.total else ""))
            self.stream.flush()


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` and its per-task sub-commands to the ``hybridserve`` parser."""
    eval_p = subparsers.add_parser("eval", help="measure a model's standard metric on a dataset",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = eval_p.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="the model's name (in the repository, or on the server)")
    where = common.add_argument_group("where the model runs")
    where.add_argument("--url", help="a running server: http://host:8000 or grpc://host:9000 (default: in-process)")
    where.add_argument("--repository", help="in-process: folder of *.yaml specs (default: the built-in models)")
    where.add_argument("--device", choices=["cpu", "cuda"], help="in-process: override the spec's device")
    where.add_argument("--api-key", help="the server's API key (X-API-Key)")
    where.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    where.add_argument("--concurrency", type=int, default=8, help="requests in flight at a time (default 8)")
    out = common.add_argument_group("output")
    out.add_argument("--limit", type=int, help="evaluate this many items, spread evenly over the dataset")
    out.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    out.add_argument("--verbose", action="store_true", help="log model loading and every request")

    cls_p = tasks.add_parser("classification", parents=[common], help="top-1 / top-5 from a folder per class")
    cls_p.add_argument("data", help="folder with one sub-folder of images per class (ImageFolder layout)")
    cls_p.add_argument("--label-map", help="JSON object or two-column CSV: class folder name -> served label")
    cls_p.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy (default 5)")

    det_p = tasks.add_parser("detection", parents=[common], help="COCO mAP from a COCO annotation file")
    det_p.add_argument("data", help="COCO-format annotation JSON")
    det_p.add_argument("--images", help="folder the file_names are relative to (default: the JSON's folder)")
    det_p.add_argument("--label-map", help="JSON object or two-column CSV: category name -> served label")
    det_p.add_argument("--score-threshold", type=float, default=0.0, help="keep detections scoring at least this")
    det_p.add_argument("--max-detections", type=int, default=100, help="detections per image (COCO: 100)")

    res_p = tasks.add_parser("restoration", parents=[common], help="PSNR / SSIM (Y or RGB) for SR and denoising")
    res_p.add_argument("data", help="SR layout (HR/ + LR_bicubic/X<s>/), input folder (with --target), "
                                    "or clean images (with --noise-sigma)")
    res_p.add_argument("--target", help="folder of targets with the same names as the inputs in DATA")
    res_p.add_argument("--scale", type=int, help="SR scale (default: the only LR_bicubic/X<s>, or the size ratio)")
    res_p.add_argument("--noise-sigma", type=float, help="denoising: add N(0, sigma) noise (0-255 scale) to DATA")
    res_p.add_argument("--seed", type=int, default=0, help="denoising: the noise's seed (default 0)")
    res_p.add_argument("--channels", choices=RESTORATION_CHANNELS, default="y",
                       help="luma Y (BT.601, the SR papers') or RGB (default y; gray images are their own luma)")
    res_p.add_argument("--crop", type=int, help="pixels dropped at every border (default: the scale; 0 for denoising)")

    iqa_p = tasks.add_parser("iqa", parents=[common], help="SRCC / PLCC / KRCC against a CSV of MOS")
    iqa_p.add_argument("data", help="CSV with columns image, [reference], mos, [group]; paths relative to it")

    seg_p = tasks.add_parser("segmentation", parents=[common], help="mean IoU from images and label images")
    seg_p.add_argument("data", help="folder with images/ and labels/ (same names), or the image folder (with --labels)")
    seg_p.add_argument("--labels", help="folder of label images: one channel, a class index per pixel")
    seg_p.add_argument("--ignore-index", type=int, default=255, help="label value of unlabelled pixels (default 255)")
    for parser in (cls_p, det_p, res_p, iqa_p, seg_p):
        parser.set_defaults(func=cmd_eval)
    return eval_p


def read_dataset(args: argparse.Namespace) -> Any:
    """The dataset the task's arguments describe."""
    task = args.eval_task
    if task == "classification":
        return ClassificationSet.from_folder(args.data, read_label_map(args.label_map))
    if task == "detection":
        return DetectionSet.from_coco(args.data, args.images, read_label_map(args.label_map))
    if task == "iqa":
        return IQASet.from_csv(args.data)
    if task == "segmentation":
        return SegmentationSet.from_folders(args.data, args.labels, args.ignore_index)
    if args.noise_sigma is not None:
        return RestorationSet.from_clean(args.data, args.noise_sigma, args.seed)
    if args.target:
        return RestorationSet.from_folders(args.data, args.target, args.scale)
    return RestorationSet.from_sr_folder(args.data, args.scale)


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the task's ``evaluate_*`` function."""
    options: dict[str, Any] = {"concurrency": args.concurrency}
    if args.eval_task == "classification":
        options["top_k"] = args.top_k
    elif args.eval_task == "detection":
        options.update(score_threshold=args.score_threshold, max_detections=args.max_detections)
    elif args.eval_task == "restoration":
        options.update(channels=args.channels, crop=args.crop)
    return options


def open_predictor(args: argparse.Namespace) -> Any:
    """A ``Client`` on ``--url``, else a ``LocalPredictor`` with the model loaded here."""
    if args.url:
        if args.repository or args.device:
            raise DatasetError("--repository and --device are for in-process runs; the server at --url has its own")
        from hybridserve_client import Client

        return Client(args.url, api_key=args.api_key, timeout=args.timeout, max_in_flight=args.concurrency)
    from hybridserve.server.evaluation.inprocess import LocalPredictor

    return LocalPredictor([args.model], args.repository, args.device, timeout_s=args.timeout)


@contextlib.contextmanager
def quiet_loggers(enabled: bool) -> Iterator[None]:
    """Model loads and one log line per request would bury the progress bar: hide them meanwhile."""
    loggers = [logging.getLogger(name) for name in ("hybridserve", "httpx")] if enabled else []
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def cmd_eval(args: argparse.Namespace) -> int:
    with quiet_loggers(not args.verbose):
        return run_eval(args)


def run_eval(args: argparse.Namespace) -> int:
    from hybridserve_client import HybridServeError

    try:
        predictor = open_predictor(args)
    except (DatasetError, LookupError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with predictor:
            info = predictor.model(args.model)
            if info.task != args.eval_task:
                print(f"error: model {args.model!r} does {info.task}, not {args.eval_task}", file=sys.stderr)
                return 2
            if args.eval_task == "restoration" and args.scale is None:
                args.scale = info.input.scale  # None where the spec does not say (then the data must)
            try:
                dataset = subset(read_dataset(args), args.limit)
            except (DatasetError, OSError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            progress = ProgressBar(len(dataset), f"{args.model}", enabled=not args.no_progress)
            report = evaluate(predictor, args.model, dataset, progress=progress,
                              target=args.url or "in-process", **task_options(args))
    except HybridServeError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
    return 0

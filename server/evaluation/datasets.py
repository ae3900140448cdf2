"""Readers for the five on-disk evaluation layouts, one dataclass per task.

- ``ClassificationSet.from_folder``: one folder per class holding its images (torchvision's
  ``ImageFolder`` convention: classes are the sorted folder names, images are the files with
  an image extension, sorted); an optional label map turns a folder name into the served label.
- ``DetectionSet.from_coco``: a COCO-format annotation file (``images``, ``annotations`` with
  ``bbox`` as ``[x, y, width, height]`` in pixels, ``categories``); ``file_name`` is relative
  to the image folder (by default the annotation file's folder). Category names are matched
  to served labels, through the label map where one is given.
- ``RestorationSet``: ``from_sr_folder`` reads the SR benchmark layout (``HR/<name>.png`` and
  ``LR_bicubic/X<s>/<name>x<s>.png``, as in Set5 and Set14), ``from_folders`` two folders of
  inputs and targets with matching names, ``from_clean`` clean images that become noisy inputs
  with seeded Gaussian noise (``noise_sigma`` on the 0-255 scale).
- ``IQASet.from_csv``: a CSV with an ``image`` column, an optional ``reference`` column
  (full-reference IQA), a ``mos`` column (the subjective score; ``dmos`` is read too) and an
  optional ``group`` column (content, e.g. the source photograph); paths are relative to the
  CSV's folder.
- ``SegmentationSet.from_folders``: a folder of images and a folder of label images with the
  same names (``images/`` and ``labels/`` under one root by default); a label image is a
  one-channel PNG (grayscale or palette, as Pascal VOC's) whose pixel values are class indices
  in the served model's ``labels`` order, ``ignore_index`` (255 by default) marking unlabelled
  pixels.

Every reader checks what it reads and says which file is wrong; ``subset`` keeps ``limit``
items spread evenly over a dataset.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from hybridserve.server.evaluation.files import (
    IMAGE_EXTENSIONS,
    DatasetError,
    image_files,
    load_class_map,
    load_pixels,
    read_label_map,
)

__all__ = ["ClassificationSet", "Dataset", "DatasetError", "DetectionSet", "IQASet", "RestorationSet",
           "SegmentationSet", "image_files", "load_class_map", "load_pixels", "noisy_input", "read_label_map",
           "subset"]

# --------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class ClassificationSet:
    """Images with their class folder's name; ``label_of`` gives the label the server should answer."""

    root: Path
    samples: tuple[tuple[Path, str], ...]
    label_map: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, root: str | Path, label_map: dict[str, str] | None = None) -> ClassificationSet:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root} is not a folder (expected one sub-folder of images per class)")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        samples = tuple((path, name) for name in classes for path in image_files(root / name))
        if not samples:
            raise DatasetError(f"{root}: no class folders with images ({', '.join(IMAGE_EXTENSIONS)})")
        label_map = dict(label_map or {})
        unmapped = sorted(set(label_map) - set(classes))
        if unmapped:
            raise DatasetError(f"label map names classes that {root} does not have: {', '.join(unmapped[:8])}")
        return cls(root, samples, label_map)

    @property
    def name(self) -> str:
        return self.root.name

    def __len__(self) -> int:
        return len(self.samples)

    def label_of(self, class_name: str) -> str:
        return self.label_map.get(class_name, class_name)


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class DetectionImage:
    id: int
    path: Path
    width: int
    height: int


@dataclass(frozen=True)
class DetectionSet:
    """A COCO annotation file (as loaded, completed with ``area`` and ``iscrowd``) and its images."""

    annotation_file: Path
    coco: dict[str, Any]
    images: tuple[DetectionImage, ...]
    label_map: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_coco(cls, annotation_file: str | Path, images: str | Path | None = None,
                  label_map: dict[str, str] | None = None) -> DetectionSet:
        annotation_file = Path(annotation_file)
        try:
            coco = json.loads(annotation_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{annotation_file}: cannot read a COCO annotation file: {exc}") from exc
        for key in ("images", "annotations", "categories"):
            if not isinstance(coco.get(key), list):
                raise DatasetError(f"{annotation_file}: a COCO annotation file needs a list of {key!r}")
        folder = Path(images) if images is not None else annotation_file.parent
        entries = []
        for image in coco["images"]:
            path = folder / image["file_name"]
            if not path.is_file():
                raise DatasetError(f"{annotation_file}: image {image['file_name']!r} not found in {folder}")
            entries.append(DetectionImage(int(image["id"]), path, int(image["width"]), int(image["height"])))
        for annotation in coco["annotations"]:  # what COCOeval reads and small files often omit
            x, y, w, h = annotation["bbox"]
            annotation.setdefault("area", float(w) * float(h))
            annotation.setdefault("iscrowd", 0)
        if not entries:
            raise DatasetError(f"{annotation_file}: no images")
        return cls(annotation_file, coco, tuple(entries), dict(label_map or {}))

    @property
    def name(self) -> str:
        return f"{self.annotation_file.parent.name}/{self.annotation_file.name}"

    def __len__(self) -> int:
        return len(self.images)

    def category_ids(self) -> dict[str, int]:
        """Served label -> COCO category id."""
        return {self.label_map.get(c["name"], c["name"]): int(c["id"]) for c in self.coco["categories"]}

    def restricted(self, images: Sequence[DetectionImage]) -> DetectionSet:
        ids = {image.id for image in images}
        coco = {**self.coco, "images": [i for i in self.coco["images"] if int(i["id"]) in ids],
                "annotations": [a for a in self.coco["annotations"] if int(a["image_id"]) in ids]}
        return replace(self, coco=coco, images=tuple(images))


# --------------------------------------------------------------------------- restoration


@dataclass(frozen=True)
class RestorationPair:
    """One test image: the model's input (a file, or None when it is made by adding noise) and the target."""

    name: str
    target: Path
    input: Path | None = None


@dataclass(frozen=True)
class RestorationSet:
    """Input / target pairs. ``scale`` is the output/input size ratio (1 for denoising)."""

    root: Path
    pairs: tuple[RestorationPair, ...]
    scale: int = 1
    noise_sigma: float | None = None
    seed: int = 0

    @classmethod
    def from_sr_folder(cls, root: str | Path, scale: int | None = None) -> RestorationSet:
        """``HR/<name>.png`` with ``LR_bicubic/X<scale>/<name>x<scale>.png`` (``<name>.png`` also works)."""
        root = Path(root)
        lr_root = root / "LR_bicubic"
        if not (root / "HR").is_dir() or not lr_root.is_dir():
            raise DatasetError(f"{root}: expected HR/ and LR_bicubic/X<scale>/ (the SR benchmark layout)")
        if scale is None:
            scales = sorted(int(p.name[1:]) for p in lr_root.glob("X*") if p.is_dir() and p.name[1:].isdigit())
            if len(scales) != 1:
                raise DatasetError(f"{root}: LR_bicubic has scales {scales}: say which with --scale")
            scale = scales[0]
        lr_folder = lr_root / f"X{scale}"
        if not lr_folder.is_dir():
            raise DatasetError(f"{root}: no LR_bicubic/X{scale}/ folder")
        inputs = {p.stem: p for p in image_files(lr_folder)}
        pairs = []
        for target in image_files(root / "HR"):
            source = inputs.get(f"{target.stem}x{scale}") or inputs.get(target.stem)
            if source is None:
                raise DatasetError(f"{lr_folder}: no input for {target.name} ({target.stem}x{scale}.png)")
            pairs.append(RestorationPair(target.stem, target, source))
        return cls(root, tuple(pairs), scale)

    @classmethod
    def from_folders(cls, inputs: str | Path, targets: str | Path, scale: int | None = None) -> RestorationSet:
        """Inputs and targets with the same name (an input may add ``x<scale>`` to the target's name)."""
        inputs, targets = Path(inputs), Path(targets)
        by_stem = {p.stem: p for p in image_files(inputs)}
        pairs = []
        for target in image_files(targets):
            source = by_stem.get(target.stem) or (by_stem.get(f"{target.stem}x{scale}") if scale else None)
            if source is None:
                raise DatasetError(f"{inputs}: no input named like {target.name}")
            pairs.append(RestorationPair(target.stem, target, source))
        if not pairs:
            raise DatasetError(f"{targets}: no target images")
        if scale is None:
            with Image.open(pairs[0].input) as small, Image.open(pairs[0].target) as large:
                scale = max(1, round(large.size[0] / small.size[0]))
        return cls(targets, tuple(pairs), scale)

    @classmethod
    def from_clean(cls, folder: str | Path, noise_sigma: float, seed: int = 0) -> RestorationSet:
        """Clean images; each input is its image plus Gaussian noise (see ``noisy_input``)."""
        folder = Path(folder)
        if noise_sigma <= 0:
            raise DatasetError(f"noise sigma must be > 0, got {noise_sigma}")
        pairs = tuple(RestorationPair(p.stem, p) for p in image_files(folder))
        if not pairs:
            raise DatasetError(f"{folder}: no images")
        return cls(folder, pairs, 1, float(noise_sigma), int(seed))

    @property
    def name(self) -> str:
        return self.root.parent.name if self.root.name in ("HR",) else self.root.name

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, pair: RestorationPair) -> tuple[Path | np.ndarray, np.ndarray]:
        """(what to send, the target pixels). For SR the target is cropped to input size x scale."""
        target = load_pixels(pair.target)
        if self.noise_sigma is not None:
            return noisy_input(target, self.noise_sigma, self.seed), target
        if self.scale > 1:
            with Image.open(pair.input) as small:
                width, height = small.size
            target = target[: height * self.scale, : width * self.scale]
        return pair.input, target


def noisy_input(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """``clean`` plus N(0, sigma) noise on the 0-255 scale, rounded and clipped to uint8.

    Every image draws from a fresh ``numpy.random.default_rng(seed)`` (KAIR's test scripts
    re-seed for every image too); quantising to 8 bits is what sending an image takes.
    """
    noise = np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
    return np.clip(np.round(clean.astype(np.float64) + noise), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- IQA


@dataclass(frozen=True)
class IQARow:
    image: Path
    mos: float
    reference: Path | None = None
    group: str | None = None


@dataclass(frozen=True)
class IQASet:
    csv_file: Path
    rows: tuple[IQARow, ...]

    @classmethod
    def from_csv(cls, csv_file: str | Path) -> IQASet:
        csv_file = Path(csv_file)
        with csv_file.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = {name.strip().lower(): name for name in reader.fieldnames or []}
            score_column = columns.get("mos") or columns.get("dmos")
            if "image" not in columns or score_column is None:
                raise DatasetError(f"{csv_file}: needs an 'image' and a 'mos' column, has {reader.fieldnames}")
            rows = []
            for line, record in enumerate(reader, start=2):
                try:
                    mos = float(record[score_column])
                except (TypeError, ValueError):
                    raise DatasetError(f"{csv_file}:{line}: {score_column} is not a number") from None
                reference = record.get(columns["reference"]) if "reference" in columns else None
                group = record.get(columns["group"]) if "group" in columns else None
                row = IQARow(csv_file.parent / record[columns["image"]], mos,
                             csv_file.parent / reference if reference else None, group or None)
                for path in (row.image, row.reference):
                    if path is not None and not path.is_file():
                        raise DatasetError(f"{csv_file}:{line}: {path} not found")
                rows.append(row)
        if len(rows) < 2:
            raise DatasetError(f"{csv_file}: correlations need at least two rows")
        return cls(csv_file, tuple(rows))

    @property
    def name(self) -> str:
        return self.csv_file.stem

    def __len__(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------- segmentation

LABEL_FOLDERS = ("labels", "masks", "annotations")


@dataclass(frozen=True)
class SegmentationSet:
    """(image, label image) pairs; ``ignore_index`` marks pixels that count for nothing (None: none do)."""

    root: Path
    pairs: tuple[tuple[Path, Path], ...]
    ignore_index: int | None = 255

    @classmethod
    def from_folders(cls, images: str | Path, labels: str | Path | None = None,
                     ignore_index: int | None = 255) -> SegmentationSet:
        """``images`` and ``labels`` with matching names; without ``labels``, ``images`` is a root
        holding ``images/`` and one of ``labels/``, ``masks/``, ``annotations/``."""
        root = images = Path(images)
        if labels is None:
            found = [root / name for name in LABEL_FOLDERS if (root / name).is_dir()]
            if not (root / "images").is_dir() or not found:
                raise DatasetError(f"{root}: expected images/ and labels/ (or give the label folder with --labels)")
            images, labels = root / "images", found[0]
        labels = Path(labels)
        if not images.is_dir() or not labels.is_dir():
            raise DatasetError(f"{images if not images.is_dir() else labels} is not a folder")
        by_stem = {p.stem: p for p in image_files(labels)}
        pairs = []
        for image in image_files(images):
            if image.stem not in by_stem:
                raise DatasetError(f"{labels}: no label image named like {image.name}")
            pairs.append((image, by_stem[image.stem]))
        if not pairs:
            raise DatasetError(f"{images}: no images")
        return cls(root, tuple(pairs), ignore_index)

    @property
    def name(self) -> str:
        return self.root.name

    def __len__(self) -> int:
        return len(self.pairs)


# --------------------------------------------------------------------------- subsets

Dataset = ClassificationSet | DetectionSet | RestorationSet | IQASet | SegmentationSet
D = TypeVar("D", ClassificationSet, DetectionSet, RestorationSet, IQASet, SegmentationSet)


def subset(dataset: D, limit: int | None) -> D:
    """``limit`` items spread evenly over the dataset (all of it when ``limit`` is None or larger)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise DatasetError(f"limit must be at least 1, got {limit}")
    keep = np.unique(np.linspace(0, len(dataset) - 1, limit).round().astype(int)).tolist()
    if isinstance(dataset, ClassificationSet):
        return replace(dataset, samples=tuple(dataset.samples[i] for i in keep))
    if isinstance(dataset, DetectionSet):
        return dataset.restricted([dataset.images[i] for i in keep])
    if isinstance(dataset, (RestorationSet, SegmentationSet)):
        return replace(dataset, pairs=tuple(dataset.pairs[i] for i in keep))
    return replace(dataset, rows=tuple(dataset.rows[i] for i in keep))

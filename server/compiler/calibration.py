"""The images int8 builds calibrate and gate on: a folder, or a built-in model's own data.

``images(spec, source, count)`` reads a folder of images (recursively, sorted by path, the
first ``count``) or, for ``builtin``, a built-in model's training images: the training
digits for the classifier, the training photographs (bicubic-downscaled for
super-resolution, with sigma-25 noise for the denoiser) for the restorers. ``heldout_set``
writes a built-in's held-out set in the layout ``hybridserve eval`` reads and returns it as
an evaluation dataset. ``digest`` hashes images, the calibration set's part of the cache key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import hybridserve.models
from hybridserve.server.core.spec import ModelSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DENOISER_SIGMA = 25.0  # denoiser.md: the built-in denoiser removes sigma-25 noise
HELDOUT_NOISE_SEED = 2024  # denoiser.md's held-out measurement
BUILTIN_ARCHITECTURES = ("hybridserve:hybrid_classifier", "hybridserve:hybrid_restorer")


class CalibrationError(ValueError):
    """The calibration or gate images cannot be found or read."""


def builtin_kind(spec: ModelSpec) -> str | None:
    """``digits``, ``denoise`` or ``sr`` for a built-in model of the shipped repository, else None."""
    if spec.architecture not in BUILTIN_ARCHITECTURES or spec.base_dir is None:
        return None
    if Path(spec.base_dir).resolve() != (Path(hybridserve.models.__file__).parent / "repository").resolve():
        return None
    if spec.task == "classification":
        return "digits"
    return "sr" if int(spec.architecture_args.get("scale", 1)) > 1 else "denoise"


def images(spec: ModelSpec, source: str | None, count: int) -> list[np.ndarray]:
    """``count`` uint8 (H, W, C) images from a folder or, with ``builtin``, from a built-in's training data."""
    if source is None or source == "builtin":
        kind = builtin_kind(spec)
        if kind is None:
            raise CalibrationError(f"model {spec.name!r} is not a built-in: give compile.calibration.images, "
                                   "a folder of representative images")
        return _training_images(spec, kind, count)
    folder = Path(source)
    if not folder.is_absolute() and spec.base_dir is not None:
        folder = Path(spec.base_dir) / folder
    if not folder.is_dir():
        raise CalibrationError(f"model {spec.name!r}: calibration folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise CalibrationError(f"model {spec.name!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [_read(path) for path in files]


def _read(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if image.mode in ("L", "I;16", "I") else "RGB"))
    except OSError as exc:
        raise CalibrationError(f"{path}: not a readable image ({exc})") from None
    return np.ascontiguousarray(array[:, :, None] if array.ndim == 2 else array)


def _training_images(spec: ModelSpec, kind: str, count: int) -> list[np.ndarray]:
    if kind == "digits":
        from hybridserve.models.training.digits import load_split

        train, _ = load_split()
        return [np.ascontiguousarray(pixels[:, :, None]) for pixels in train.images[:count]]
    from hybridserve.models.training import photos

    scale = int(spec.architecture_args.get("scale", 1))
    rng = np.random.default_rng(0)
    out = []
    for photo in photos.load_photos(photos.TRAIN_PHOTOS[:count], multiple=max(scale, 8)):
        out.append(photos.downscale(photo, scale) if kind == "sr" else photos.add_noise(photo, DENOISER_SIGMA, rng))
    return out


def heldout_set(spec: ModelSpec, folder: Path) -> Any:
    """A built-in's held-out set, written under ``folder`` once, as an evaluation dataset."""
    from hybridserve.server.evaluation import ClassificationSet, RestorationSet

    kind = builtin_kind(spec)
    if kind is None:
        raise CalibrationError(f"model {spec.name!r} has no held-out set: it is not a built-in")
    done = folder / ".complete"
    if kind == "digits":
        if not done.is_file():
            from hybridserve.models.training.export_heldout import export_classification

            export_classification(folder)
            done.touch()
        return ClassificationSet.from_folder(folder)
    from hybridserve.models.training import photos

    scale = int(spec.architecture_args.get("scale", 1))
    if not done.is_file():
        (folder / "HR").mkdir(parents=True, exist_ok=True)
        (folder / "LR").mkdir(exist_ok=True)
        for name, photo in zip(photos.HELD_OUT_PHOTOS, photos.load_photos(photos.HELD_OUT_PHOTOS, max(scale, 8))):
            Image.fromarray(photo).save(folder / "HR" / f"{name}.png")
            if scale > 1:
                Image.fromarray(photos.downscale(photo, scale)).save(folder / "LR" / f"{name}.png")
        done.touch()
    if kind == "sr":
        return RestorationSet.from_folders(folder / "LR", folder / "HR", scale)
    return RestorationSet.from_clean(folder / "HR", DENOISER_SIGMA, HELDOUT_NOISE_SEED)


def digest(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 of the images' shapes and pixels, in order."""
    hasher = hashlib.sha256()
    for array in arrays:
        hasher.update(f"{array.shape};".encode())
        hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()

"""Reading the files of a dataset: image files in a folder, images as 8-bit pixels, label maps (name ->
label) and label images (a class index per pixel).

``DatasetError`` is what every reader raises for a file or a layout it cannot use.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


class DatasetError(ValueError):
    """A dataset on disk does not have the layout its task expects."""


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_label_map(path: str | Path | None) -> dict[str, str]:
    """A dataset-name -> served-label map: a JSON object, or a CSV / TSV of two columns."""
    if path is None:
        return {}
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: a label map must be a JSON object of name -> label")
        return {str(k): str(v) for k, v in data.items()}
    dialect = csv.Sniffer().sniff(text.splitlines()[0]) if text.strip() else csv.excel
    rows = [row for row in csv.reader(text.splitlines(), dialect) if row]
    if any(len(row) != 2 for row in rows):
        raise DatasetError(f"{path}: every row of a label map must be two columns, name and label")
    return {name.strip(): label.strip() for name, label in rows}


def load_pixels(path: Path) -> np.ndarray:
    """An image file as uint8: (H, W) for grayscale files, (H, W, 3) for the others."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("L", "LA", "I", "I;16", "1", "P") and _is_gray(image):
            return np.asarray(image.convert("L"))
        return np.asarray(image.convert("RGB"))


def _is_gray(image: Image.Image) -> bool:
    if image.mode != "P":
        return True
    palette = np.asarray(image.convert("RGB"))
    return bool((palette[..., 0] == palette[..., 1]).all() and (palette[..., 1] == palette[..., 2]).all())


def load_class_map(path: Path) -> np.ndarray:
    """A label image's class indices, (H, W) int64: its pixel values (palette indices for a palette PNG)."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16"):
            raise DatasetError(f"{path}: a label image must have one channel of class indices, not mode {image.mode}")
        return np.asarray(image).astype(np.int64)

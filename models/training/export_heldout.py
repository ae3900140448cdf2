"""Write a built-in model's held-out set to disk in its task's standard layout, for ``hybridserve eval``.

    python -m hybridserve.models.training.export_heldout --task classification --out heldout/classification
    python -m hybridserve.models.training.export_heldout --task detection --out heldout/detection
    python -m hybridserve.models.training.export_heldout --task iqa --out heldout/iqa
    python -m hybridserve.models.training.export_heldout --task segmentation --out heldout/segmentation

- classification: the 450 held-out digits (``digits.load_split``) as 8x8 grayscale PNGs in
  one folder per label (``0/`` ... ``9/``; torchvision's ImageFolder layout), named by their
  position in the held-out split;
- detection: the first ``--count`` (default 200) held-out scenes (``scenes.held_out_scenes``)
  as PNGs in ``images/`` and ``annotations.json`` in COCO format (boxes ``[x, y, w, h]`` in
  pixels; categories 1 circle, 2 square, 3 triangle);
- iqa: each held-out photograph (``photos.HELD_OUT_PHOTOS``) at strengths 0, 0.2, ..., 1.0 of
  each distortion (``photos.distort``, drawn in the order and with the generator of the
  quality model card's measurement: ``numpy.random.default_rng(11)``, blur, then noise, then
  JPEG) as PNGs in ``images/``, and one CSV per distortion (``blur.csv``, ``noise.csv``,
  ``jpeg.csv``) with columns ``image``, ``mos`` (``1 - strength``, the score the model is
  trained to give) and ``group`` (the photograph);
- segmentation: the first ``--count`` (default 200) held-out scenes of the segmenter
  (``segscenes.held_out_segmentation_scenes``: the detection scenes) as PNGs in ``images/`` and
  their class maps as 8-bit grayscale PNGs of the same names in ``labels/`` (pixel value = class
  index: 0 background, 1 circle, 2 square, 3 triangle).

Everything is deterministic: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

TASKS = ("classification", "detection", "iqa", "segmentation")
IQA_STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
IQA_SEED = 11


def export_classification(out: Path) -> int:
    from hybridserve.models.training.digits import CLASS_NAMES, load_split

    _, held_out = load_split()
    for index, (pixels, label) in enumerate(zip(held_out.images, held_out.labels)):
        folder = out / CLASS_NAMES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    return len(held_out.labels)


def export_detection(out: Path, count: int) -> int:
    from hybridserve.models.training.scenes import CLASS_NAMES, HELD_OUT_SEED_START, held_out_scenes

    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, scene in enumerate(held_out_scenes(count)):
        file_name = f"images/scene-{HELD_OUT_SEED_START + index}.png"
        Image.fromarray(scene.image).save(out / file_name)
        height, width = scene.image.shape[:2]
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        for (x1, y1, x2, y2), label in zip(scene.boxes.tolist(), scene.labels.tolist()):
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": int(label) + 1,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
    coco = {"info": {"description": f"hybridserve detector held-out scenes (seeds from {HELD_OUT_SEED_START})"},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASS_NAMES)]}
    (out / "annotations.json").write_text(json.dumps(coco, indent=1))
    return count


def export_iqa(out: Path) -> int:
    from hybridserve.models.training import photos

    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(IQA_SEED)
    held_out = photos.load_photos(photos.HELD_OUT_PHOTOS)
    written = 0
    for kind in photos.DISTORTIONS:
        with (out / f"{kind}.csv").open("w", newline="") as handle:
            table = csv.writer(handle)
            table.writerow(["image", "mos", "group"])
            for name, image in zip(photos.HELD_OUT_PHOTOS, held_out):
                for strength in IQA_STRENGTHS:
                    file_name = f"images/{name}-{kind}-{strength:.1f}.png"
                    Image.fromarray(photos.distort(image, kind, strength, rng)).save(out / file_name)
                    table.writerow([file_name, f"{1.0 - strength:.1f}", name])
                    written += 1
    return written


def export_segmentation(out: Path, count: int) -> int:
    from hybridserve.models.training.scenes import HELD_OUT_SEED_START
    from hybridserve.models.training.segscenes import held_out_segmentation_scenes

    for folder in ("images", "labels"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(held_out_segmentation_scenes(count)):
        file_name = f"scene-{HELD_OUT_SEED_START + index}.png"
        Image.fromarray(item.scene.image).save(out / "images" / file_name)
        Image.fromarray(item.class_map.astype(np.uint8), mode="L").save(out / "labels" / file_name)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    parser.add_argument("--count", type=int, default=200,
                        help="detection, segmentation: how many held-out scenes (default 200)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.task == "classification":
        written = export_classification(args.out)
    elif args.task == "detection":
        written = export_detection(args.out, args.count)
    elif args.task == "segmentation":
        written = export_segmentation(args.out, args.count)
    else:
        written = export_iqa(args.out)
    print(f"wrote {written} held-out {args.task} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

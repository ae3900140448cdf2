"""Train the built-in shape segmenter (``models/repository/segmenter.yaml``) on generated scenes.

    python -m hybridserve.models.training.train_segmenter --out models/repository

Every step draws a fresh batch of scenes from ``segscenes.make_segmentation_scene`` with
training seeds (``seed * 10**8 + step * batch + i``, always below the validation and held-out
ranges), so the model never sees the same scene twice. The logits are upsampled bilinearly to
the scene's pixels, as the server upsamples them before its argmax; the loss is per-pixel
cross-entropy plus soft Dice (one minus the mean over classes of 2|P.G| / (|P| + |G|), softmax
P against one-hot G over the batch), which weighs the small shape classes as much as the
background. The spec is read as plain YAML: its architecture args build the model, its input
size is the scene size and its mean/std normalise the scenes. Training is deterministic
(fixed seeds, one thread). At the end it writes the weights and prints the mean IoU and the
per-class IoU on held-out scenes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

from hybridserve.models.builtin.segmenter import HybridSegmenter
from hybridserve.models.training.scenes import scene_batch
from hybridserve.models.training.segscenes import (
    CLASS_NAMES,
    SegmentationScene,
    held_out_segmentation_scenes,
    make_segmentation_scene,
)

REPOSITORY = Path(__file__).resolve().parents[1] / "repository"
SEEDS_PER_RUN = 10**8
VALIDATION_SEED_START = 900_000_000  # scenes for the progress log: neither training nor held-out


def read_spec(path: Path) -> dict[str, Any]:
    """The spec's fields training needs: architecture args, weights file, input size, mean, std."""
    spec = yaml.safe_load(Path(path).read_text())
    prep = spec.get("preprocessing", {})
    height, width = prep["input_size"]
    if height != width:
        raise ValueError("scenes are square: the segmenter spec needs a square input_size")
    return {"args": spec.get("architecture_args", {}), "weights": spec["weights"], "size": height,
            "mean": prep["mean"], "std": prep["std"]}


def upsampled_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's logits resized bilinearly to the input's pixels, as the server does."""
    return F.interpolate(model(images), size=images.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def confusion_matrix(
    model: nn.Module, scenes: Sequence[SegmentationScene], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Pixel counts (true class, predicted class) over ``scenes``, predicted as the server would."""
    classes = len(CLASS_NAMES)
    counts = np.zeros((classes, classes), dtype=np.int64)
    for start in range(0, len(scenes), 50):
        chunk = scenes[start : start + 50]
        images = scene_batch([item.scene for item in chunk], mean, std)
        predicted = upsampled_logits(model, images).argmax(1).numpy()
        truth = np.stack([item.class_map for item in chunk])
        counts += np.bincount(truth.ravel() * classes + predicted.ravel(), minlength=classes**2).reshape(
            classes, classes
        )
    return counts


def class_iou(counts: np.ndarray) -> np.ndarray:
    """Per-class IoU from a confusion matrix: true positives / (truth + predicted - true positives)."""
    hits = np.diag(counts).astype(np.float64)
    return hits / (counts.sum(0) + counts.sum(1) - hits)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft Dice over the batch, averaged over classes (1 smooths classes absent from the batch)."""
    probs = logits.softmax(1)
    truth = F.one_hot(targets, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    overlap = (probs * truth).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + truth.sum((0, 2, 3))
    return 1 - ((2 * overlap + 1) / (total + 1)).mean()


def validation_miou(model: nn.Module, spec: dict[str, Any], count: int) -> float:
    model.eval()
    scenes = [make_segmentation_scene(VALIDATION_SEED_START + i, spec["size"]) for i in range(count)]
    result = float(class_iou(confusion_matrix(model, scenes, spec["mean"], spec["std"])).mean())
    model.train()
    return result


def check_seed_range(seed: int, steps: int, batch_size: int) -> None:
    """Refuse a run whose scene seeds would leave its own block of ``SEEDS_PER_RUN`` below validation."""
    if seed < 0 or (seed + 1) * SEEDS_PER_RUN > VALIDATION_SEED_START or steps * batch_size > SEEDS_PER_RUN:
        raise ValueError("training seeds would reach the validation / held-out ranges")


def training_seeds(seed: int, step: int, batch_size: int) -> range:
    """The scene seeds of one training step: ``seed * SEEDS_PER_RUN + step * batch_size + i``."""
    first = seed * SEEDS_PER_RUN + step * batch_size
    return range(first, first + batch_size)


def train(spec: dict[str, Any], steps: int, seed: int, batch_size: int, peak_lr: float) -> HybridSegmenter:
    check_seed_range(seed, steps, batch_size)
    if steps < 3:
        raise ValueError("train for at least 3 steps (a warm-up of 2, then the decay)")
    model = HybridSegmenter(**spec["args"]).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    # Warm-up over the first 5% of the steps (at least 2), a cosine ramp from peak / 20; then
    # cosine decay to peak / 20,000.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=peak_lr, total_steps=steps, pct_start=max(0.05, 2 / steps), anneal_strategy="cos",
        cycle_momentum=False, div_factor=20.0, final_div_factor=1e3,
    )
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = [make_segmentation_scene(index, spec["size"]) for index in training_seeds(seed, step, batch_size)]
        images = scene_batch([item.scene for item in batch], spec["mean"], spec["std"])
        targets = torch.from_numpy(np.stack([item.class_map for item in batch]))
        logits = upsampled_logits(model, images.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, targets) + dice_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - started:.0f} s", flush=True)
        if step % 250 == 249:
            print(f"  validation mIoU (50 scenes) {validation_miou(model, spec, 50):.3f}", flush=True)
    model.eval()
    return model.to(memory_format=torch.contiguous_format)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPOSITORY, help="folder the weights go to")
    parser.add_argument("--spec", type=Path, default=REPOSITORY / "segmenter.yaml", help="the model spec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--held-out", type=int, default=200, help="held-out scenes to measure at the end")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    spec = read_spec(args.spec)
    started = time.perf_counter()
    model = train(spec, args.steps, args.seed, args.batch_size, args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / spec["weights"]
    save_file({key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}, str(path))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({params} parameters) in {time.perf_counter() - started:.0f} s", flush=True)
    scenes = held_out_segmentation_scenes(args.held_out)
    iou = class_iou(confusion_matrix(model, scenes, spec["mean"], spec["std"]))
    per_class = ", ".join(f"{name} {value:.3f}" for name, value in zip(CLASS_NAMES, iou))
    print(f"held-out mean IoU ({len(scenes)} scenes) {iou.mean():.3f}: {per_class}")


if __name__ == "__main__":
    main()

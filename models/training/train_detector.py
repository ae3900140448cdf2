"""Train the built-in shape detector (``models/repository/detector.yaml``) on generated scenes.

    python -m hybridserve.models.training.train_detector --out models/repository

Every step draws a fresh batch of scenes from ``scenes.make_scene`` with training seeds
(``seed * 10**8 + step * batch + i``, always below the held-out range), so the model never
sees the same scene twice. Targets are CenterNet's: per class a heatmap with a Gaussian
peak of 1 at each object's centre cell (sigma = box size / 6 per axis), and at that cell
the log box size in cells and the sub-cell centre offset. Loss: penalty-reduced focal
loss on the heatmaps plus L1 on the box terms. The spec's architecture args build the
model; its mean/std normalise the scenes, which are generated at the spec's input size.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.server import ModelSpec
from hybridserve.models.builtin.detector import HybridDetector
from hybridserve.models.training.detection_eval import evaluate_on_scenes
from hybridserve.models.training.scenes import MAX_OBJECTS, Scene, make_scene, scene_batch
from hybridserve.models.training.train_classifier import cosine_lr, spec_argument_parser, train_and_save

SEEDS_PER_RUN = 10**8
VALIDATION_SEED_START = 900_000_000  # scenes for the progress log: neither training nor held-out
MIN_SIGMA = 0.5


def build_targets(scenes: list[Scene], num_classes: int, stride: int, map_size: int) -> dict[str, torch.Tensor]:
    """CenterNet targets at stride ``stride`` for a batch of scenes."""
    count = len(scenes)
    heatmap = np.zeros((count, num_classes, map_size, map_size), dtype=np.float32)
    cell = np.zeros((count, MAX_OBJECTS), dtype=np.int64)
    box_terms = np.zeros((count, MAX_OBJECTS, 4), dtype=np.float32)
    present = np.zeros((count, MAX_OBJECTS), dtype=np.float32)
    grid_y, grid_x = np.mgrid[0:map_size, 0:map_size].astype(np.float32)
    for i, scene in enumerate(scenes):
        for j, (box, label) in enumerate(zip(scene.boxes / stride, scene.labels)):
            centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            width, height = box[2] - box[0], box[3] - box[1]
            cell_x, cell_y = min(int(centre_x), map_size - 1), min(int(centre_y), map_size - 1)
            sigma_x, sigma_y = max(width / 6, MIN_SIGMA), max(height / 6, MIN_SIGMA)
            peak = np.exp(-((grid_x - cell_x) ** 2 / (2 * sigma_x**2) + (grid_y - cell_y) ** 2 / (2 * sigma_y**2)))
            np.maximum(heatmap[i, label], peak, out=heatmap[i, label])
            cell[i, j] = cell_y * map_size + cell_x
            box_terms[i, j] = (np.log(width), np.log(height), centre_x - cell_x, centre_y - cell_y)
            present[i, j] = 1.0
    return {
        "heatmap": torch.from_numpy(heatmap),
        "cell": torch.from_numpy(cell),
        "box_terms": torch.from_numpy(box_terms),
        "present": torch.from_numpy(present),
    }


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of centres."""
    prob = torch.sigmoid(logits)
    is_centre = target.eq(1.0).float()
    positive = F.logsigmoid(logits) * (1 - prob) ** 2 * is_centre
    negative = F.logsigmoid(-logits) * prob**2 * (1 - target) ** 4 * (1 - is_centre)
    return -(positive.sum() + negative.sum()) / is_centre.sum().clamp(min=1.0)


def box_loss(box_maps: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """L1 between predicted and true box terms at the centre cells of present objects."""
    n, terms = box_maps.shape[:2]
    cells = targets["cell"].unsqueeze(1).expand(n, terms, MAX_OBJECTS)
    predicted = box_maps.flatten(2).gather(2, cells).transpose(1, 2)
    present = targets["present"].unsqueeze(2)
    error = (predicted - targets["box_terms"]).abs() * present
    return error.sum() / (present.sum() * terms).clamp(min=1.0)


def validation_map(model: HybridDetector, spec: ModelSpec, count: int) -> float:
    model.eval()
    scenes = [make_scene(VALIDATION_SEED_START + i, spec.preprocessing.input_size[0]) for i in range(count)]
    result, _ = evaluate_on_scenes(model, scenes, spec.preprocessing.mean, spec.preprocessing.std, model.num_classes)
    model.train()
    return result


def train(spec: ModelSpec, steps: int, seed: int, batch_size: int, peak_lr: float = 2e-3) -> nn.Module:
    prep = spec.preprocessing
    size = prep.input_size[0]
    if prep.input_size[1] != size:
        raise ValueError("scenes are square: the detector spec needs a square input_size")
    if (seed + 1) * SEEDS_PER_RUN > VALIDATION_SEED_START or steps * batch_size > SEEDS_PER_RUN:
        raise ValueError("training seeds would reach the validation / held-out ranges")
    model = HybridDetector(**spec.architecture_args).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    map_size = size // model.stride
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, peak_lr, warmup=max(1, steps // 20))
        first = seed * SEEDS_PER_RUN + step * batch_size
        scenes = [make_scene(first + i, size) for i in range(batch_size)]
        images = scene_batch(scenes, prep.mean, prep.std).contiguous(memory_format=torch.channels_last)
        targets = build_targets(scenes, model.num_classes, model.stride, map_size)
        heatmap_logits, box_maps = model.forward_maps(images)
        heat_loss = focal_loss(heatmap_logits, targets["heatmap"])
        size_loss = box_loss(box_maps, targets)
        loss = heat_loss + size_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(
                f"step {step}/{steps} heatmap {heat_loss.item():.3f} box {size_loss.item():.3f} "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
        if step % 250 == 249:
            print(f"  validation mAP@0.5 (100 scenes) {validation_map(model, spec, 100):.3f}", flush=True)
    model.eval()
    return model.to(memory_format=torch.contiguous_format)


def main() -> None:
    parser = spec_argument_parser(__doc__.splitlines()[0], "detector.yaml")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=24)
    spec, model = train_and_save(
        parser.parse_args(), lambda spec, args: train(spec, args.steps, args.seed, args.batch_size)
    )
    print(f"validation mAP@0.5 (200 scenes) {validation_map(model, spec, 200):.3f}")


if __name__ == "__main__":
    main()

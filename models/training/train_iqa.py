"""Train the built-in no-reference IQA model (``models/repository/quality.yaml``).

    python -m hybridserve.models.training.train_iqa

What the model learns: how strongly a photograph is distorted. A training sample is a random
crop (224 to 640 px a side) of a training photograph (``photos.TRAIN_PHOTOS``), randomly
flipped, then left pristine or given one distortion (Gaussian blur, Gaussian noise or JPEG)
at a strength ``s`` drawn uniformly in [0, 1] on ``photos.distort``'s scale; its target
quality is ``1 - s`` (1 when pristine). A batch holds four such versions of every crop, and the loss adds to the
MSE a ranking term among the versions of the same crop, so content alone cannot predict
the target. Samples are prepared exactly as the server prepares NR-IQA input: resized to
the spec's ``input_size`` by the server's ``resize_for_model`` under the spec's resize
policy, scaled to [0, 1] and normalised with the spec's mean and std.

Evaluation (held-out photographs only), per distortion type: every held-out photograph at
strengths 0 (pristine), 0.2, 0.4, 0.6, 0.8 and 1.0, and the Spearman rank correlation
between the model's score and the negated strength,

- ``within``: computed per photograph (six images of the same content) and averaged over
  the photographs: does the score fall as the distortion grows?
- ``pooled``: computed over all photographs' images together: are scores also comparable
  across different contents? (Harder: pristine photographs differ in quality too.)

The spec is the single source of truth for the architecture and preprocessing. Every step
draws fresh samples from a seeded generator; with one thread a run repeats exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from hybridserve.server import ModelSpec, builtin_repository, load_spec, resize_for_model
from hybridserve.models.builtin.iqa import HybridIQA
from hybridserve.models.training import photos
from hybridserve.models.training.train_classifier import seed_everything
from hybridserve.models.training.train_restorer import fit, train_and_save

EVAL_STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
EVAL_SEED = 2024
PRISTINE_SHARE = 0.1
MIN_CROP_SIDE = 224
MAX_CROP_SIDE = 640
VERSIONS_PER_CROP = 4
RANK_MARGIN = 0.05
RANK_SHARPNESS = 10.0
RANK_WEIGHT = 0.1


def resize_like_server(images: list[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """uint8 RGB images -> uint8 (N, H, W, 3) at the spec's input size, resized as the server does."""
    pre = spec.preprocessing
    return np.stack([resize_for_model(image, pre.input_size, pre.resize)[0] for image in images])


def normalise(batch: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) normalised with the spec's mean and std."""
    mean = torch.tensor(spec.preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.preprocessing.std).view(1, -1, 1, 1)
    return (photos.to_tensor(batch) - mean) / std


def random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop, flipped or not; each side in [MIN_CROP_SIDE, MAX_CROP_SIDE] where the photo allows."""
    height, width = image.shape[:2]
    crop_h = int(rng.integers(min(height, MIN_CROP_SIDE), min(height, MAX_CROP_SIDE) + 1))
    crop_w = int(rng.integers(min(width, MIN_CROP_SIDE), min(width, MAX_CROP_SIDE) + 1))
    top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
    crop = image[top:top + crop_h, left:left + crop_w]
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def random_version(crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The crop left pristine or given one random distortion; returns it with its target quality."""
    if rng.random() < PRISTINE_SHARE:
        return crop, 1.0
    kind = photos.DISTORTIONS[int(rng.integers(len(photos.DISTORTIONS)))]
    strength = float(rng.random())
    return photos.distort(crop, kind, strength, rng), 1.0 - strength


class SampleStream:
    """Endless fresh training samples from a fixed seed, resized as the server does.

    A batch holds ``VERSIONS_PER_CROP`` differently distorted versions of each crop, so that
    within a batch the content says nothing about the target and only the distortion does.
    """

    def __init__(self, spec: ModelSpec, seed: int) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        self.photos = photos.load_photos(photos.TRAIN_PHOTOS)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = [], []
        while len(images) < size:
            crop = random_crop(self.photos[int(self.rng.integers(len(self.photos)))], self.rng)
            for _ in range(min(VERSIONS_PER_CROP, size - len(images))):
                image, target = random_version(crop, self.rng)
                images.append(image)
                targets.append(target)
        return normalise(resize_like_server(images, self.spec), self.spec), torch.tensor(targets)


@torch.no_grad()
def evaluate(model: torch.nn.Module, spec: ModelSpec) -> dict[str, float]:
    """Spearman correlation of score with -strength per distortion type, within photographs and pooled."""
    model.eval()
    rng = np.random.default_rng(EVAL_SEED)
    held_out = photos.load_photos(photos.HELD_OUT_PHOTOS)
    negated = -np.asarray(EVAL_STRENGTHS)
    result = {}
    for kind in photos.DISTORTIONS:
        images = [photos.distort(image, kind, strength, rng) for image in held_out for strength in EVAL_STRENGTHS]
        scores = model(normalise(resize_like_server(images, spec), spec)).numpy().reshape(len(held_out), -1)
        result[f"within_{kind}"] = float(np.mean([spearmanr(row, negated).statistic for row in scores]))
        result[f"pooled_{kind}"] = float(spearmanr(scores.ravel(), np.tile(negated, len(held_out))).statistic)
    return result


def quality_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE to the target quality plus a pairwise ranking loss among the versions of each crop.

    The ranking term (RankNet-style logistic loss on score differences) compares images of
    the same content only, so it pushes the model to order distortions and not contents.
    """
    groups = scores.shape[0] // VERSIONS_PER_CROP
    by_crop = scores[: groups * VERSIONS_PER_CROP].view(groups, VERSIONS_PER_CROP)
    wanted = targets[: groups * VERSIONS_PER_CROP].view(groups, VERSIONS_PER_CROP)
    score_gap = by_crop[:, :, None] - by_crop[:, None, :]
    better = (wanted[:, :, None] - wanted[:, None, :]) > RANK_MARGIN
    ranking = F.softplus(-RANK_SHARPNESS * score_gap[better]).mean() if better.any() else scores.sum() * 0
    return F.mse_loss(scores, targets) + RANK_WEIGHT * ranking


def train(spec: ModelSpec, steps: int, seed: int, batch_size: int, peak_lr: float) -> HybridIQA:
    stream = SampleStream(spec, seed)
    model = HybridIQA(**spec.architecture_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.05)
    fit(model, optimizer, lambda: stream.batch(batch_size), quality_loss, steps, peak_lr)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=builtin_repository() / "quality.yaml")
    parser.add_argument("--out", type=Path, default=builtin_repository(), help="folder the weights go to")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    spec = load_spec(args.spec)
    seed_everything(args.seed, args.threads)
    train_and_save(
        spec,
        args.out,
        lambda: train(spec, args.steps, args.seed, args.batch_size, args.lr),
        lambda model: {f"spearman_{key}": rho for key, rho in evaluate(model, spec).items()},
    )


if __name__ == "__main__":
    main()

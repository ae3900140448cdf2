"""Train the built-in digit classifier (``models/repository/classifier.yaml``).

    python -m hybridserve.models.training.train_classifier --out models/repository

The spec is the single source of truth: its ``architecture_args`` build the model and its
preprocessing (input size, mean, std) shapes the training data, so the written weights
fit what the server will feed them. Training is deterministic (fixed seeds, one thread).

The small helpers here (``spec_argument_parser``, ``train_and_save``, ``cosine_lr``) are
shared with ``train_detector``.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from hybridserve.server import ModelSpec, builtin_repository, load_spec
from hybridserve.models.builtin.classifier import HybridClassifier
from hybridserve.models.training.digits import load_split, split_tensors


def seed_everything(seed: int, threads: int) -> None:
    """Fix every random source and the thread count, so a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_weights(model: nn.Module, spec: ModelSpec, out_dir: Path) -> Path:
    """Write the model's state dict as safetensors under the file name the spec names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / str(spec.weights)
    state = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    save_file(state, str(path))
    return path


def train_and_save(
    args: argparse.Namespace, train_fn: Callable[[ModelSpec, argparse.Namespace], nn.Module]
) -> tuple[ModelSpec, nn.Module]:
    """Seed, load the spec, train with ``train_fn``, write the weights and report size and time."""
    seed_everything(args.seed, args.threads)
    spec = load_spec(args.spec)
    started = time.perf_counter()
    model = train_fn(spec, args)
    path = save_weights(model, spec, args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({params} parameters) in {time.perf_counter() - started:.0f} s", flush=True)
    return spec, model


def spec_argument_parser(description: str, spec_file: str) -> argparse.ArgumentParser:
    """Command-line options every training script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=builtin_repository(), help="folder the weights go to")
    parser.add_argument("--spec", type=Path, default=builtin_repository() / spec_file, help="the model spec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small rotation, scale and shift of [0, 1] images (black fills the border)."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(12)
    scale = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return float((predictions == labels).float().mean())


def train(spec: ModelSpec, epochs: int, seed: int, batch_size: int = 64, peak_lr: float = 3e-3) -> nn.Module:
    prep = spec.preprocessing
    mean, std = prep.mean[0], prep.std[0]
    train_split, held_out = load_split()
    # Keep training images in [0, 1]: augmentation fills with black before normalisation.
    train_x, train_y = split_tensors(train_split, prep.input_size, (0.0,), (1.0,))
    test_x, test_y = split_tensors(held_out, prep.input_size, prep.mean, prep.std)
    model = HybridClassifier(**spec.architecture_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        running = 0.0
        for batch in order.split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, peak_lr, warmup=steps_per_epoch)
            images = (augment(train_x[batch], generator) - mean) / std
            loss = F.cross_entropy(model(images), train_y[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(batch)
            step += 1
        if epoch % 5 == 4 or epoch == epochs - 1:
            acc = accuracy(model, test_x, test_y)
            print(f"epoch {epoch + 1}/{epochs} loss {running / len(train_x):.4f} held-out top-1 {acc:.4f}", flush=True)
    model.eval()
    return model


def main() -> None:
    parser = spec_argument_parser(__doc__.splitlines()[0], "classifier.yaml")
    parser.add_argument("--epochs", type=int, default=25)
    train_and_save(parser.parse_args(), lambda spec, args: train(spec, args.epochs, args.seed))


if __name__ == "__main__":
    main()

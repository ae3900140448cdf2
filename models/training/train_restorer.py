"""Train the built-in restoration models (``super-resolution-x2.yaml``, ``denoiser.yaml``).

    python -m hybridserve.models.training.train_restorer --task sr --scale 2
    python -m hybridserve.models.training.train_restorer --task denoise

The spec is the single source of truth: its ``architecture_args`` build the model and its
``weights`` name the file written into ``--out`` (default: the built-in repository). Data
come from ``photos``: aligned patches of the training photographs, degraded as a client's
image would be (bicubic downscaling to uint8 for super-resolution; Gaussian noise of sigma 25,
rounded and clipped to uint8, for denoising) and scaled to [0, 1] without normalisation, as
the server feeds restoration models. L1 loss, Adam with warm-up, cosine decay and gradient clipping, a fixed
number of steps, fixed seeds and one thread: a run repeats exactly on the same machine.

At the end the held-out photographs are measured: super-resolution as PSNR on the luma
channel Y (BT.601, ``scale`` border pixels shaved, outputs rounded to uint8) against
bicubic upscaling, denoising as RGB PSNR against the noisy input.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.server import ModelSpec, builtin_repository, load_spec
from hybridserve.models.builtin.restorer import HybridRestorer
from hybridserve.models.training import photos
from hybridserve.models.training.train_classifier import cosine_lr, save_weights, seed_everything

NOISE_SIGMA = 25.0
EVAL_NOISE_SEED = 2024
GRAD_CLIP = 1.0
LOG_EVERY = 50
DEFAULT_STEPS = {"sr": 1600, "denoise": 1000}


def luma(image: np.ndarray) -> np.ndarray:
    """BT.601 luma Y in [16, 235] of a uint8 RGB image, as float (not rounded)."""
    rgb = image.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR with peak 255 between two arrays on the 0-255 scale."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10.0 * np.log10(255.0**2 / mse))


@torch.no_grad()
def restore(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Run ``model`` on one whole uint8 image (sides multiples of its pad_multiple) -> uint8."""
    model.eval()
    return photos.to_uint8(model(photos.to_tensor(image)))[0]


def evaluate_super_resolution(model: HybridRestorer) -> dict[str, float]:
    """Mean PSNR-Y over the held-out photographs of the model and of bicubic upscaling."""
    scale = model.scale
    model_db, bicubic_db = [], []
    for hr in photos.load_photos(photos.HELD_OUT_PHOTOS, scale * model.pad_multiple):
        lr = photos.downscale(hr, scale)
        target = luma(hr)[scale:-scale, scale:-scale]
        model_db.append(psnr(luma(restore(model, lr))[scale:-scale, scale:-scale], target))
        bicubic_db.append(psnr(luma(photos.upscale(lr, scale))[scale:-scale, scale:-scale], target))
    return {"model_psnr_y": float(np.mean(model_db)), "bicubic_psnr_y": float(np.mean(bicubic_db))}


def evaluate_denoiser(model: HybridRestorer) -> dict[str, float]:
    """Mean RGB PSNR over the held-out photographs of the denoised and of the noisy images."""
    rng = np.random.default_rng(EVAL_NOISE_SEED)
    model_db, noisy_db = [], []
    for clean in photos.load_photos(photos.HELD_OUT_PHOTOS, model.pad_multiple):
        noisy = photos.add_noise(clean, NOISE_SIGMA, rng)
        model_db.append(psnr(restore(model, noisy), clean))
        noisy_db.append(psnr(noisy, clean))
    return {"model_psnr": float(np.mean(model_db)), "noisy_psnr": float(np.mean(noisy_db))}


def training_pairs(task: str, scale: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(model input, target) uint8 photo pairs; denoising pairs are (clean, clean), noise comes per batch."""
    if task == "sr":
        return [(photos.downscale(hr, scale), hr) for hr in photos.load_photos(photos.TRAIN_PHOTOS, scale)]
    return [(clean, clean) for clean in photos.load_photos(photos.TRAIN_PHOTOS)]


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    peak_lr: float,
) -> None:
    """``steps`` optimiser steps: warm-up then cosine learning rate, gradient clipping, loss logged."""
    model.train()
    running = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, peak_lr, warmup=steps // 20)
        inputs, targets = next_batch()
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        running += loss.item()
        if (step + 1) % LOG_EVERY == 0:
            print(f"step {step + 1}/{steps} loss {running / LOG_EVERY:.4f}", flush=True)
            running = 0.0
    model.eval()


def train_and_save(
    spec: ModelSpec,
    out_dir: Path,
    train_model: Callable[[], nn.Module],
    evaluate_model: Callable[[nn.Module], dict[str, float]],
) -> None:
    """Train, write the weights the spec names into ``out_dir``, report time and held-out scores."""
    started, cpu_started = time.perf_counter(), time.process_time()
    model = train_model()
    elapsed, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    path = save_weights(model, spec, out_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({params} parameters) after {elapsed:.0f} s of training ({cpu_seconds:.0f} s CPU)")
    scores = evaluate_model(model)
    print("held-out " + ", ".join(f"{key} {value:.3f}" for key, value in scores.items()))


def train(spec: ModelSpec, task: str, steps: int, seed: int, batch_size: int, patch: int, peak_lr: float) -> HybridRestorer:
    model = HybridRestorer(**spec.architecture_args)
    sampler = photos.PairedPatches(training_pairs(task, model.scale), patch, model.scale, seed)
    noise_rng = np.random.default_rng(seed + 1)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = sampler.batch(batch_size)
        if task == "denoise":
            inputs = photos.add_noise(inputs, NOISE_SIGMA, noise_rng)
        return photos.to_tensor(inputs), photos.to_tensor(targets)

    fit(model, torch.optim.Adam(model.parameters(), lr=peak_lr), next_batch, F.l1_loss, steps, peak_lr)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("sr", "denoise"), required=True)
    parser.add_argument("--scale", type=int, default=2, help="super-resolution factor (sr only)")
    parser.add_argument("--spec", type=Path, help="the model spec (default: the built-in one for the task)")
    parser.add_argument("--out", type=Path, default=builtin_repository(), help="folder the weights go to")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: 1600 for sr, 1000 for denoise)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch", type=int, default=48, help="input patch side (a multiple of the window size)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    default_spec = f"super-resolution-x{args.scale}.yaml" if args.task == "sr" else "denoiser.yaml"
    spec = load_spec(args.spec or builtin_repository() / default_spec)
    expected_scale = args.scale if args.task == "sr" else 1
    if int(spec.architecture_args.get("scale", 1)) != expected_scale:
        parser.error(f"{spec.name} has scale {spec.architecture_args.get('scale')}, the task needs {expected_scale}")
    steps = args.steps or DEFAULT_STEPS[args.task]
    seed_everything(args.seed, args.threads)
    train_and_save(
        spec,
        args.out,
        lambda: train(spec, args.task, steps, args.seed, args.batch_size, args.patch, args.lr),
        evaluate_super_resolution if args.task == "sr" else evaluate_denoiser,
    )

if __name__ == "__main__":
    main()

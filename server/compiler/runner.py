"""Serving compiled programs: batch buckets, the eager cross-check, and deterministic example inputs.

``BatchRunner`` serves a batch with the compiled programs (one dynamic-batch program, or one
per static bucket with batches padded up to it; other item shapes run eager);
``check_against_eager`` fails a load whose compiled outputs differ from eager beyond the
precision's tolerance; ``example_item`` and ``example_batch`` make the inputs every build and
check use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hybridserve.server.tasks.base import InferenceRequest, Item, TaskHandler

TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 1e-2}
Program = Callable[..., Any]


@dataclass
class CompileResult:
    """What ``compile_model`` hands the runtime: the callable to serve and how it was built."""

    module: Callable[..., Any]
    backend: str
    cache: str | None  # "hit", "miss", or None for eager
    warmup_sizes: tuple[int, ...]
    example: Item
    artifact: Path | None = None
    precision: str = "fp32"  # the precision actually served
    fp32_layers: tuple[str, ...] = ()  # int8: the layers the accuracy gate kept in fp32
    gate: dict[str, Any] | None = None  # int8: the accuracy gate's report (metric, values, reason)
    precision_reason: str | None = None  # why the spec's precision is not the one served


class CompileMismatch(RuntimeError):
    """A compiled model's outputs differ from eager beyond the precision's tolerance."""


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


class BatchRunner:
    """Serves batches with compiled programs: pads to buckets, splits big batches, sends odd shapes to eager.

    ``programs`` maps a static batch size to its program, or ``None`` to one program that takes
    any batch from 1 to ``max_batch``.
    """

    def __init__(self, programs: dict[int | None, Program], eager: nn.Module,
                 item_shapes: tuple[tuple[int, ...], ...], max_batch: int):
        self.programs = programs
        self.eager = eager
        self.item_shapes = item_shapes
        self.buckets = tuple(sorted(size for size in programs if size is not None))
        self.dynamic = None in programs
        self.limit = max_batch if self.dynamic else self.buckets[-1]

    @property
    def warmup_sizes(self) -> tuple[int, ...]:
        if self.dynamic:
            return tuple(sorted({1, min(2, self.limit), self.limit}))
        return self.buckets

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if tuple(tuple(t.shape[1:]) for t in inputs) != self.item_shapes:
            return self.eager(*inputs)
        if torch.is_inference_mode_enabled():  # as served: torch.compile guards on it, other tensors recompile
            inputs = tuple(t if t.is_inference() else t.clone() for t in inputs)
        count = inputs[0].shape[0]
        if count > self.limit:
            parts = [self(*(t[i:i + self.limit] for t in inputs)) for i in range(0, count, self.limit)]
            return _map_outputs(lambda *chunks: torch.cat(chunks), *parts)
        if self.dynamic:
            return self.programs[None](*inputs)
        size = next(s for s in self.buckets if s >= count)
        if size > count:  # repeat the last item: real values keep every layer in its normal range
            inputs = tuple(torch.cat([t, t[-1:].expand(size - count, *t.shape[1:])]) for t in inputs)
        return _map_outputs(lambda out: out[:count], self.programs[size](*inputs))


def _map_outputs(fn: Callable[..., torch.Tensor], *outputs: Any) -> Any:
    """Apply ``fn`` leaf-wise to one or more outputs of the same structure (tensor, tuple, list, dict)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return fn(*outputs)
    if isinstance(first, dict):
        return {key: _map_outputs(fn, *(o[key] for o in outputs)) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_map_outputs(fn, *parts) for parts in zip(*outputs))
    return first


def output_leaves(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [leaf for key in sorted(output) for leaf in output_leaves(output[key])]
    if isinstance(output, (tuple, list)):
        return [leaf for part in output for leaf in output_leaves(part)]
    return []


def max_relative_error(reference: Any, candidate: Any) -> float:
    """Largest absolute difference over each output's largest magnitude; inf if structure or shape differ."""
    expected, actual = output_leaves(reference), output_leaves(candidate)
    if len(expected) != len(actual):
        return float("inf")
    worst = 0.0
    for ref, got in zip(expected, actual):
        if ref.shape != got.shape:
            return float("inf")
        if not ref.is_floating_point():
            if not torch.equal(ref.cpu(), got.cpu()):
                return float("inf")
            continue
        ref, got = ref.detach().float().cpu(), got.detach().float().cpu()
        if not torch.isfinite(got).all() and not torch.equal(torch.isfinite(ref), torch.isfinite(got)):
            return float("inf")
        scale = ref.abs().nan_to_num(0.0, 0.0, 0.0).max().clamp_min(1e-6)
        worst = max(worst, float(((ref - got).abs().nan_to_num(0.0, 0.0, 0.0).max() / scale)))
    return worst


def check_against_eager(eager: nn.Module, compiled: Callable[..., Any], batches: Sequence[tuple[torch.Tensor, ...]],
                        precision: str, name: str) -> float:
    """Run every batch through both; raise CompileMismatch beyond the precision's tolerance."""
    tolerance = TOLERANCE[precision]
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            error = max_relative_error(eager(*batch), compiled(*batch))
            if error > tolerance:
                raise CompileMismatch(
                    f"compiled model {name!r} differs from eager at batch {batch[0].shape[0]}: max relative "
                    f"error {error:.3g} > {tolerance:g} ({precision})")
            worst = max(worst, error)
    return worst


def example_item(handler: TaskHandler) -> Item:
    """One preprocessed item of the shape the model serves (a full restoration tile, or the input size)."""
    request = handler.warmup_request()
    if handler.spec.task == "restoration":
        side = max(handler.spec.preprocessing.tile, handler.min_side)
        image = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        request = InferenceRequest(image=image, reference=image if handler.spec.needs_reference else None)
    return handler.preprocess(request).items[0]


def example_batch(item: Item, size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``size`` distinct items derived from ``item`` (deterministic), as model inputs."""
    parts = item if isinstance(item, tuple) else (item,)
    generator = torch.Generator().manual_seed(size)
    batch = []
    for part in parts:
        rows = part.unsqueeze(0).repeat(size, *([1] * part.dim()))
        noise = torch.rand(rows.shape, generator=generator) * 0.1
        noise[0] = 0
        batch.append((rows + noise).to(device, dtype))
    return tuple(batch)



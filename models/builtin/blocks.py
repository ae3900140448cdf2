"""The building blocks of the built-in hybrid CNN-Transformers, and ``HybridModel``, their common base.

Layout follows CoAtNet (Dai et al., 2021): a convolutional stem, early stages of MBConv
blocks (inverted residuals with depthwise convolutions) that see local texture at high
resolution, then transformer stages of multi-head self-attention over the tokens of the
low-resolution feature map.

Positions enter the transformer stages through a depthwise-convolution position encoding
(as in CPVT / conditional positional encodings) rather than a learned table, so one set of
weights works at any input size. Everything is plain tensor ops with shapes taken from the
input, so the modules trace with ``torch.export`` and compile with ``torch.compile``.

``HybridBackbone`` (stem + stages, returning every stage's feature map) is what the built-in
classifier, detector, segmenter and quality model share; each of them is a ``HybridModel``,
which builds the backbone from the model's keyword arguments over the model's own defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def check_heads(dim: int, num_heads: int) -> int:
    """``num_heads``, after checking that it divides the width ``dim``."""
    if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    return num_heads


class ConvNormAct(nn.Sequential):
    """Conv2d -> BatchNorm -> GELU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.GELU(),
        )


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> bottleneck MLP -> sigmoid gate."""

    def __init__(self, chs: int, reduced_chs: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(chs, reduced_chs, 1)
        self.expand = nn.Conv2d(reduced_chs, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.gelu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class MBConv(nn.Module):
    """Pre-norm inverted residual: 1x1 expand -> depthwise 3x3 -> squeeze-excite -> 1x1 project."""

    def __init__(self, dim: int, expand_ratio: float = 4.0) -> None:
        super().__init__()
        mid_chs = int(dim * expand_ratio)
        self.norm = nn.BatchNorm2d(dim)
        self.expand = ConvNormAct(dim, mid_chs, kernel_size=1)
        self.depthwise = ConvNormAct(mid_chs, mid_chs, kernel_size=3, groups=mid_chs)
        self.se = SqueezeExcite(mid_chs, max(8, dim // 4))
        self.project = nn.Conv2d(mid_chs, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(self.norm(x)))))


class Attention(nn.Module):
    """Multi-head self-attention over a token sequence (N, L, C)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = check_heads(dim, num_heads)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class TransformerBlock(nn.Module):
    """Depthwise-conv position encoding, then pre-norm attention and MLP, on an (N, C, H, W) map."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(n, c, h, w)


class HybridBackbone(nn.Module):
    """A one-convolution stem, then ``num_conv_stages`` MBConv stages, then transformer stages.

    Every stage opens with a strided 3x3 convolution that halves the resolution and sets the
    width (cheaper on CPUs than expanding at the higher resolution), so stage ``i`` has
    stride ``stem_stride * 2 ** (i + 1)``. ``forward`` returns the feature map of every stage.
    """

    def __init__(
        self,
        in_chans: int = 3,
        dims: Sequence[int] = (32, 64, 128, 192),
        depths: Sequence[int] = (2, 2, 2, 1),
        num_conv_stages: int = 2,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        stem_stride: int = 2,
        expand_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths) or not 0 <= num_conv_stages <= len(dims):
            raise ValueError("dims and depths need one entry per stage; num_conv_stages must fit in them")
        stem_chs = dims[0] // 2
        self.stem = ConvNormAct(in_chans, stem_chs, stride=stem_stride)
        self.stages = nn.ModuleList()
        prev = stem_chs
        for index, (dim, depth) in enumerate(zip(dims, depths)):
            blocks: list[nn.Module] = [ConvNormAct(prev, dim, stride=2)]
            if index < num_conv_stages:
                blocks.extend(MBConv(dim, expand_ratio) for _ in range(depth))
            else:
                blocks.extend(TransformerBlock(dim, max(1, dim // head_dim), mlp_ratio) for _ in range(depth))
            self.stages.append(nn.Sequential(*blocks))
            prev = dim
        self.out_dims = tuple(dims)
        self.head_dim = head_dim
        self.strides = tuple(stem_stride * 2 ** (i + 1) for i in range(len(dims)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class HybridModel(nn.Module):
    """Base of the built-in models: a ``HybridBackbone`` built from the model's backbone arguments.

    ``backbone_args`` are ``HybridBackbone``'s keyword arguments (``in_chans``, ``dims``,
    ``depths``, ``num_conv_stages``, ``head_dim``, ``mlp_ratio``, ``stem_stride``,
    ``expand_ratio``); those not given take the model class's ``backbone_defaults``, then the
    backbone's own defaults. A spec's ``architecture_args`` pass them through unchanged.
    """

    backbone_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **backbone_args: Any) -> None:
        super().__init__()
        args = {**self.backbone_defaults, **backbone_args}
        self.in_channels = int(args.get("in_chans", 3))
        self.backbone = HybridBackbone(**args)

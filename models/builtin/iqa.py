"""HybridIQA: a no-reference image quality model, a hybrid CNN-Transformer with attention pooling.

The backbone is the built-in CoAtNet-style ``HybridBackbone`` (shared with the classifier and
the detector): convolutional MBConv stages at high resolution, where the low-level evidence
of blur, noise and compression artefacts lives, then transformer stages of self-attention
over the tokens of the low-resolution map, which relate those local cues across the image.

The tokens of the last stage are pooled by attention: a learned query attends over all
tokens, so the model can weigh the regions that reveal a distortion (flat areas show noise
and blocking, edges show blur) instead of averaging them away. The earlier stages are
summarised by the mean and standard deviation of each channel over the image, statistics of
local texture energy that respond directly to blur and noise (as in multi-scale NR-IQA
models). A linear head over all of it and a sigmoid give one score per image in [0, 1],
higher meaning better quality.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.models.builtin.blocks import HybridModel, check_heads


class AttentionPool(nn.Module):
    """A learned query attends over tokens (N, L, C) -> (N, C), with ``num_heads`` heads."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = check_heads(dim, num_heads)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.q = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, length, dim = tokens.shape
        head_dim = dim // self.num_heads
        kv = self.kv(self.norm(tokens)).view(n, length, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q = self.q(self.query).view(1, 1, self.num_heads, head_dim).transpose(1, 2).expand(n, -1, -1, -1)
        pooled = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (N, heads, 1, head_dim)
        return self.proj(pooled.reshape(n, dim))


class HybridIQA(HybridModel):
    """``x`` normalised with ImageNet mean/std (N, 3, H, W) -> quality (N,) in [0, 1]."""

    backbone_defaults = {"dims": (32, 64, 128), "depths": (2, 2, 2), "mlp_ratio": 2.0}

    def __init__(self, **backbone_args: Any) -> None:
        super().__init__(**backbone_args)
        dims, head_dim = self.backbone.out_dims, self.backbone.head_dim
        self.pool = AttentionPool(dims[-1], max(1, dims[-1] // head_dim))
        pooled_width = dims[-1] + 2 * sum(dims[:-1])
        self.norm = nn.LayerNorm(pooled_width)
        self.head = nn.Linear(pooled_width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *early, last = self.backbone(x)
        pooled = [self.pool(last.flatten(2).transpose(1, 2))]
        for features in early:
            pooled += [features.mean(dim=(2, 3)), features.std(dim=(2, 3))]
        return torch.sigmoid(self.head(self.norm(torch.cat(pooled, dim=1)))).squeeze(1)

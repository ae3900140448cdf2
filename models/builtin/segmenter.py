"""HybridSegmenter: a small hybrid CNN-Transformer semantic segmenter with a SegFormer-style head.

The backbone is the built-in models' ``HybridBackbone`` (``blocks.py``), as in the detector:
MBConv stages at high resolution, then a transformer stage (self-attention over the tokens
of the stride-16 map) that lets every location see the whole image.

The decoder is SegFormer's all-MLP head (Xie et al., "SegFormer: Simple and Efficient Design
for Semantic Segmentation with Transformers", 2021): every stage's map goes through a 1x1
convolution (a per-pixel linear layer) to one width, is upsampled bilinearly to the finest
stage's resolution, and the maps are concatenated, fused by a 1x1 convolution with BatchNorm
and GELU, and classified per pixel by a last 1x1 convolution.

``forward`` returns logits at the finest stage's stride (4 with the default stem): the
segmentation contract lets the server upsample them to the output size before the argmax.
Shapes are taken from the input, so the module traces with ``torch.export``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.models.builtin.blocks import ConvNormAct, HybridModel


class AllMLPDecoder(nn.Module):
    """SegFormer's head: per-stage 1x1 projections, bilinear upsampling, concatenation, 1x1 fuse, 1x1 classifier."""

    def __init__(self, in_dims: Sequence[int], dim: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv2d(d, dim, 1) for d in in_dims)
        self.fuse = ConvNormAct(dim * len(in_dims), dim, kernel_size=1)
        self.dropout = nn.Dropout2d(drop_rate)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        maps = [self.projections[0](features[0])]
        for projection, feature in zip(self.projections[1:], features[1:]):
            maps.append(F.interpolate(projection(feature), size=size, mode="bilinear", align_corners=False))
        return self.classifier(self.dropout(self.fuse(torch.cat(maps, dim=1))))


class HybridSegmenter(HybridModel):
    """``x`` normalised (N, 3, H, W) -> logits (N, num_classes, H / s, W / s), s the first stage's stride."""

    backbone_defaults = {"dims": (32, 64, 128), "depths": (1, 2, 2), "mlp_ratio": 2.0}

    def __init__(self, num_classes: int = 4, decoder_dim: int = 64, drop_rate: float = 0.0,
                 **backbone_args: Any) -> None:
        super().__init__(**backbone_args)
        self.num_classes = num_classes
        self.stride = self.backbone.strides[0]
        self.decoder = AllMLPDecoder(self.backbone.out_dims, decoder_dim, num_classes, drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(x))

"""HybridDetector: a small anchor-free hybrid CNN-Transformer object detector.

The backbone is the built-in models' ``HybridBackbone`` (``blocks.py``): MBConv stages at high
resolution, then a transformer stage (self-attention over the tokens of the stride-16
map) that lets every location see the whole image. A top-down feature pyramid brings the
result back to stride 4, where a CenterNet-style head (Zhou et al., "Objects as Points",
2019) predicts, per cell, one heatmap per class (object centres), the box size (log
width/height in cells) and the sub-cell offset of the centre.

``forward`` also decodes: peaks are the cells equal to their 3x3 max-pool (the CenterNet
replacement for NMS), the top ``max_detections`` peaks over all classes become boxes. It
is tensor ops only with a fixed K, so it traces with ``torch.export``. ``forward_maps``
returns the raw maps for training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.models.builtin.blocks import ConvNormAct, HybridModel

HEATMAP_PRIOR = 0.01  # initial centre probability, so early training is not swamped by negatives
MAX_LOG_SIZE = 8.0  # bound on predicted log box size (cells) before exp


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 -> BatchNorm -> GELU -> pointwise 1x1 -> BatchNorm -> GELU."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__(ConvNormAct(in_chs, in_chs, 3, groups=in_chs), ConvNormAct(in_chs, out_chs, 1))


class TopDownNeck(nn.Module):
    """Feature pyramid, top-down only: lateral 1x1s, nearest upsampling, a separable conv per level."""

    def __init__(self, in_dims: Sequence[int], dim: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(d, dim, 1) for d in in_dims)
        self.smooth = nn.ModuleList(SeparableConv(dim, dim) for _ in in_dims[:-1])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.laterals[-1](features[-1])
        for index in range(len(features) - 2, -1, -1):
            lateral = self.laterals[index](features[index])
            x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = self.smooth[index](x)
        return x


class HybridDetector(HybridModel):
    """``x`` normalised (N, 3, H, W) -> (boxes (N, K, 4) xyxy in [0, 1], scores (N, K), labels (N, K))."""

    backbone_defaults = {"dims": (32, 64, 128), "depths": (1, 2, 2), "mlp_ratio": 2.0}

    def __init__(self, num_classes: int = 3, neck_dim: int = 64, max_detections: int = 100,
                 **backbone_args: Any) -> None:
        super().__init__(**backbone_args)
        self.num_classes = num_classes
        self.max_detections = max_detections
        self.stride = self.backbone.strides[0]
        self.neck = TopDownNeck(self.backbone.out_dims, neck_dim)
        self.heatmap_head = nn.Sequential(SeparableConv(neck_dim, neck_dim), nn.Conv2d(neck_dim, num_classes, 1))
        self.box_head = nn.Sequential(SeparableConv(neck_dim, neck_dim), nn.Conv2d(neck_dim, 4, 1))
        prior_logit = -torch.log(torch.tensor((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        nn.init.constant_(self.heatmap_head[-1].bias, float(prior_logit))

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps at stride 4: heatmap logits (N, C, h, w) and box terms (N, 4, h, w).

        Box terms are (log width, log height) in cells, then the centre's (x, y) offset
        within its cell.
        """
        features = self.neck(self.backbone(x))
        return self.heatmap_head(features), self.box_head(features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heatmap_logits, box_terms = self.forward_maps(x)
        return self.decode(heatmap_logits, box_terms)

    def decode(
        self, heatmap_logits: torch.Tensor, box_terms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Peaks of the heatmaps -> the top ``max_detections`` boxes, sorted by score."""
        n, classes, height, width = heatmap_logits.shape
        heat = torch.sigmoid(heatmap_logits)
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
        k = min(self.max_detections, classes * height * width)
        scores, index = peaks.flatten(1).topk(k, dim=1)
        labels = torch.div(index, height * width, rounding_mode="floor")
        cell = index - labels * (height * width)
        terms = box_terms.flatten(2).gather(2, cell.unsqueeze(1).expand(n, 4, k))
        size = torch.exp(terms[:, 0:2].clamp(max=MAX_LOG_SIZE))
        grid_y = torch.div(cell, width, rounding_mode="floor")
        grid_x = cell - grid_y * width
        centre_x = (grid_x.to(heat.dtype) + terms[:, 2]) / width
        centre_y = (grid_y.to(heat.dtype) + terms[:, 3]) / height
        half_w = size[:, 0] / (2 * width)
        half_h = size[:, 1] / (2 * height)
        boxes = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], dim=2)
        return boxes.clamp(0.0, 1.0), scores, labels

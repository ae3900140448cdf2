"""HybridClassifier: a small CoAtNet-style hybrid CNN-Transformer image classifier.

The backbone (``blocks.HybridBackbone``) follows CoAtNet (Dai et al., 2021): a convolutional
stem, early stages of MBConv blocks that see local texture at high resolution, then
transformer stages of multi-head self-attention over the tokens of the low-resolution
feature map. The classifier pools the last stage's map and applies a linear head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hybridserve.models.builtin.blocks import HybridModel


class HybridClassifier(HybridModel):
    """CoAtNet-style classifier: ``x`` normalised (N, in_chans, H, W) -> logits (N, num_classes).

    Backbone arguments (``blocks.HybridModel``) default to four stages, dims (32, 64, 128, 192).
    """

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0, **backbone_args: Any) -> None:
        super().__init__(**backbone_args)
        self.num_classes = num_classes
        width = self.backbone.out_dims[-1]
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone(x)[-1].mean((2, 3))
        return self.head(self.dropout(self.norm(pooled)))

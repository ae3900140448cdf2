"""hybridserve.models.zoo: published hybrid IQA architectures, written in this project on timm backbones.

Referenced in specs as ``zoo:<name>``:

- ``zoo:ahiq``   AHIQ (Lao et al., CVPRW 2022), full-reference: a ViT branch and a CNN branch, the CNN
  features re-sampled by a deformable convolution whose offsets come from the ViT features;
- ``zoo:maniqa`` MANIQA (Yang et al., CVPRW 2022), no-reference: ViT features, transposed (channel)
  attention and Swin stages, a patch-weighted score.

Parameter names follow the authors' released checkpoints, so those load strictly (AHIQ's release
is split in parts: ``python -m hybridserve.models.zoo.checkpoints ahiq`` joins them). Backbones are
always built with ``pretrained=False``: weights come only from the spec's ``weights``.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

ARCHITECTURES: dict[str, str] = {
    "ahiq": "ahiq:AHIQ",
    "maniqa": "maniqa:MANIQA",
}


def build_zoo_model(name: str, **args: Any) -> nn.Module:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown zoo architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    module_name, _, attr = ARCHITECTURES[name].partition(":")
    return getattr(importlib.import_module(f"hybridserve.models.zoo.{module_name}"), attr)(**args)


__all__ = ["ARCHITECTURES", "build_zoo_model"]

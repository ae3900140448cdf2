"""Hugging Face transformers architectures behind the task contracts: ``transformers:<kind>``.

Kinds:

- ``cvt``     CvT image classification → logits ``(N, C)``;
- ``detr``    DETR detection (softmax over classes plus "no object");
- ``rt_detr`` RT-DETR detection (sigmoid, focal-loss style), including a timm backbone under it
  through ``backbone_config: {model_type: timm_backbone, backbone: <timm name>, out_indices: [...]}``;
- ``segformer`` SegFormer semantic segmentation (hierarchical Mix Transformer, all-MLP decoder);
- ``upernet`` UperNet semantic segmentation on the backbone its ``backbone_config`` names
  (``{model_type: convnext, ...}`` or ``{model_type: swin, ...}``, with ``out_features: [stage1, ..., stage4]``).

Detection models return ``(boxes (N, K, 4) xyxy in [0, 1] of the input, scores (N, K), labels (N, K))``,
the K best (query, class) pairs computed with tensor operations only, so batches and compiled
backends see one graph. Segmentation models return the logits of their decode head, ``(N, C, H/4,
W/4)``, which the server upsamples; UperNet skips its auxiliary FCN head (a training aid) and the
upsampling its own forward does.

Each model is a subclass of the transformers model whose parameter names it keeps, so a state dict
saved from it (safetensors or ``.pth``) loads strictly through ``weights:``. Checkpoints published on
the Hugging Face hub go through ``pretrained: <hub id or local folder>`` instead: transformers then
applies its own renames of older checkpoint layouts, and missing or mis-shaped weights are an error.

Arguments (``architecture_args`` of a spec):

- ``config``: a dict of config fields, or a hub id / local folder whose ``config.json`` is read;
- ``pretrained``: a hub id or local folder to load weights from with transformers' loader;
- ``max_detections``: K for detection (default: every query);
- anything else overrides a config field (``num_labels: 3``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    from transformers import (
        CvtConfig,
        CvtForImageClassification,
        DetrConfig,
        DetrForObjectDetection,
        PretrainedConfig,
        RTDetrConfig,
        RTDetrForObjectDetection,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )
except ImportError as exc:  # transformers is the optional `zoo` extra
    raise ImportError("transformers:<kind> architectures need `pip install 'hybridserve[zoo]'`") from exc

from hybridserve.models.weights import WeightsMismatch


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Centre/size boxes to corner boxes, clipped to the image ([0, 1] coordinates)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1).clamp(0.0, 1.0)


def gather_boxes(boxes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    return boxes.gather(1, queries.unsqueeze(-1).expand(-1, -1, boxes.shape[-1]))


class CvtClassifier(CvtForImageClassification):
    """CvT returning plain logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(pixel_values=x).logits


class DetrDetector(DetrForObjectDetection):
    """DETR: per query, the best real class (the last logit is "no object")."""

    max_detections: int | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = super().forward(pixel_values=x)
        scores, labels = out.logits.softmax(-1)[..., :-1].max(-1)
        k = min(self.max_detections or scores.shape[1], scores.shape[1])
        scores, queries = scores.topk(k, dim=1)
        return cxcywh_to_xyxy(gather_boxes(out.pred_boxes, queries)), scores, labels.gather(1, queries)


class RTDetrDetector(RTDetrForObjectDetection):
    """RT-DETR: the K best (query, class) pairs by sigmoid score, as its authors' post-processing does."""

    max_detections: int | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = super().forward(pixel_values=x)
        logits = out.logits
        queries_count, classes = logits.shape[1], logits.shape[2]
        k = min(self.max_detections or queries_count, queries_count)
        if self.config.use_focal_loss:
            scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
            labels, queries = index % classes, torch.div(index, classes, rounding_mode="floor")
        else:
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)
            scores, queries = scores.topk(k, dim=1)
            labels = labels.gather(1, queries)
        return cxcywh_to_xyxy(gather_boxes(out.pred_boxes, queries)), scores, labels


class SegformerSegmenter(SegformerForSemanticSegmentation):
    """SegFormer returning plain logits at stride 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(pixel_values=x).logits


class UperNetSegmenter(UperNetForSemanticSegmentation):
    """UperNet returning its decode head's logits at the finest feature map's stride (4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.decode_head(self.backbone(x).feature_maps)


KINDS: dict[str, tuple[type[PretrainedConfig], type[nn.Module]]] = {
    "cvt": (CvtConfig, CvtClassifier),
    "detr": (DetrConfig, DetrDetector),
    "rt_detr": (RTDetrConfig, RTDetrDetector),
    "segformer": (SegformerConfig, SegformerSegmenter),
    "upernet": (UperNetConfig, UperNetSegmenter),
}


def build_config(config_class: type[PretrainedConfig], config: str | dict | None, overrides: dict) -> PretrainedConfig:
    if isinstance(config, str):
        return config_class.from_pretrained(config, **overrides)
    return config_class(**{**(config or {}), **overrides})


def build_transformers_model(
    kind: str,
    config: str | dict[str, Any] | None = None,
    pretrained: str | None = None,
    max_detections: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build ``kind`` with random weights from ``config``, or load it from ``pretrained``."""
    key = kind.lower().replace("-", "_")
    if key not in KINDS:
        raise ValueError(f"transformers:{kind}: unknown kind; known: {', '.join(sorted(KINDS))}")
    config_class, model_class = KINDS[key]
    built = build_config(config_class, pretrained if config is None and pretrained else config, overrides)
    if pretrained:
        model, info = model_class.from_pretrained(pretrained, config=built, dtype=torch.float32,
                                                  output_loading_info=True)
        problems = [f"{name.replace('_', ' ')}: {', '.join(map(str, sorted(info[name])[:8]))}"
                    for name in ("missing_keys", "mismatched_keys") if info.get(name)]
        if problems:
            raise WeightsMismatch(f"{pretrained} does not fit transformers:{kind}; " + "; ".join(problems))
    else:
        model = model_class(built)
    if max_detections is not None:
        model.max_detections = int(max_detections)
    return model.eval()

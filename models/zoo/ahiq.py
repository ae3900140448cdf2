"""AHIQ, full-reference IQA (Lao et al., "Attentions Help CNNs See Better: Attention-based Hybrid Image
Quality Assessment Network", CVPRW 2022), written from the paper and the released checkpoints' layout.

Two branches see the reference and the distorted image: a ViT (features of its first five blocks,
class token dropped, as a grid) and a CNN (outputs of the first three residual blocks of its first
stage). The CNN features of both images are re-sampled by a deformable convolution whose offsets are
predicted from the reference's ViT features, then a patch-wise regressor compares distorted with
reference features and pools patch scores with predicted attention weights.

Names follow the released model: ``vit`` (``vit_base_patch8_224``), ``resnet50`` (the CNN branch,
whatever timm ResNet it is), ``deform_net`` and ``regressor``. A state dict with those four prefixes
loads strictly; the authors release ``deform_net`` and ``regressor`` on their own, beside ImageNet
backbones, and ``hybridserve.models.zoo.checkpoints`` joins the parts into one file.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DeformConv2d

from hybridserve.models.zoo.crops import check_crop_count, fixed_crops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeformFusion(nn.Module):
    """Re-sample CNN features with offsets predicted from ViT features, down to the ViT grid."""

    def __init__(self, vit_channels: int, cnn_channels: int, hidden: int, final_stride: int):
        super().__init__()
        self.conv_offset = nn.Conv2d(vit_channels, 2 * 3 * 3, 3, 1, 1)
        self.deform = DeformConv2d(cnn_channels, cnn_channels, 3, 1, 1)
        self.conv1 = nn.Sequential(
            nn.Conv2d(cnn_channels, hidden, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(hidden, cnn_channels, 3, padding=1, stride=final_stride),
        )

    def forward(self, cnn: torch.Tensor, vit: torch.Tensor) -> torch.Tensor:
        offsets = self.conv_offset(F.interpolate(vit, size=cnn.shape[-2:], mode="nearest"))
        return self.conv1(self.deform(cnn, offsets))


class PatchRegressor(nn.Module):
    """Per patch: a score and an attention weight from [dist - ref, dist, ref]; the weighted mean."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.down_channel = nn.Conv2d(in_channels, width, 1)
        self.feat_smoothing = nn.Sequential(
            nn.Conv2d(3 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.Conv2d(4 * width, 2 * width, 3, padding=1)
        )
        self.conv1 = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU())
        self.conv_attent = nn.Sequential(nn.Conv2d(width, 1, 1), nn.Sigmoid())
        self.conv = nn.Sequential(nn.Conv2d(width, 1, 1))

    def forward(self, distorted: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        dist, ref = self.down_channel(distorted), self.down_channel(reference)
        features = self.conv1(self.feat_smoothing(torch.cat((dist - ref, dist, ref), dim=1)))
        scores, weights = self.conv(features), self.conv_attent(features)
        return (scores * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))


class AHIQ(nn.Module):
    """Full-reference IQA: ``(reference, distorted)`` in [0, 1] → score ``(N,)``, higher is better.

    Scores the centre crop (``crops=1``) or the centre and corner crops (``crops=5``) of the ViT's
    input size and averages (the authors average random crops)."""

    def __init__(
        self,
        vit: str = "vit_base_patch8_224",
        cnn: str = "resnet50",
        vit_blocks: Sequence[int] = (0, 1, 2, 3, 4),
        cnn_blocks: int = 3,
        crops: int = 1,
        deform_hidden: int = 512,
        regressor_width: int = 256,
    ):
        super().__init__()
        self.vit = timm.create_model(vit, pretrained=False)
        self.resnet50 = timm.create_model(cnn, pretrained=False)
        if len(self.resnet50.layer1) < cnn_blocks:
            raise ValueError(f"{cnn} has {len(self.resnet50.layer1)} blocks in its first stage, not {cnn_blocks}")
        self.vit_blocks, self.cnn_blocks, self.crops = list(vit_blocks), cnn_blocks, check_crop_count(crops)
        self.crop_size = self.vit.patch_embed.img_size[0]
        patch = self.vit.patch_embed.patch_size[0]
        vit_channels = self.vit.embed_dim * len(self.vit_blocks)
        cnn_channels = self.resnet50.feature_info[1]["num_chs"] * cnn_blocks
        self.deform_net = DeformFusion(vit_channels, cnn_channels, deform_hidden, final_stride=max(1, patch // 8))
        self.regressor = PatchRegressor(vit_channels + cnn_channels, regressor_width)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def vit_features(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.vit.forward_intermediates(x, indices=self.vit_blocks, stop_early=True, intermediates_only=True)
        return torch.cat(parts, dim=1)

    def cnn_features(self, x: torch.Tensor) -> torch.Tensor:
        cnn = self.resnet50
        x = cnn.maxpool(cnn.act1(cnn.bn1(cnn.conv1(x))))
        parts = []
        for block in cnn.layer1[: self.cnn_blocks]:
            x = block(x)
            parts.append(x)
        return torch.cat(parts, dim=1)

    def score_crops(self, reference: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
        both = (torch.cat((reference, distorted)) - self.mean) / self.std
        vit_ref, vit_dist = self.vit_features(both).chunk(2)
        cnn_ref, cnn_dist = self.cnn_features(both).chunk(2)
        cnn_ref, cnn_dist = self.deform_net(cnn_ref, vit_ref), self.deform_net(cnn_dist, vit_ref)
        return self.regressor(torch.cat((vit_dist, cnn_dist), dim=1), torch.cat((vit_ref, cnn_ref), dim=1))

    def forward(self, reference: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
        refs = fixed_crops(reference, self.crop_size, self.crops)
        dists = fixed_crops(distorted, self.crop_size, self.crops)
        return self.score_crops(refs, dists).view(self.crops, -1).mean(dim=0)

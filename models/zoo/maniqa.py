"""MANIQA, no-reference IQA (Yang et al., "MANIQA: Multi-dimension Attention Network for No-Reference
Image Quality Assessment", CVPRW 2022), written from the paper and the released checkpoints' layout.

Pipeline: features of four middle ViT blocks (class token dropped) are concatenated along channels;
two rounds of [transposed attention block(s) over channels → 1x1 conv → Swin stage] refine them; a
score head and a weight head on every patch token give the score as the weighted mean of the patch
scores. The released models use ``vit_base_patch8_224`` and the defaults below, and take a 224x224
crop normalised with mean = std = 0.5.

Parameter and buffer names (``vit.*``, ``tablock1.*``, ``conv1``, ``swintransformer1.*`` including
``relative_position_index`` and ``attn_mask`` buffers, ``fc_score``, ``fc_weight``) are those of the
authors' checkpoints, which therefore load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.models.zoo.crops import check_crop_count, fixed_crops

# The Swin stages add their output back with this fixed weight in the released model.
STAGE_RESIDUAL_WEIGHT = 0.13


class TransposedAttention(nn.Module):
    """Attention across channels: every channel is a token whose features are the spatial positions."""

    def __init__(self, positions: int):
        super().__init__()
        self.c_q = nn.Linear(positions, positions)
        self.c_k = nn.Linear(positions, positions)
        self.c_v = nn.Linear(positions, positions)
        self.scale = positions ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, positions = x.shape
        weights = torch.softmax(self.c_q(x) @ self.c_k(x).transpose(-2, -1) * self.scale, dim=-1)
        # The released model lays the (C, N) result out again as (N, C) memory read as (C, N).
        mixed = (weights @ self.c_v(x)).transpose(1, 2).reshape(batch, channels, positions)
        return mixed + x


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) → (B * windows, window * window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def from_windows(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(B * windows, window * window, C) → (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """-100 between positions that a cyclic shift brought into one window from different regions."""
    regions = torch.zeros(1, height, width, 1)
    spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in spans for c in spans):
        regions[:, rows, cols, :] = label
    labels = to_windows(regions, window).squeeze(-1)
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        windows, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(windows, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        scores = scores + bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            groups = mask.shape[0]
            scores = scores.view(windows // groups, groups, self.heads, tokens, tokens) + mask[None, :, None]
            scores = scores.view(windows, self.heads, tokens, tokens)
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(windows, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, grid: int, heads: int, window: int, shift: int, hidden: int):
        super().__init__()
        if grid <= window:  # one window covers the grid: nothing to shift
            window, shift = grid, 0
        self.grid, self.window, self.shift = grid, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)
        self.register_buffer("attn_mask", shifted_window_mask(grid, grid, window, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        y = self.norm1(x).view(batch, self.grid, self.grid, dim)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(to_windows(y, self.window), self.attn_mask)
        y = from_windows(y, self.window, self.grid, self.grid)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(batch, tokens, dim)
        return x + self.mlp(self.norm2(x))


class SwinLayer(nn.Module):
    """Swin blocks, then a 3x3 convolution with ReLU on the token grid."""

    def __init__(self, dim: int, grid: int, depth: int, heads: int, window: int, hidden: int):
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, grid, heads, window, 0 if i % 2 == 0 else window // 2, hidden) for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        return F.relu(self.conv(grid)).flatten(2).transpose(1, 2)


class SwinStage(nn.Module):
    def __init__(self, dim: int, grid: int, depths: Sequence[int], heads: Sequence[int], window: int, hidden: int):
        super().__init__()
        self.grid = grid
        # Present in the released checkpoints, never used by the forward pass.
        self.downsample = nn.Conv2d(dim, dim, 3, 2, 1)
        self.layers = nn.ModuleList(SwinLayer(dim, grid, d, h, window, hidden) for d, h in zip(depths, heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            tokens = STAGE_RESIDUAL_WEIGHT * layer(tokens) + tokens
        return tokens.transpose(1, 2).reshape(batch, channels, self.grid, self.grid)


def score_head(dim: int, activation: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(dim, 1), activation)


class MANIQA(nn.Module):
    """No-reference IQA: ``x`` normalised (mean = std = 0.5) → score ``(N,)``.

    Scores the centre crop (``crops=1``) or the centre and corner crops (``crops=5``) of ``img_size``
    and averages (the authors average random 224x224 crops of the unresized image)."""

    def __init__(
        self,
        vit: str = "vit_base_patch8_224",
        img_size: int = 224,
        feature_blocks: Sequence[int] = (6, 7, 8, 9),
        embed_dim: int = 768,
        dim_mlp: int = 768,
        depths: Sequence[int] = (2, 2),
        num_heads: Sequence[int] = (4, 4),
        window_size: int = 4,
        num_tab: int = 2,
        crops: int = 1,
    ):
        super().__init__()
        self.crops = check_crop_count(crops)
        self.vit = timm.create_model(vit, pretrained=False, img_size=img_size)
        self.feature_blocks = list(feature_blocks)
        grid = self.vit.patch_embed.grid_size[0]
        positions, vit_dim = grid * grid, self.vit.embed_dim
        self.tablock1 = nn.ModuleList(TransposedAttention(positions) for _ in range(num_tab))
        self.conv1 = nn.Conv2d(vit_dim * len(self.feature_blocks), embed_dim, 1)
        self.swintransformer1 = SwinStage(embed_dim, grid, depths, num_heads, window_size, dim_mlp)
        self.tablock2 = nn.ModuleList(TransposedAttention(positions) for _ in range(num_tab))
        self.conv2 = nn.Conv2d(embed_dim, embed_dim // 2, 1)
        self.swintransformer2 = SwinStage(embed_dim // 2, grid, depths, num_heads, window_size, dim_mlp)
        self.fc_score = score_head(embed_dim // 2, nn.ReLU())
        self.fc_weight = score_head(embed_dim // 2, nn.Sigmoid())
        self.img_size = img_size

    @staticmethod
    def attend(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.flatten(2)
        for block in blocks:
            x = block(x)
        return x.view(shape)

    def score_crops(self, x: torch.Tensor) -> torch.Tensor:
        features = self.vit.forward_intermediates(x, indices=self.feature_blocks, stop_early=True,
                                                  intermediates_only=True)
        x = self.swintransformer1(self.conv1(self.attend(self.tablock1, torch.cat(features, dim=1))))
        x = self.swintransformer2(self.conv2(self.attend(self.tablock2, x)))
        tokens = x.flatten(2).transpose(1, 2)
        scores, weights = self.fc_score(tokens), self.fc_weight(tokens)
        return (scores * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_crops(fixed_crops(x, self.img_size, self.crops)).view(self.crops, -1).mean(dim=0)

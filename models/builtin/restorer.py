"""HybridRestorer: a small HAT/SwinIR-style CNN-Transformer for super-resolution and denoising.

Layout (after SwinIR, Liang et al. 2021, and HAT, Chen et al. 2023):

- a 3x3 convolution lifts the image to ``dim`` feature channels (shallow features);
- residual groups, each a sequence of hybrid layers and a closing 3x3 convolution with a
  skip around the group; a hybrid layer is a residual convolution block (local texture)
  followed by a window self-attention block (non-local context inside ``window_size`` x
  ``window_size`` windows with a learned relative position bias); every second attention
  block shifts its windows by half a window, as in Swin, so information crosses windows;
- a 3x3 convolution and a skip around the whole body;
- a reconstruction convolution, followed by PixelShuffle when ``scale > 1``, whose output is
  added to the input upsampled with bicubic interpolation (or to the input itself when
  ``scale == 1``): the network only learns the residual, which makes it train fast.

Inputs are in [0, 1]; height and width must be multiples of ``pad_multiple`` (the window
size), the server reflect-pads to that. Every shape is taken from ``x.shape`` and the shifted
window mask is built with tensor ops, so the module traces with ``torch.export`` and compiles
with ``torch.compile``. Window attention computes explicit scores when gradients are on
(training) and calls the fused ``scaled_dot_product_attention`` kernel under ``no_grad``
(serving); the two agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MASKED = -100.0


class ConvBlock(nn.Module):
    """Residual 3x3 conv -> GELU -> 3x3 conv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(N, H, W, C) -> (N, H/window * W/window, window*window, C)."""
    n, h, w, c = x.shape
    x = x.view(n, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // window) * (w // window), window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (N, nW, window*window, C) -> (N, H, W, C)."""
    n, c = windows.shape[0], windows.shape[-1]
    x = windows.view(n, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Additive mask (nW, 1, L, L) that stops attention between pixels that the cyclic shift made neighbours.

    After rolling the map by ``-shift``, the last ``window`` rows (and columns) hold three
    regions: pixels that were there, and pixels that wrapped around from the top (left).
    Pixels may attend only to pixels of the same region.
    """
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    row_region = (rows >= h - window).long() + (rows >= h - shift).long()
    col_region = (cols >= w - window).long() + (cols >= w - shift).long()
    region = (row_region[:, None] * 3 + col_region[None, :])[None, :, :, None]
    labels = window_partition(region, window)[0, :, :, 0]
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill(different, MASKED)[:, None]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a relative position bias per head."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]) + (window - 1)
        self.register_buffer("bias_index", relative[0] * (2 * window - 1) + relative[1], persistent=False)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``windows`` (N, nW, L, C); ``mask`` (nW, 1, L, L) or None."""
        n, num_windows, length, dim = windows.shape
        qkv = self.qkv(windows).view(n, num_windows, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (N, nW, heads, L, d)
        bias = self.bias_table[self.bias_index].permute(2, 0, 1)  # (heads, L, L)
        if torch.is_grad_enabled():
            # Training: explicit scores, whose backward is the fastest on CPU.
            scores = (q * self.scale) @ k.transpose(-2, -1) + bias
            if mask is not None:
                scores = scores + mask
            out = scores.softmax(dim=-1) @ v
        else:
            # Inference: the fused kernel never materialises the scores of all windows at once.
            # Without a shift every window shares the bias; with one, the mask differs per
            # window, so windows become extra heads and the (window, head) mask broadcasts over N.
            if mask is None:
                groups, attn_mask = (n * num_windows, self.num_heads), bias[None]
            else:
                groups, attn_mask = (n, num_windows * self.num_heads), (bias + mask).reshape(1, -1, length, length)
            q, k, v = (t.reshape(*groups, length, -1) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            out = out.view(n, num_windows, self.num_heads, length, -1)
        return self.proj(out.transpose(2, 3).reshape(n, num_windows, length, dim))


class WindowTransformerBlock(nn.Module):
    """Pre-norm (shifted) window attention and MLP on an (N, C, H, W) map."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        tokens = x.permute(0, 2, 3, 1)
        normed = self.norm1(tokens)
        mask = None
        if self.shift:
            normed = torch.roll(normed, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shifted_window_mask(h, w, self.window, self.shift, x.device).to(x.dtype)
        attended = window_merge(self.attn(window_partition(normed, self.window), mask), self.window, h, w)
        if self.shift:
            attended = torch.roll(attended, shifts=(self.shift, self.shift), dims=(1, 2))
        tokens = tokens + attended
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.permute(0, 3, 1, 2)


class ResidualGroup(nn.Module):
    """``depth`` hybrid layers (conv block + window attention block), a 3x3 conv, a skip."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(depth):
            layers.append(ConvBlock(dim))
            layers.append(WindowTransformerBlock(dim, num_heads, window, shift=(window // 2) * (index % 2)))
        self.layers = nn.Sequential(*layers)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.layers(x))


class HybridRestorer(nn.Module):
    """``x`` in [0, 1] (N, in_chans, H, W) -> (N, in_chans, H*scale, W*scale) in [0, 1]."""

    def __init__(
        self,
        scale: int = 2,
        in_chans: int = 3,
        dim: int = 48,
        depths: Sequence[int] = (2, 2),
        heads: Sequence[int] | int = 4,
        window_size: int = 8,
    ) -> None:
        super().__init__()
        if scale not in (1, 2, 3, 4):
            raise ValueError(f"scale must be 1, 2, 3 or 4, got {scale}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        heads = [heads] * len(depths) if isinstance(heads, int) else list(heads)
        if len(heads) != len(depths):
            raise ValueError("heads needs one entry per residual group (or one number for all)")
        self.scale = scale
        self.in_channels = in_chans
        self.pad_multiple = window_size
        self.shallow = nn.Conv2d(in_chans, dim, 3, padding=1)
        self.groups = nn.Sequential(*(ResidualGroup(dim, d, h, window_size) for d, h in zip(depths, heads)))
        self.body_conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.reconstruct = nn.Conv2d(dim, in_chans * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        # Start as plain interpolation (identity for scale 1): the body learns a correction.
        nn.init.zeros_(self.reconstruct.weight)
        nn.init.zeros_(self.reconstruct.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.shallow(x)
        features = features + self.body_conv(self.groups(features))
        residual = self.shuffle(self.reconstruct(features))
        if self.scale > 1:
            base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        else:
            base = x
        out = base + residual
        return out if self.training else out.clamp(0.0, 1.0)

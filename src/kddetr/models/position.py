"""Sine positional encodings: of the image grid (DETR, with H/W temperatures) and of anchor boxes (DAB-DETR)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sine_features(coord: Tensor, num_feats: int, temperature: float) -> Tensor:
    """`[...] -> [..., num_feats]`: sin/cos pairs interleaved, frequencies `temperature ** (-2i / num_feats)`."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coord.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = coord[..., None].float() / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Normalised sine encoding of the unpadded image grid: `mask [B, H, W]` (True = padding) -> `[B, 2F, H, W]`.

    Coordinates are cumulative counts of valid pixels scaled to (0, 2π]; channels are (y features, x features).
    """

    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 20.0, temperature_w: float = 20.0,
                 scale: float = 2 * math.pi, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.scale = scale
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        y = y / (y[:, -1:, :] + self.eps) * self.scale
        x = x / (x[:, :, -1:] + self.eps) * self.scale
        pos_y = sine_features(y, self.num_pos_feats, self.temperature_h)
        pos_x = sine_features(x, self.num_pos_feats, self.temperature_w)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def anchor_sine_embedding(anchors: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Anchors `[..., 2 | 4]` (cx, cy[, w, h] in [0, 1]) -> `[..., n * dim / 2]`, ordered (y, x[, w, h]) as DAB-DETR."""
    parts = [sine_features(c * (2 * math.pi), dim // 2, temperature) for c in anchors.unbind(-1)]
    parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1).to(anchors.dtype)

"""Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159) in pure PyTorch via `grid_sample`."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shapes = Sequence[tuple[int, int]]  # (height, width) of every level, in the flattening order


def deformable_sample(value: Tensor, shapes: Shapes, locations: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of bilinear samples of every level's values.

    `value [B, S, H, d]` (levels flattened row-major one after the other), `locations [B, Q, H, L, P, 2]`
    (x, y in [0, 1] of each level's map; outside reads zeros), `weights [B, Q, H, L, P]` -> `[B, Q, H * d]`.
    A sample at (x, y) reads the map at pixel (x * w - 0.5, y * h - 0.5): pixel centres sit at (i + 0.5) / w.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample's [-1, 1] with align_corners=False
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    out: Optional[Tensor] = None
    # Summed level by level: no [B * H, d, Q, L * P] stack of every sample (1.5x faster on CPU than stacking)
    for level, ((h, w), level_value) in enumerate(zip(shapes, value.split([h * w for h, w in shapes], dim=1))):
        maps = level_value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B * H, Q, P, 2]
        samples = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        part = (samples * weights[..., level, :]).sum(-1)  # [B * H, d, Q]
        out = part if out is None else out + part
    return out.view(batch, heads * head_dim, queries).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Each query attends to `num_points` learned offsets around its reference point on every level, per head.

    Reference points `[B, Q, L, 2]` (x, y) put offsets in units of each level's cells; `[B, Q, L, 4]` boxes
    (cx, cy, w, h) scale them by half the box size / `num_points`. Coordinates are in [0, 1] of the levels.
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: head k starts at points 1..P cells along direction 2πk / H, uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)[:, None]
        grid = directions[:, None, None] * steps  # [H, 1, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.num_levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, shapes: Shapes,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """`query [B, Q, D]` (positions already added), `value [B, S, D]`, `padding_mask [B, S]` True = padding."""
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.unflatten(-1, (heads, -1))
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points).softmax(-1)
        ref = reference_points[:, :, None, :, None]  # [B, Q, 1, L, 1, 2 | 4]
        if reference_points.shape[-1] == 2:
            cells = torch.tensor([(w, h) for h, w in shapes], dtype=query.dtype, device=query.device)
            locations = ref + offsets / cells[:, None]
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference points must have 2 or 4 coordinates, got {reference_points.shape[-1]}")
        out = deformable_sample(value, shapes, locations, weights.view(batch, num_queries, heads, levels, points))
        return self.output_proj(out)

"""Multi-scale deformable attention against a naive per-point bilinear sampling loop."""
from __future__ import annotations

import math

import pytest
import torch

from kddetr.models.ms_deform_attn import MSDeformAttn, deformable_sample

SHAPES = [(3, 5), (2, 2)]


def bilinear(level: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """`level [d, h, w]` read at (x, y) in [0, 1] of the map, pixel centres at (i + 0.5) / w, zeros outside."""
    _, h, w = level.shape
    px, py = x * w - 0.5, y * h - 0.5
    out = torch.zeros(level.shape[0], dtype=level.dtype)
    for j in (math.floor(py), math.floor(py) + 1):
        for i in (math.floor(px), math.floor(px) + 1):
            if 0 <= i < w and 0 <= j < h:
                out += (1 - abs(px - i)) * (1 - abs(py - j)) * level[:, j, i]
    return out


def naive_sample(value: torch.Tensor, shapes, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    maps = [v.permute(0, 2, 3, 1).unflatten(-1, s) for v, s in zip(value.split([h * w for h, w in shapes], 1), shapes)]
    out = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for k in range(heads):
                for l in range(levels):
                    for p in range(points):
                        x, y = locations[b, q, k, l, p].tolist()
                        out[b, q, k] += weights[b, q, k, l, p] * bilinear(maps[l][b, k], x, y)
    return out.flatten(2)


def test_grid_sample_matches_naive_bilinear_sampling() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, queries, heads, head_dim, points = 2, 3, 2, 4, 3
    value = torch.randn(batch, sum(h * w for h, w in SHAPES), heads, head_dim, generator=gen, dtype=torch.float64)
    # some points fall outside the map ([-0.2, 1.2]) to exercise the zero padding
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=gen, dtype=torch.float64)
    locations = locations * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=gen, dtype=torch.float64)
    fast = deformable_sample(value, SHAPES, locations, weights)
    assert fast.shape == (batch, queries, heads * head_dim)
    torch.testing.assert_close(fast, naive_sample(value, SHAPES, locations, weights), atol=1e-10, rtol=0)


def test_pixel_centres_read_exact_values() -> None:
    value = torch.arange(15.0).view(1, 15, 1, 1)  # one 3 x 5 level
    locations = torch.tensor([[(i + 0.5) / 5, (j + 0.5) / 3] for j in range(3) for i in range(5)])
    out = deformable_sample(value, [(3, 5)], locations.view(1, 15, 1, 1, 1, 2), torch.ones(1, 15, 1, 1, 1))
    torch.testing.assert_close(out.flatten(), torch.arange(15.0))


@pytest.mark.parametrize("coords", [2, 4])
def test_module_offsets_follow_the_reference_and_mask_padding(coords: int) -> None:
    torch.manual_seed(0)
    dim, heads, points = 16, 2, 2
    attn = MSDeformAttn(dim, heads, len(SHAPES), points).double()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(attn.attention_weights.weight)
    seq = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, 4, dim, dtype=torch.float64), torch.randn(2, seq, dim, dtype=torch.float64)
    ref = torch.rand(2, 4, len(SHAPES), coords, dtype=torch.float64) * 0.8 + 0.1
    padding = torch.zeros(2, seq, dtype=torch.bool)
    padding[1, -4:] = True  # the whole second level of image 1
    out = attn(query, ref, value, SHAPES, padding)

    offsets = attn.sampling_offsets(query).view(2, 4, heads, len(SHAPES), points, 2)
    if coords == 2:
        cells = torch.tensor([(w, h) for h, w in SHAPES], dtype=torch.float64)
        locations = ref[:, :, None, :, None] + offsets / cells[:, None]
    else:
        locations = ref[:, :, None, :, None, :2] + offsets * ref[:, :, None, :, None, 2:] / (2 * points)
    weights = attn.attention_weights(query).view(2, 4, heads, -1).softmax(-1).view(2, 4, heads, len(SHAPES), points)
    projected = attn.value_proj(value).masked_fill(padding[..., None], 0).unflatten(-1, (heads, -1))
    expected = attn.output_proj(naive_sample(projected, SHAPES, locations, weights))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)

    changed = value.clone()
    changed[1, -4:] += 100  # padded values do not matter
    torch.testing.assert_close(attn(query, ref, changed, SHAPES, padding), out, atol=1e-10, rtol=0)


def test_initial_sampling_pattern() -> None:
    attn = MSDeformAttn(32, 4, 2, 3)
    offsets = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    torch.testing.assert_close(offsets[0, 0], torch.tensor([[1.0, 0], [2, 0], [3, 0]]))  # head 0 looks right
    torch.testing.assert_close(offsets[1, 1], torch.tensor([[0.0, 1], [0, 2], [0, 3]]), atol=1e-6, rtol=0)  # 1: down
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()

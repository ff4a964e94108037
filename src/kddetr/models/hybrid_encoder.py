"""RT-DETR's hybrid encoder: attention within the coarsest level(s) (AIFI), then a CSP-RepVGG FPN and PAN (CCFM)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kddetr.errors import UserError
from kddetr.models.layers import build_activation
from kddetr.models.transformer import EncoderLayer


class ConvNormLayer(nn.Module):
    """A bias-free convolution ("same" padding for odd kernels), a batch norm and an optional activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 activation: Optional[str] = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.Identity() if activation is None else build_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.norm(self.conv(x)))


class RepVggBlock(nn.Module):
    """A 3x3 and a 1x1 convolution branch summed, then the activation (RepVGG before re-parameterisation)."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 3)
        self.conv2 = ConvNormLayer(channels, channels, 1)
        self.activation = build_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """Cross-stage-partial fusion of two concatenated maps: a 1x1 branch through RepVGG blocks plus a plain 1x1
    branch, summed, then a 1x1 to `out_channels` when the branches are narrower (`expansion` < 1)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, expansion: float, activation: str) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, activation=activation)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, activation=activation)
        self.bottlenecks = nn.Sequential(*(RepVggBlock(hidden, activation) for _ in range(num_blocks)))
        self.conv3 = ConvNormLayer(hidden, out_channels, 1, activation=activation) if hidden != out_channels \
            else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


def grid_sincos(height: int, width: int, dim: int, temperature: float, device: torch.device) -> Tensor:
    """RT-DETR's 2-D sine-cosine embedding of a grid's cells, row-major: `[h * w, dim]`, laid out as
    (sin, cos) of the row index then (sin, cos) of the column index, frequencies `temperature ** (-i / (dim / 4))`
    (computed in float64, as the reference)."""
    if dim % 4:
        raise ValueError(f"the AIFI position embedding needs a dimension divisible by 4, got {dim}")
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device),
                                torch.arange(width, dtype=torch.float64, device=device), indexing="ij")
    rows, cols = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega
    return torch.cat((rows.sin(), rows.cos(), cols.sin(), cols.cos()), 1).float()


class HybridEncoder(nn.Module):
    """Projected backbone levels `[B, D, h_i, w_i]` (finest first) -> as many fused levels of width D.

    AIFI: transformer encoder layers (post-norm unless `pre_norm`, sine-cosine positions on queries and keys)
    over the cells of each level in `aifi_levels`. CCFM: a top-down pass (1x1 lateral convolution of the coarser
    map, nearest 2x upsampling to the finer map's size, concatenation with the finer level, a CSP-RepVGG block),
    then a bottom-up pass (3x3 stride-2 convolution, concatenation with the top-down map of the next level, a
    CSP-RepVGG block).
    Padding is not masked, as in RT-DETR (its images are resized to one size).
    """

    def __init__(self, dim: int, num_levels: int, aifi_levels: Sequence[int], num_layers: int, num_heads: int,
                 ffn_dim: int, dropout: float, aifi_activation: str, pre_norm: bool, csp_blocks: int,
                 expansion: float, activation: str, temperature: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.temperature = dim, temperature
        if any(not -num_levels <= level < num_levels for level in aifi_levels):
            raise UserError(f"model.rt_detr.aifi_levels: {list(aifi_levels)} are not all among the encoder's "
                            f"{num_levels} levels (0..{num_levels - 1}, or negative from the coarsest)")
        self.aifi_levels = [level % num_levels for level in aifi_levels]
        self.aifi = nn.ModuleList(
            nn.ModuleList(EncoderLayer(dim, num_heads, ffn_dim, dropout, aifi_activation, pre_norm)
                          for _ in range(num_layers)) for _ in self.aifi_levels)
        stages = num_levels - 1

        def csp() -> CSPRepLayer:
            return CSPRepLayer(2 * dim, dim, csp_blocks, expansion, activation)

        self.lateral_convs = nn.ModuleList(ConvNormLayer(dim, dim, 1, activation=activation) for _ in range(stages))
        self.fpn_blocks = nn.ModuleList(csp() for _ in range(stages))
        self.downsample_convs = nn.ModuleList(ConvNormLayer(dim, dim, 3, 2, activation) for _ in range(stages))
        self.pan_blocks = nn.ModuleList(csp() for _ in range(stages))

    def _intra_scale(self, x: Tensor, layers: nn.ModuleList) -> Tensor:
        """AIFI: self-attention among the cells of one level."""
        batch, dim, h, w = x.shape
        pos = grid_sincos(h, w, dim, self.temperature, x.device).to(x.dtype)[None]
        tokens = x.flatten(2).transpose(1, 2)
        for layer in layers:
            tokens = layer(tokens, pos, None)
        return tokens.transpose(1, 2).reshape(batch, dim, h, w)

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        levels = list(levels)
        for level, layers in zip(self.aifi_levels, self.aifi):
            if len(layers):
                levels[level] = self._intra_scale(levels[level], layers)
        top_down = [levels[-1]]  # coarsest first
        for i, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            coarser = lateral(top_down[-1])
            top_down[-1] = coarser  # the PAN reads the laterally projected map
            finer = levels[-2 - i]  # nearest upsampling to its size: 2x, as RT-DETR, where the image divides
            upsampled = F.interpolate(coarser, size=finer.shape[-2:], mode="nearest")
            top_down.append(block(torch.cat((upsampled, finer), 1)))
        top_down.reverse()  # finest first
        outputs = [top_down[0]]
        for i, (down, block) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            outputs.append(block(torch.cat((down(outputs[-1]), top_down[i + 1]), 1)))
        return outputs

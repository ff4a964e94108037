"""Small building blocks of the DETR variants: MLP, inverse sigmoid, activations, attention over projected heads."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (DETR's box head and DAB's small heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both odds terms to at least `eps`, as in Deformable/DAB-DETR."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def conv_layout(images: Tensor, channels_last: bool) -> Tensor:
    """Images in the memory format the backbone convolutions run fastest in (channels-last: ~20% on CPU)."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def build_activation(name: str) -> nn.Module:
    """`relu`, `prelu` (one learned slope, DAB-DETR's default), `gelu` or `silu` (RT-DETR's convolutions)."""
    activations = {"relu": nn.ReLU, "prelu": nn.PReLU, "gelu": nn.GELU, "silu": nn.SiLU}
    if name not in activations:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(activations)}")
    return activations[name]()


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """`[B, N, H * d] -> [B, H, N, d]`."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


class HeadAttention(nn.Module):
    """Scaled dot-product attention over per-head queries, keys and values that the caller has projected.

    Conditional/DAB-DETR build queries and keys from separate content and positional projections
    (concatenated per head in cross-attention), so only the output projection lives here.
    `mask` is boolean, broadcastable to `[B, H, N, S]`, True where attention is allowed. Values narrower
    than queries and keys (DAB-DETR's cross-attention) are zero-padded so that the fused kernels run.
    """

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        p = self.dropout if self.training else 0.0
        value_dim = v.shape[-1]
        if q.shape[-1] > value_dim:  # fused kernels want one head size; zero value channels add nothing
            v = F.pad(v, (0, q.shape[-1] - value_dim))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)[..., :value_dim]
        return self.out_proj(out.transpose(1, 2).flatten(2))


def residual(x: Tensor, sublayer: Callable[[Tensor], Tensor], norm: nn.Module, dropout: nn.Module,
             pre_norm: bool) -> Tensor:
    """A residual sublayer, post-norm (`norm(x + f(x))`, DETR/DAB default) or pre-norm (`x + f(norm(x))`)."""
    if pre_norm:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))

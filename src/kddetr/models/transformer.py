"""The DAB-DETR transformer: encoder with content-scaled positions, decoder with anchor-conditioned queries."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from kddetr.models.layers import MLP, HeadAttention, build_activation, inverse_sigmoid, residual, split_heads
from kddetr.models.position import anchor_sine_embedding


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.activation = build_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention (positions added to queries and keys) and a feed-forward block."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, activation: str,
                 pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        def attend(x: Tensor) -> Tensor:
            return self.self_attn(x + pos, x + pos, x, key_padding_mask=padding_mask, need_weights=False)[0]

        src = residual(src, attend, self.norm1, self.dropout, self.pre_norm)
        return residual(src, self.ffn, self.norm2, self.dropout, self.pre_norm)


class Encoder(nn.Module):
    """DAB-DETR's encoder: each layer's positional embedding is scaled element-wise by an MLP of the content."""

    def __init__(self, layers: list[EncoderLayer], dim: int, final_norm: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.query_scale = MLP(dim, dim, dim, 2)
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src), padding_mask)
        return self.norm(src)


class DecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, feed-forward.

    Queries and keys are sums of separate content and positional projections. In cross-attention each
    head's query is [content; anchor sine embedding] and each key [content; image position], so content
    and position are matched separately (Conditional DETR). Only the first layer also adds the anchor's
    positional query to the content query (DAB-DETR with keep_query_pos off).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, activation: str,
                 pre_norm: bool, is_first: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.sa_qcontent_proj, self.sa_qpos_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.sa_kcontent_proj, self.sa_kpos_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.sa_v_proj = nn.Linear(dim, dim)
        self.self_attn = HeadAttention(dim, dropout)
        self.ca_qcontent_proj = nn.Linear(dim, dim)
        self.ca_qpos_proj = nn.Linear(dim, dim) if is_first else None
        self.ca_qpos_sine_proj = nn.Linear(dim, dim)
        self.ca_kcontent_proj, self.ca_kpos_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.ca_v_proj = nn.Linear(dim, dim)
        self.cross_attn = HeadAttention(dim, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, query_sine: Tensor,
                self_attn_mask: Optional[Tensor], memory_mask: Tensor) -> Tensor:
        h = self.num_heads

        def self_attention(x: Tensor) -> Tensor:
            q = split_heads(self.sa_qcontent_proj(x) + self.sa_qpos_proj(query_pos), h)
            k = split_heads(self.sa_kcontent_proj(x) + self.sa_kpos_proj(query_pos), h)
            return self.self_attn(q, k, split_heads(self.sa_v_proj(x), h), self_attn_mask)

        def cross_attention(x: Tensor) -> Tensor:
            q, k, k_pos = self.ca_qcontent_proj(x), self.ca_kcontent_proj(memory), self.ca_kpos_proj(pos)
            if self.ca_qpos_proj is not None:
                q, k = q + self.ca_qpos_proj(query_pos), k + k_pos
            q = torch.cat((split_heads(q, h), split_heads(self.ca_qpos_sine_proj(query_sine), h)), dim=-1)
            k = torch.cat((split_heads(k, h), split_heads(k_pos, h)), dim=-1)
            return self.cross_attn(q, k, split_heads(self.ca_v_proj(memory), h), memory_mask)

        tgt = residual(tgt, self_attention, self.norm1, self.dropout, self.pre_norm)
        tgt = residual(tgt, cross_attention, self.norm2, self.dropout, self.pre_norm)
        return residual(tgt, self.ffn, self.norm3, self.dropout, self.pre_norm)


class Decoder(nn.Module):
    """DAB-DETR's decoder: 4-D anchors give each layer its positional queries and are refined layer by layer."""

    def __init__(self, layers: list[DecoderLayer], dim: int, modulate_hw_attn: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)
        self.query_scale = MLP(dim, dim, dim, 2)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.ref_anchor_head = MLP(dim, dim, 2, 2) if modulate_hw_attn else None

    def forward(self, tgt: Tensor, anchors: Tensor, memory: Tensor, pos: Tensor, memory_mask: Tensor,
                bbox_embed: Callable[[Tensor], Tensor], self_attn_mask: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor]:
        """`tgt [B, Q, D]` content, `anchors [B, Q, 4]` in [0, 1]; masks are boolean, True = may attend.

        Returns every layer's normalised output `[L, B, Q, D]` and input anchors `[L, B, Q, 4]`. Each
        layer refines its anchors with `bbox_embed`; the next layer gets them detached, while the
        anchors returned keep their gradient to the layer that made them (as in DAB-DETR).
        """
        dim = tgt.shape[-1]
        hidden, inputs = [], [anchors]
        for i, layer in enumerate(self.layers):
            sine = anchor_sine_embedding(anchors, dim)
            query_pos = self.ref_point_head(sine)
            query_sine = sine[..., :dim]  # the (y, x) part; from layer 2 on scaled by the content
            if i > 0:
                query_sine = query_sine * self.query_scale(tgt)
            if self.ref_anchor_head is not None:  # sharpen/flatten the x and y attention by w_ref / w, h_ref / h
                wh_ref = self.ref_anchor_head(tgt).sigmoid()
                y_part, x_part = query_sine.split(dim // 2, dim=-1)
                query_sine = torch.cat((y_part * (wh_ref[..., 1] / anchors[..., 3]).unsqueeze(-1),
                                        x_part * (wh_ref[..., 0] / anchors[..., 2]).unsqueeze(-1)), dim=-1)
            tgt = layer(tgt, memory, pos, query_pos, query_sine, self_attn_mask, memory_mask)
            refined = (bbox_embed(tgt) + inverse_sigmoid(anchors)).sigmoid()
            hidden.append(self.norm(tgt))
            if i < len(self.layers) - 1:
                inputs.append(refined)
            anchors = refined.detach()
        return torch.stack(hidden), torch.stack(inputs)

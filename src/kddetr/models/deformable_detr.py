"""Deformable DETR: multi-scale deformable encoder/decoder, box refinement and two-stage (arXiv 2010.04159)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kddetr.config import ModelConfig
from kddetr.errors import UserError
from kddetr.models.backbone import Backbone
from kddetr.models.layers import MLP, conv_layout, inverse_sigmoid, residual
from kddetr.models.ms_deform_attn import MSDeformAttn, Shapes
from kddetr.models.position import sine_features
from kddetr.models.protocol import (ClassSlots, DecoderOutput, DetectorOutput, ImageBatch, Queries,
                                    class_slots_by_prefix)
from kddetr.models.query_groups import decode_groups
from kddetr.models.transformer import FeedForward

NOMINAL_SIZE = 0.1  # w = h of the anchors that stand for one-stage queries, which have only a centre


@dataclass
class DeformableOptions:
    """`model.deformable_detr`: Deformable DETR's own options."""

    num_points: int = 4  # sampling points per attention head and feature level
    # learning-rate multiplier of the sampling offsets and reference-point projections (the reference's
    # lr_linear_proj_mult)
    lr_linear_proj_mult: float = 0.1
    box_refine: bool = False  # iterative box refinement: every decoder layer its own heads
    two_stage: bool = False  # the top num_queries encoder proposals become the decoder queries (needs box_refine)


@dataclass
class DeformableMemory:
    """What `encode` returns: the flattened multi-scale encoder output and what decoding needs besides."""

    memory: Tensor  # [B, S, D], levels flattened one after the other
    mask: Tensor  # [B, S], True = padding
    shapes: list[tuple[int, int]]  # (h, w) per level
    valid_ratios: Tensor  # [B, L, 2]: (w, h) fraction of each level covered by the image
    # two-stage: the proposals the encoder loss trains, [1, B, N, C] and [1, B, N, 4] (every cell; DINO: the selected)
    proposals: Optional[DecoderOutput] = None
    selected: Optional[Tensor] = None  # two-stage: the top `num_queries` proposal boxes [B, K, 4], detached


def image_position(mask: Tensor, num_feats: int) -> Tensor:
    """Deformable DETR's sine encoding of cell centres, `(n - 0.5) / N * 2π`, temperature 10000: `[B, h * w, 2F]`."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = (y - 0.5) / (y[:, -1:] + 1e-6) * (2 * math.pi)
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    return torch.cat((sine_features(y, num_feats, 10000.0), sine_features(x, num_feats, 10000.0)), -1).flatten(1, 2)


def box_sine(boxes: Tensor, dim: int) -> Tensor:
    """Boxes `[..., 4]` in [0, 1] -> `[..., 2 * dim]`, (x, y, w, h) order (Deformable DETR's proposal embedding)."""
    return torch.cat([sine_features(c * (2 * math.pi), dim // 2, 10000.0) for c in boxes.unbind(-1)], -1).to(boxes)


def valid_ratio(mask: Tensor) -> Tensor:
    """`[B, h, w]` padding mask -> `[B, 2]` (w, h) fraction of the map that is image."""
    return torch.stack(((~mask[:, 0]).sum(1) / mask.shape[2], (~mask[:, :, 0]).sum(1) / mask.shape[1]), -1)


def _cell_centres(h: int, w: int, device: torch.device) -> Tensor:
    """`[h * w, 2]` (x + 0.5, y + 0.5) of a level's cells, row-major."""
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack((x, y), -1).flatten(0, 1).float() + 0.5


def encoder_reference_points(shapes: Shapes, valid_ratios: Tensor) -> Tensor:
    """Every cell's centre, normalised by the image part of its level, seen on every level: `[B, S, L, 2]`."""
    refs = [_cell_centres(h, w, valid_ratios.device) / (valid_ratios[:, None, level] * valid_ratios.new_tensor([w, h]))
            for level, (h, w) in enumerate(shapes)]
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels (positions added to the queries) and a feed-forward block."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, activation: str, levels: int,
                 points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, heads, levels, points)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, shapes: Shapes, padding_mask: Tensor) -> Tensor:
        src = residual(src, lambda x: self.self_attn(x + pos, reference, x, shapes, padding_mask),
                       self.norm1, self.dropout, False)
        return residual(src, self.ffn, self.norm2, self.dropout, False)


class DecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention to the memory, feed-forward (post-norm).

    `points`, `offset_scale` and `method`: the cross-attention's sampling (`MSDeformAttn`; RT-DETRv2 varies them).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, activation: str, levels: int,
                 points: int | Sequence[int], offset_scale: float = 0.5, method: str = "bilinear") -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = MSDeformAttn(dim, heads, levels, points, offset_scale, method)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference: Tensor, memory: DeformableMemory,
                self_attn_mask: Optional[Tensor]) -> Tensor:
        def self_attention(x: Tensor) -> Tensor:
            q = x + query_pos
            return self.self_attn(q, q, x, attn_mask=self_attn_mask, need_weights=False)[0]

        def cross_attention(x: Tensor) -> Tensor:
            return self.cross_attn(x + query_pos, reference, memory.memory, memory.shapes, memory.mask)

        tgt = residual(tgt, self_attention, self.norm1, self.dropout, False)
        tgt = residual(tgt, cross_attention, self.norm2, self.dropout, False)
        return residual(tgt, self.ffn, self.norm3, self.dropout, False)


class DeformableDETR(nn.Module):
    """Backbone levels + extra stride-2 levels, deformable encoder/decoder, sigmoid class and box heads.

    Implements the detector protocol (`models/protocol.py`); detection queries behave exactly as in the
    reference implementation:
    - one-stage: a learned embedding per query, split into a positional part and content; its reference
      point (2-D) is `sigmoid(linear(positional part))`. `learned_queries` returns these centres with a
      nominal w = h = `NOMINAL_SIZE` (this model ignores the size; 4-D students such as DAB-DETR use it)
      and the content.
    - two-stage (needs `box_refine`): every encoder cell proposes a box; the top `num_queries` by the
      first class's score become 4-D reference boxes, and positional part and content both come from a
      projection of the boxes' sine embedding. `learned_queries(batch_size, memory)` returns these per-image
      boxes (the specific distillation points). Every cell's proposal goes out as `encoder_proposals`, which
      the criterion trains class-agnostically (`enc_` terms: every object is class 0), as the reference.
    With `box_refine` every decoder layer has its own heads and refines the (detached) reference boxes;
    otherwise the heads are shared and the reference points stay fixed.

    Extra query groups (distillation points: anchors, optional content) are decoded with the same mapping
    as the detection queries, so that an anchor means the same to teacher and student whatever their
    training and no parameters are added. Two-stage: anchors go through the proposal projection, exactly
    like selected proposals. One-stage: the reference point is the anchor's centre and positional part and
    content are those of the learned query whose reference point is nearest. An MLP from anchors to
    positional queries (DAB-style) was rejected: in a teacher trained without KD it would be untrained.
    """

    class_agnostic_proposals = True  # two-stage: proposals scored by one "object" column, the first

    def __init__(self, cfg: ModelConfig, num_classes: int, num_heads: Optional[int] = None) -> None:
        """`num_heads`: class/box head pairs, when a subclass shares them otherwise (DINO)."""
        super().__init__()
        dim, levels, options = cfg.hidden_dim, cfg.num_feature_levels, cfg.options
        if options.two_stage and not options.box_refine:
            raise UserError("model.deformable_detr.two_stage: needs box_refine: true (as Deformable DETR)")
        if dim % 32:
            raise UserError(f"model.hidden_dim: Deformable DETR's GroupNorm(32) needs a multiple of 32, got {dim}")
        if levels < 1 or options.num_points < 1:
            raise UserError(f"model.num_feature_levels and model.{cfg.arch}.num_points: must be > 0")
        self.num_classes = num_classes
        self.num_decoder_layers = cfg.decoder_layers
        self.num_queries = cfg.num_queries
        self.hidden_dim = dim
        self.box_refine, self.two_stage = options.box_refine, options.two_stage
        self.lr_linear_proj_mult = options.lr_linear_proj_mult
        self.look_forward_twice = False  # DINO: a layer's box refines the previous layer's undetached box
        self.group_isolation = cfg.group_isolation
        self.channels_last = cfg.channels_last

        self.backbone = Backbone.from_config(cfg.backbone)
        self.num_backbone_levels = min(levels, 3, len(self.backbone.stage_channels))
        channels = self.backbone.stage_channels[-self.num_backbone_levels:]
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim))
                                        for c in channels)
        in_channels = channels[-1]
        for _ in range(levels - len(channels)):  # extra levels, each from the one before
            self.input_proj.append(nn.Sequential(nn.Conv2d(in_channels, dim, 3, stride=2, padding=1),
                                                 nn.GroupNorm(32, dim)))
            in_channels = dim
        self.level_embed = nn.Parameter(torch.empty(levels, dim))
        layer_args = (dim, cfg.num_heads, cfg.dim_feedforward, cfg.dropout, cfg.activation, levels, options.num_points)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(cfg.decoder_layers))
        if options.two_stage:
            self.enc_output, self.enc_output_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self._build_queries(cfg)
        num_heads = num_heads or self._num_heads(cfg)
        self.class_embed = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
        self.bbox_embed = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(num_heads))
        self._reset_parameters()

    @staticmethod
    def _num_heads(cfg: ModelConfig) -> int:
        """Class/box head pairs: one per decoder layer with box refinement (two-stage: one more, the last, scores
        the proposals), else one shared."""
        return cfg.decoder_layers + cfg.options.two_stage if cfg.options.box_refine else 1

    def _build_queries(self, cfg: ModelConfig) -> None:
        """The modules that make decoder queries: from proposals (two-stage) or learned embeddings."""
        dim = cfg.hidden_dim
        if cfg.options.two_stage:
            self.pos_trans, self.pos_trans_norm = nn.Linear(2 * dim, 2 * dim), nn.LayerNorm(2 * dim)
        else:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * dim)
            self.reference_points = nn.Linear(dim, 2)

    def _image_position(self, mask: Tensor) -> Tensor:
        """`[B, h * w, D]` positions of a level's cells from its padding mask `[B, h, w]`."""
        return image_position(mask, self.hidden_dim // 2)

    def _xavier_modules(self) -> list[nn.Module]:
        """The modules initialised with Xavier, as the reference does."""
        return [self.encoder, self.decoder] + ([self.enc_output, self.pos_trans] if self.two_stage
                                               else [self.reference_points])

    def _reset_parameters(self) -> None:
        for p in nn.ModuleList(self._xavier_modules()).parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        prior_prob = 0.01  # focal-loss prior
        for head in self.class_embed:
            nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
        for head in self.bbox_embed:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if not self.two_stage:  # first boxes start small (sigmoid(-2) = 0.12); two-stage proposals carry a size
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def _head(self, layer: int) -> tuple[nn.Module, nn.Module]:
        i = layer if self.box_refine else 0
        return self.class_embed[i], self.bbox_embed[i]

    def encode(self, images: ImageBatch) -> DeformableMemory:
        features = self.backbone.forward_levels(conv_layout(images.tensors, self.channels_last), images.mask,
                                                self.num_backbone_levels)
        sources = [proj(f) for proj, (f, _) in zip(self.input_proj, features)]
        masks = [m for _, m in features]
        x = features[-1][0]
        for proj in self.input_proj[len(features):]:  # extra levels: stride-2 convolutions on the coarsest
            x = proj(x)
            sources.append(x)
            masks.append(F.interpolate(images.mask[None].float(), size=x.shape[-2:])[0].bool())
        shapes = [(s.shape[2], s.shape[3]) for s in sources]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in sources], 1)
        pos = torch.cat([self._image_position(m) + e for m, e in zip(masks, self.level_embed)], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        reference = encoder_reference_points(shapes, valid_ratios)
        pos = pos.to(src.dtype)
        for layer in self.encoder:
            src = layer(src, pos, reference, shapes, mask)
        memory = DeformableMemory(src, mask, shapes, valid_ratios)
        if self.two_stage:
            memory.proposals, memory.selected = self._proposals(memory)
        return memory

    def _proposals(self, memory: DeformableMemory) -> tuple[DecoderOutput, Tensor]:
        """Two-stage: every cell's proposal and the top `num_queries` boxes (detached)."""
        logits, coords, _ = self._proposal_outputs(memory)
        # The reference ranks by the first class only (a binary foreground score when trained as in its code).
        top = logits[..., 0].topk(self.num_queries, dim=1).indices
        selected = coords.gather(1, top[..., None].expand(-1, -1, 4)).detach().sigmoid()
        return DecoderOutput(logits[None], coords.sigmoid()[None]), selected

    def _proposal_outputs(self, memory: DeformableMemory) -> tuple[Tensor, Tensor, Tensor]:
        """A box per encoder cell (centred on it, 0.05 * 2^level wide) refined by the last heads.

        Returns logits `[B, S, C]`, boxes before the sigmoid `[B, S, 4]` (inf where invalid) and `valid [B, S]`.
        """
        batch = memory.memory.shape[0]
        boxes = []
        masks = memory.mask.split([h * w for h, w in memory.shapes], 1)
        for level, ((h, w), mask) in enumerate(zip(memory.shapes, masks)):
            mask = mask.view(batch, h, w)
            valid_wh = torch.stack(((~mask[:, 0]).sum(1), (~mask[:, :, 0]).sum(1)), -1)[:, None]
            centres = _cell_centres(h, w, mask.device) / valid_wh
            boxes.append(torch.cat((centres, torch.full_like(centres, 0.05 * 2 ** level)), -1))
        boxes = torch.cat(boxes, 1)
        valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True) & ~memory.mask[..., None]
        anchors = torch.log(boxes / (1 - boxes)).masked_fill(~valid, float("inf"))
        features = self.enc_output_norm(self.enc_output(memory.memory.masked_fill(~valid, 0.0)))
        class_head, box_head = self._head(self.num_decoder_layers)
        return class_head(features), box_head(features) + anchors, valid[..., 0]

    def lr_multipliers(self) -> dict[str, float]:
        """The sampling offsets and reference-point projections learn at `lr_linear_proj_mult` x the rate, as in
        the reference (a box that moves its sampling points too fast destabilises early training)."""
        return {"sampling_offsets": self.lr_linear_proj_mult, "reference_points": self.lr_linear_proj_mult}

    def class_slots(self) -> dict[str, ClassSlots]:
        """Every layer's class head (two-stage: the proposal scorer too) and DINO's denoising label embedding."""
        return class_slots_by_prefix(self, ("class_embed.", "denoising.label_embed."))

    def learned_queries(self, batch_size: int, memory: Optional[DeformableMemory] = None) -> Queries:
        """The detection queries: per-image proposals (two-stage, needs `memory`) or the learned ones."""
        if self.two_stage:
            if memory is None:
                raise ValueError("two-stage Deformable DETR selects its queries per image: pass `memory`")
            return Queries(memory.selected)
        pos, content = self.query_embed.weight.split(self.hidden_dim, -1)
        centres = self.reference_points(pos).sigmoid()
        anchors = torch.cat((centres, torch.full_like(centres, NOMINAL_SIZE)), -1)
        return Queries(anchors.expand(batch_size, -1, -1), content.expand(batch_size, -1, -1))

    def _inputs(self, memory: DeformableMemory, queries: Optional[Queries]) -> tuple[Tensor, Tensor, Tensor]:
        """Content `[B, K, D]`, positional query `[B, K, D]` and reference points `[B, K, 2 | 4]` of a group."""
        batch = memory.memory.shape[0]
        if self.two_stage:
            reference = memory.selected if queries is None else queries.anchors.expand(batch, -1, -1)
            pos, content = self.pos_trans_norm(self.pos_trans(box_sine(reference, self.hidden_dim))).split(
                self.hidden_dim, -1)
        else:
            learned_pos, learned_content = self.query_embed.weight.split(self.hidden_dim, -1)
            learned_centres = self.reference_points(learned_pos).sigmoid()
            if queries is None:
                pos, content, reference = learned_pos, learned_content, learned_centres
            else:
                reference = queries.anchors[..., :2]
                nearest = torch.cdist(reference.detach().float(), learned_centres.detach().float()).argmin(-1)
                pos, content = learned_pos[nearest], learned_content[nearest]
            pos, content, reference = (t.expand(batch, -1, -1) for t in (pos, content, reference))
        if queries is not None and queries.content is not None:
            content = queries.content.expand(batch, -1, -1)
        return content, pos, reference

    def _decode(self, content: Tensor, pos: Tensor, reference: Tensor, memory: DeformableMemory,
                self_attn_mask: Optional[Tensor]) -> DecoderOutput:
        if self_attn_mask is not None and self_attn_mask.dim() == 3:  # per image -> per image and head
            self_attn_mask = self_attn_mask.repeat_interleave(self.decoder[0].self_attn.num_heads, dim=0)
        ratios = memory.valid_ratios[:, None]
        tgt, logits, boxes = content, [], []
        refined = reference  # the box a layer's delta applies to; look-forward-twice keeps its gradient
        for i, layer in enumerate(self.decoder):
            scale = ratios if reference.shape[-1] == 2 else torch.cat((ratios, ratios), -1)
            scaled = reference[:, :, None] * scale
            tgt = layer(tgt, self._query_pos(pos, scaled), scaled, memory, self_attn_mask)
            class_head, box_head = self._head(i)
            out = self._output_norm(tgt)  # what the heads read (DINO: normalised); the references follow `tgt`
            delta = box_head(out)
            if reference.shape[-1] == 4:
                box = (delta + inverse_sigmoid(refined)).sigmoid()
            else:  # a 2-D reference point places the centre only
                box = torch.cat((delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]), -1).sigmoid()
            logits.append(class_head(out))
            boxes.append(box)
            if self.box_refine and self.look_forward_twice:
                # the next box builds on this layer's reference with gradient to this layer's delta only
                step = delta if out is tgt else box_head(tgt)
                refined = (step + inverse_sigmoid(reference)).sigmoid()
                reference = refined.detach()
            elif self.box_refine:
                refined = reference = box.detach()
        return DecoderOutput(torch.stack(logits), torch.stack(boxes))

    def _output_norm(self, tgt: Tensor) -> Tensor:
        """A decoder layer's output as the heads read it: as it is (DINO: through a final LayerNorm)."""
        return tgt

    def _query_pos(self, pos: Tensor, reference: Tensor) -> Tensor:
        """A decoder layer's positional query given its reference `[B, K, L, 2 | 4]`: fixed (DINO: from the box)."""
        return pos

    def decode(self, memory: DeformableMemory, queries: Optional[Queries] = None,
               self_attn_mask: Optional[Tensor] = None) -> DecoderOutput:
        """Decode one set of queries (None: the detection queries) over `memory`.

        `self_attn_mask`: boolean `[K, K]` or `[B, K, K]`, True = query i may not attend to j.
        """
        return self._decode(*self._inputs(memory, queries), memory, self_attn_mask)

    def decode_groups(self, memory: DeformableMemory, groups: Sequence[Optional[Queries]]) -> list[DecoderOutput]:
        """Decode query groups isolated from each other (`group_isolation`: see `query_groups.decode_groups`)."""
        return decode_groups([self._inputs(memory, group) for group in groups], memory, self._decode,
                             self.group_isolation)

    def forward(self, images: ImageBatch, targets: Optional[list[dict[str, Tensor]]] = None,
                extra_queries: Optional[list[Queries]] = None) -> DetectorOutput:
        memory = self.encode(images)
        detections, *extra = self.decode_groups(memory, [None, *(extra_queries or [])])
        return DetectorOutput(logits=detections.logits, boxes=detections.boxes, extra=extra,
                              encoder_memory=memory.memory, encoder_proposals=self._encoder_proposals(memory),
                              encoder_class_agnostic=self.class_agnostic_proposals)

    def _encoder_proposals(self, memory: DeformableMemory) -> Optional[DecoderOutput]:
        """What the encoder loss trains: every cell's proposal, class-agnostic (ranked by the first class)."""
        return memory.proposals

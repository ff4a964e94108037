"""DAB-DETR: DETR with 4-D anchor boxes as decoder queries, refined layer by layer (arXiv 2201.12329)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from kddetr.config import ModelConfig
from kddetr.models.backbone import Backbone
from kddetr.models.denoising import DenoisingGenerator, DenoisingGroups, decode_with_denoising
from kddetr.models.layers import MLP, conv_layout, inverse_sigmoid
from kddetr.models.position import PositionEmbeddingSine
from kddetr.models.protocol import (ClassSlots, DecoderOutput, DetectorOutput, ImageBatch, Queries,
                                    class_slots_by_prefix)
from kddetr.models.query_groups import decode_groups
from kddetr.models.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer


@dataclass
class DABOptions:
    """`model.dab_detr`: DAB-DETR's own options (DN-DAB-DETR with `model.denoising`)."""

    # DAB-DETR `--pre_norm` (official and HF alike): a LayerNorm on the encoder output; layers stay post-norm
    normalize_before: bool = False
    pre_norm_layers: bool = False  # DETR-style pre-norm sublayers (LayerNorm before attention/FFN); not in DAB-DETR
    num_patterns: int = 0
    random_refpoints_xy: bool = False
    modulate_hw_attn: bool = True
    temperature: float = 20.0  # image sine positional encoding temperature, H and W (DAB-DETR pe_temperatureH/W)
    # DN-DAB-DETR's content of the detection queries: a learned "unknown class" embedding (indicator 0) beside
    # the denoising label embeddings; off: zeros, the content every distillation point has (docs/method.md)
    unknown_class_content: bool = False


@dataclass
class EncoderMemory:
    """What `encode` returns: encoder output, padding mask (True = padding) and image positions, flattened."""

    memory: Tensor  # [B, S, D]
    mask: Tensor  # [B, S]
    pos: Tensor  # [B, S, D]


class DABDETR(nn.Module):
    """Backbone, DAB encoder/decoder, a sigmoid class head and one box head shared by all decoder layers.

    Implements the detector protocol (`models/protocol.py`). Decoder queries are anchors `[B, Q, 4]`
    (cx, cy, w, h in [0, 1]) with a content part (zeros unless given or `num_patterns` > 0). Extra
    query groups never see the detection queries nor each other (`group_isolation`: one decoder pass
    per group, one pass under a block-diagonal self-attention mask, or groups stacked along the batch;
    see `query_groups.py`). In training, with
    `denoising.enabled` and targets, DN-DETR denoising groups are decoded beside the detection queries.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        dim, options = cfg.hidden_dim, cfg.options
        self.num_classes = num_classes
        self.num_decoder_layers = cfg.decoder_layers
        self.num_queries = cfg.num_queries
        self.hidden_dim = dim
        self.random_refpoints_xy = options.random_refpoints_xy
        self.group_isolation = cfg.group_isolation
        self.channels_last = cfg.channels_last

        self.backbone = Backbone.from_config(cfg.backbone)
        self.position = PositionEmbeddingSine(dim // 2, options.temperature, options.temperature)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, dim, kernel_size=1)
        layer_args = (dim, cfg.num_heads, cfg.dim_feedforward, cfg.dropout, cfg.activation, options.pre_norm_layers)
        self.encoder = Encoder([EncoderLayer(*layer_args) for _ in range(cfg.encoder_layers)], dim,
                               final_norm=options.normalize_before or options.pre_norm_layers)
        self.decoder = Decoder([DecoderLayer(*layer_args, is_first=i == 0) for i in range(cfg.decoder_layers)],
                               dim, options.modulate_hw_attn)
        self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)  # unsigmoided anchors
        self.patterns = nn.Embedding(options.num_patterns, dim) if options.num_patterns > 0 else None
        self.unknown_content = nn.Embedding(1, dim - 1) if options.unknown_class_content else None
        self.class_embed = nn.Linear(dim, num_classes)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self.denoising = DenoisingGenerator(cfg.denoising, num_classes, dim) if cfg.denoising.enabled else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if self.random_refpoints_xy:  # fixed uniform centres (see `_refpoints`)
            with torch.no_grad():
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(torch.rand(self.num_queries, 2))
        prior_prob = 0.01  # focal-loss prior: every class starts at probability 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def _refpoints(self) -> Tensor:
        weight = self.refpoint_embed.weight
        if self.random_refpoints_xy:
            # The official code means to freeze these (`.data[:, :2].requires_grad = False`, a no-op); we do.
            weight = torch.cat((weight[:, :2].detach(), weight[:, 2:]), dim=1)
        return weight

    def lr_multipliers(self) -> dict[str, float]:
        return {}

    def class_slots(self) -> dict[str, ClassSlots]:
        return class_slots_by_prefix(self, ("class_embed.", "denoising.label_embed."))

    def learned_queries(self, batch_size: int, memory: Any = None) -> Queries:
        """The detection queries: sigmoid of the anchor embedding, content None (zeros) unless patterns or the
        unknown-class content."""
        anchors, content = self._refpoints().sigmoid(), None
        if self.patterns is not None:  # every pattern with every anchor, pattern-major
            anchors = anchors.repeat(self.patterns.num_embeddings, 1)
            content = self.patterns.weight.repeat_interleave(self.num_queries, dim=0)
        elif self.unknown_content is not None:  # the same learned vector for every query, indicator 0
            unknown = torch.cat((self.unknown_content.weight, self.unknown_content.weight.new_zeros(1, 1)), dim=1)
            content = unknown.expand(len(anchors), -1)
        if content is not None:
            content = content.unsqueeze(0).expand(batch_size, -1, -1)
        return Queries(anchors.unsqueeze(0).expand(batch_size, -1, -1), content)

    def encode(self, images: ImageBatch) -> EncoderMemory:
        features, mask = self.backbone(conv_layout(images.tensors, self.channels_last), images.mask)
        src = self.input_proj(features).flatten(2).transpose(1, 2)
        pos = self.position(mask).flatten(2).transpose(1, 2).to(src.dtype)
        mask = mask.flatten(1)
        return EncoderMemory(self.encoder(src, pos, mask), mask, pos)

    def _inputs(self, memory: EncoderMemory, queries: Optional[Queries]) -> tuple[Tensor, Tensor]:
        """Content `[B, K, D]` and anchors `[B, K, 4]` of a query group (None: the detection queries)."""
        batch_size = memory.memory.shape[0]
        if queries is None:
            queries = self.learned_queries(batch_size)
        anchors = queries.anchors.expand(batch_size, -1, -1)
        content = queries.content
        if content is None:
            content = memory.memory.new_zeros(batch_size, anchors.shape[1], self.hidden_dim)
        return content.expand(batch_size, -1, -1), anchors

    def _decode(self, content: Tensor, anchors: Tensor, memory: EncoderMemory,
                self_attn_mask: Optional[Tensor]) -> DecoderOutput:
        # The decoder reads anchors in [0, 1] directly: DAB's first step is sigmoid(refpoints), so no logit round trip.
        if self_attn_mask is not None:  # ours: True = blocked; scaled_dot_product_attention: True = allowed
            self_attn_mask = ~(self_attn_mask if self_attn_mask.dim() == 2 else self_attn_mask[:, None])
        memory_mask = ~memory.mask[:, None, None, :]
        hidden, anchors = self.decoder(content, anchors, memory.memory, memory.pos, memory_mask,
                                       self.bbox_embed, self_attn_mask)
        boxes = (self.bbox_embed(hidden) + inverse_sigmoid(anchors)).sigmoid()
        return DecoderOutput(logits=self.class_embed(hidden), boxes=boxes)

    def decode(self, memory: EncoderMemory, queries: Optional[Queries] = None,
               self_attn_mask: Optional[Tensor] = None) -> DecoderOutput:
        """Decode one set of queries (None: the detection queries) over `memory`.

        `self_attn_mask` (boolean `[K, K]` or `[B, K, K]`, True = query i may not attend to j, as in
        `nn.MultiheadAttention`) lets callers decode several groups, e.g. denoising ones, in one pass.
        """
        content, anchors = self._inputs(memory, queries)
        return self._decode(content, anchors, memory, self_attn_mask)

    def decode_groups(self, memory: EncoderMemory, groups: Sequence[Optional[Queries]]) -> list[DecoderOutput]:
        """Decode query groups isolated from each other, one output per group."""
        return decode_groups([self._inputs(memory, group) for group in groups], memory, self._decode,
                             self.group_isolation)

    def decode_with_denoising(self, memory: EncoderMemory, denoising: DenoisingGroups,
                              groups: Sequence[Optional[Queries]]) -> list[DecoderOutput]:
        """`[denoising, *groups]` outputs, the denoising groups beside the detection queries under the DN-DETR mask."""
        inputs = [self._inputs(memory, group) for group in [denoising.queries, *groups]]
        return decode_with_denoising(inputs, denoising, memory, self._decode, self.group_isolation)

    def forward(self, images: ImageBatch, targets: Optional[list[dict[str, Tensor]]] = None,
                extra_queries: Optional[list[Queries]] = None) -> DetectorOutput:
        memory = self.encode(images)
        groups = [None, *(extra_queries or [])]
        if not self.training or self.denoising is None or targets is None:
            detections, *extra = self.decode_groups(memory, groups)
            return DetectorOutput(logits=detections.logits, boxes=detections.boxes, extra=extra,
                                  encoder_memory=memory.memory)
        denoising = self.denoising(targets)
        noised, detections, *extra = self.decode_with_denoising(memory, denoising, groups)
        return DetectorOutput(logits=detections.logits, boxes=detections.boxes, extra=extra, denoising=noised,
                              denoising_meta=denoising.meta, encoder_memory=memory.memory)

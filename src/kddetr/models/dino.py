"""DINO: Deformable DETR with mixed query selection, look-forward-twice and contrastive denoising (arXiv 2203.03605)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from kddetr.config import ModelConfig
from kddetr.models.deformable_detr import DeformableDETR, DeformableMemory, DeformableOptions, box_sine
from kddetr.models.denoising import DenoisedForward, DenoisingGenerator
from kddetr.models.layers import MLP
from kddetr.models.position import PositionEmbeddingSine
from kddetr.models.protocol import DecoderOutput, Queries


@dataclass
class DINOOptions:
    """`model.dino`: DINO's own options (it is always two-stage with box refinement)."""

    num_points: int = 4  # sampling points per attention head and feature level
    # learning-rate multiplier of sampling offsets and reference points: 1, as the reference's default parameter
    # groups (Deformable DETR's 0.1 is not used there)
    lr_linear_proj_mult: float = 1.0
    # as the reference by default: one class head and one box head shared by every decoder layer (the encoder's
    # proposal heads stay separate), and a LayerNorm on each layer's output before the heads
    shared_heads: bool = True
    decoder_norm: bool = True
    LEGACY_KEYS: ClassVar[dict[str, Optional[str]]] = {"dino_shared_heads": "shared_heads",
                                                        "dino_decoder_norm": "decoder_norm",
                                                        "two_stage": None, "box_refine": None}


class DINO(DenoisedForward, DeformableDETR):
    """Two-stage Deformable DETR with box refinement (encoder, decoder layers and heads are its own) plus:

    - mixed query selection: the top `num_queries` encoder proposals by their best class score give every
      image its 4-D anchors (detached); the content queries stay learned (`tgt_embed`, one per slot);
    - anchor-derived positional queries: every decoder layer maps the sine embedding of its current
      reference box through `ref_point_head` (an MLP), as DAB-DETR does;
    - look-forward-twice: layer i's box is its delta applied to layer i-1's box *before* the detach, so
      layer i's box loss also trains layer i-1's box prediction (one layer back, not further); the
      reference the layer attends from stays detached;
    - contrastive denoising (`denoising.enabled`, `denoising.contrastive`): DN groups of positives and
      negatives decoded beside the detection queries under the DN mask (`models/denoising.py`);
    - the encoder loss on the selected proposals (`enc_` terms, the reference's "interm" outputs).

    As the reference's defaults, the decoder layers share one class head and one box head (`shared_heads`;
    the proposal heads are their own) and the heads read each layer's output through a final LayerNorm
    (`decoder_norm`), while the next layer's reference box is refined from the un-normalised output.
    Any anchor group is decoded like the selected proposals: given content is used, else the learned content queries in slot
    order (cycled for larger groups), so decoding `learned_queries(B, memory)` reproduces the detections.
    Distillation groups never see the detection queries, the denoising groups or each other.
    """

    class_agnostic_proposals = False  # selected by their best class score, trained with their classes

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        # shared heads: one pair for every decoder layer, one for the encoder's proposals
        super().__init__(_as_deformable(cfg), num_classes, num_heads=2 if cfg.options.shared_heads else None)
        self.look_forward_twice = True
        self.shared_heads = cfg.options.shared_heads
        self.decoder_norm = nn.LayerNorm(cfg.hidden_dim) if cfg.options.decoder_norm else None
        self.image_position = PositionEmbeddingSine(cfg.hidden_dim // 2, 20.0, 20.0)
        dn = cfg.denoising
        self.denoising = DenoisingGenerator(dn, num_classes, cfg.hidden_dim) if dn.enabled else None

    def _head(self, layer: int) -> tuple[nn.Module, nn.Module]:
        if not self.shared_heads:
            return super()._head(layer)
        i = 1 if layer == self.num_decoder_layers else 0  # the proposal heads are the last pair
        return self.class_embed[i], self.bbox_embed[i]

    def _output_norm(self, tgt: Tensor) -> Tensor:
        return tgt if self.decoder_norm is None else self.decoder_norm(tgt)

    def _build_queries(self, cfg: ModelConfig) -> None:
        self.tgt_embed = nn.Embedding(cfg.num_queries, cfg.hidden_dim)
        self.ref_point_head = MLP(2 * cfg.hidden_dim, cfg.hidden_dim, cfg.hidden_dim, 2)

    def _xavier_modules(self) -> list[nn.Module]:
        return [self.encoder, self.decoder, self.enc_output, self.ref_point_head, self.tgt_embed]

    def _image_position(self, mask: Tensor) -> Tensor:
        """DINO's sine encoding of the image grid: DAB-DETR's (temperature 20, no half-cell offset)."""
        return self.image_position(mask).flatten(2).transpose(1, 2)

    def _proposals(self, memory: DeformableMemory) -> tuple[DecoderOutput, Tensor]:
        """The top `num_queries` valid proposals by best class score: with gradients (for the encoder loss), and
        their boxes detached (the anchors)."""
        logits, coords, valid = self._proposal_outputs(memory)
        top = logits.max(-1).values.masked_fill(~valid, float("-inf")).topk(self.num_queries, dim=1).indices
        logits = logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1]))
        coords = coords.gather(1, top[..., None].expand(-1, -1, 4))
        return DecoderOutput(logits[None], coords.sigmoid()[None]), coords.detach().sigmoid()

    def _inputs(self, memory: DeformableMemory, queries: Optional[Queries]) -> tuple[Tensor, Tensor, Tensor]:
        """Content `[B, K, D]`, an empty positional part (made per layer from the boxes) and anchors `[B, K, 4]`."""
        batch = memory.memory.shape[0]
        anchors = memory.selected if queries is None else queries.anchors.expand(batch, -1, -1)
        if queries is not None and queries.content is not None:
            content = queries.content.expand(batch, -1, -1)
        else:
            slots = torch.arange(anchors.shape[1], device=anchors.device) % self.num_queries
            content = self.tgt_embed(slots).expand(batch, -1, -1)
        return content, anchors.new_zeros(batch, anchors.shape[1], 0), anchors

    def _query_pos(self, pos: Tensor, reference: Tensor) -> Tensor:
        return self.ref_point_head(box_sine(reference[:, :, 0], self.hidden_dim))



def _as_deformable(cfg: ModelConfig) -> ModelConfig:
    """The Deformable DETR that DINO builds on: two-stage with box refinement, DINO's sampling options."""
    options = DeformableOptions(cfg.options.num_points, cfg.options.lr_linear_proj_mult, box_refine=True,
                                two_stage=True)
    return dataclasses.replace(cfg, options=options)

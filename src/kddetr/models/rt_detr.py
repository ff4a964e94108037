"""RT-DETR (arXiv 2304.08069) and RT-DETRv2 (arXiv 2407.17140): hybrid encoder, IoU-aware query selection."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from kddetr.config import DenoisingConfig, ModelConfig, positive
from kddetr.errors import UserError
from kddetr.models.criterion import SetCriterion, build_matcher
from kddetr.models.deformable_detr import DecoderLayer
from kddetr.models.denoising import DenoisedForward, DenoisingGenerator
from kddetr.models.hybrid_encoder import HybridEncoder
from kddetr.models.layers import MLP, conv_layout, inverse_sigmoid
from kddetr.models.ms_deform_attn import MSDeformAttn
from kddetr.models.protocol import (ClassSlots, DecoderOutput, ImageBatch, Queries,
                                    class_slots_by_prefix)
from kddetr.models.query_groups import decode_groups
from kddetr.models.resnet_vd import build_backbone

PRIOR_PROB = 0.01  # initial foreground probability of the class heads (RT-DETR's)


@dataclass
class RTDetrOptions:
    """`model.rt_detr`: RT-DETR's own options. The decoder takes `model.hidden_dim`, `num_heads`,
    `dim_feedforward`, `activation` (relu in RT-DETR) and `num_feature_levels` (3: strides 8, 16, 32; more add
    stride-2 levels); the hybrid encoder's AIFI stacks `model.encoder_layers` layers."""

    version: Literal["v1", "v2"] = "v1"  # v2: per-level sampling points, offset scale, discrete sampling allowed
    resnet_variant: Literal["vd", "plain"] = "vd"  # ResNet-vd as RT-DETR | torchvision's (`model.backbone.weights`)
    encoder_dim: int = 0  # the hybrid encoder's width (0: model.hidden_dim)
    encoder_ffn_dim: int = 0  # AIFI's feed-forward width (0: model.dim_feedforward)
    aifi_levels: list[int] = field(default_factory=lambda: [-1])  # encoder levels with AIFI (-1: the coarsest)
    csp_blocks: int = positive(3)  # RepVGG blocks per CSP fusion (RT-DETR: round(3 * depth multiplier))
    expansion: float = 1.0  # CSP branch width / encoder width
    activation: Literal["silu", "relu", "gelu"] = "silu"  # the fusion convolutions'
    encoder_activation: Literal["gelu", "relu", "silu"] = "gelu"  # AIFI's feed-forward
    pre_norm: bool = False  # AIFI layers normalise before attention and feed-forward
    # decoder sampling points per head: one count for every level, or (v2) one per level
    num_points: list[int] = field(default_factory=lambda: [4])
    decoder_method: Literal["default", "discrete"] = "default"  # v2: bilinear sampling or the nearest cell
    decoder_offset_scale: float = 0.5  # v2: sampling offsets are this fraction of the reference box
    learn_query_content: bool = False  # learned content per query slot instead of the selected memory features
    anchor_size: float = 0.05  # w = h of the level-0 proposal anchors, doubled per level
    # a distillation point's content: "proposal", the projected encoder memory of the cell whose proposal box
    # overlaps the point most (what that cell's detection query would get); "memory", the projected memory at the
    # point's centre, on the level whose anchors fit its size; "zeros": none
    point_content: Literal["zeros", "memory", "proposal"] = "memory"
    # whether a distillation point's losses reach the encoder through the memory its decoder layers read (false:
    # they train the decoder only; the encoder learns from the detection, proposal and denoising losses)
    point_memory_grad: bool = True
    varifocal_alpha: float = 0.75  # the varifocal class loss's weight of negatives, `alpha * p ** gamma`
    varifocal_gamma: float = 2.0


@dataclass
class RTDetrMemory:
    """What `encode` returns: the decoder's flattened levels and the query selection's results."""

    memory: Tensor  # [B, S, D], the decoder's input levels flattened one after the other
    shapes: list[tuple[int, int]]  # (h, w) per level
    projected: Tensor  # [B, S, D]: enc_output(memory), what proposals and query contents are made of
    selected: Tensor  # [B, K, 4] the top proposals' boxes, detached: the detection queries' anchors
    content: Tensor  # [B, K, D] their projected memory, detached: the detection queries' content
    cell_boxes: Tensor  # [B, S, 4] every cell's proposal box, detached (invalid cells: see `valid`)
    valid: Tensor  # [1, S, 1] cells whose anchor lies inside the image (only they are selected)
    proposals: DecoderOutput  # [1, B, K, C] and [1, B, K, 4], with gradients: what the encoder loss trains
    mask: Optional[Tensor] = None  # RT-DETR masks no padding (the decoder layers read this)


def proposal_anchors(shapes: Sequence[tuple[int, int]], size: float, device: torch.device,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Every cell's anchor (its centre, w = h = `size * 2 ** level`) as logits `[1, S, 4]`, and `valid [1, S, 1]`:
    anchors inside (0.01, 0.99) in every coordinate; invalid ones hold the dtype's largest value, as RT-DETR."""
    anchors = []
    for level, (h, w) in enumerate(shapes):
        y, x = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                              indexing="ij")
        centres = torch.stack(((x + 0.5) / w, (y + 0.5) / h), -1).flatten(0, 1)
        anchors.append(torch.cat((centres, torch.full_like(centres, size * 2.0 ** level)), -1))
    boxes = torch.cat(anchors)[None]
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
    logits = torch.where(valid, torch.log(boxes / (1 - boxes)), torch.tensor(torch.finfo(dtype).max, device=device))
    return logits, valid


class RTDetrDenoising(DenoisingGenerator):
    """RT-DETR's contrastive denoising (DINO's noise, `model.denoising` with `contrastive: true`): the content is
    a full-width embedding of the noised label, zero for padding queries (RT-DETR's padding row)."""

    def __init__(self, cfg: DenoisingConfig, num_classes: int, hidden_dim: int) -> None:
        super().__init__(cfg, num_classes, hidden_dim)
        self.label_embed = nn.Embedding(num_classes, hidden_dim)

    def content(self, labels: Tensor, valid: Tensor) -> Tensor:
        return self.label_embed(labels) * valid[..., None].to(self.label_embed.weight.dtype)


class RTDETR(DenoisedForward, nn.Module):
    """ResNet(-vd) levels -> hybrid encoder -> decoder input projections (+ stride-2 levels); every cell proposes
    a box from its anchor; the `num_queries` best by their top class score become the detection queries: their
    boxes (detached) are the anchors, their projected memory (detached) the content (or a learned content per
    slot). `model.decoder_layers` deformable decoder layers refine the boxes, each with its own heads; the
    positional query is an MLP of the current box.

    Implements the detector protocol (`models/protocol.py`). An extra group's anchors are decoded like selected
    proposals; its content, when not given, is the projected memory at each anchor's centre, bilinearly sampled on
    the level whose proposal anchors (`anchor_size * 2 ** level`) are nearest to the anchor's size (geometric
    mean of w and h, in log scale) and detached like the detection queries' (`point_content: memory`); or the
    projected memory of the cell whose proposal box overlaps the anchor most (`proposal`: a selected proposal
    decoded as a point is then its detection query); or zeros.
    `learned_queries(B, memory)` returns the selected boxes with their content: decoding them gives the
    detections. Groups see neither the detection queries, the denoising groups nor each other.

    Training follows the reference: the box a layer outputs applies its delta to the previous layer's box before
    its detach (gradients reach one layer back), while each layer attends from the detached box.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        options, dim = cfg.options, cfg.hidden_dim
        _check(cfg)
        self.num_classes, self.num_decoder_layers, self.num_queries = num_classes, cfg.decoder_layers, cfg.num_queries
        self.hidden_dim, self.anchor_size, self.point_content = dim, options.anchor_size, options.point_content
        self.point_memory_grad = options.point_memory_grad
        self.group_isolation, self.channels_last = cfg.group_isolation, cfg.channels_last
        encoder_dim = options.encoder_dim or dim
        self.backbone = build_backbone(cfg.backbone, options.resnet_variant)
        self.num_encoder_levels = min(cfg.num_feature_levels, 3, len(self.backbone.stage_channels))
        channels = self.backbone.stage_channels[-self.num_encoder_levels:]
        self.encoder_input_proj = nn.ModuleList(_conv_norm(c, encoder_dim, 1) for c in channels)
        self.encoder = HybridEncoder(
            encoder_dim, self.num_encoder_levels, options.aifi_levels, cfg.encoder_layers, cfg.num_heads,
            options.encoder_ffn_dim or cfg.dim_feedforward, cfg.dropout, options.encoder_activation, options.pre_norm,
            options.csp_blocks, options.expansion, options.activation)
        self.decoder_input_proj = nn.ModuleList(_conv_norm(encoder_dim, dim, 1) for _ in channels)
        for level in range(cfg.num_feature_levels - self.num_encoder_levels):  # extra levels, each from the last
            self.decoder_input_proj.append(_conv_norm(encoder_dim if level == 0 else dim, dim, 3, stride=2))
        self.enc_output = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.enc_score_head = nn.Linear(dim, num_classes)
        self.enc_bbox_head = MLP(dim, dim, 4, 3)
        self.query_pos_head = MLP(4, 2 * dim, dim, 2)
        points = options.num_points[0] if len(options.num_points) == 1 else options.num_points
        method = "bilinear" if options.decoder_method == "default" else "discrete"
        self.decoder = nn.ModuleList(
            DecoderLayer(dim, cfg.num_heads, cfg.dim_feedforward, cfg.dropout, cfg.activation, cfg.num_feature_levels,
                         points, options.decoder_offset_scale, method) for _ in range(cfg.decoder_layers))
        self.class_embed = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(cfg.decoder_layers))
        self.bbox_embed = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(cfg.decoder_layers))
        self.query_content = nn.Embedding(cfg.num_queries, dim) if options.learn_query_content else None
        dn = cfg.denoising
        self.denoising = RTDetrDenoising(dn, num_classes, dim) if dn.enabled else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for head in [*self.class_embed, self.enc_score_head]:
            nn.init.constant_(head.bias, bias)
        for head in [*self.bbox_embed, self.enc_bbox_head]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.decoder_input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
        for module in self.decoder.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if self.query_content is not None:
            nn.init.xavier_uniform_(self.query_content.weight)

    def encode(self, images: ImageBatch) -> RTDetrMemory:
        features = self.backbone.forward_levels(conv_layout(images.tensors, self.channels_last), images.mask,
                                                self.num_encoder_levels)
        fused = self.encoder([proj(f) for proj, (f, _) in zip(self.encoder_input_proj, features)])
        sources = [proj(x) for proj, x in zip(self.decoder_input_proj, fused)]
        x = fused[-1]
        for proj in self.decoder_input_proj[len(fused):]:  # extra levels: stride-2 convolutions, each of the last
            x = proj(x)
            sources.append(x)
        shapes = [(s.shape[2], s.shape[3]) for s in sources]
        memory = torch.cat([s.flatten(2).transpose(1, 2) for s in sources], 1)
        anchors, valid = proposal_anchors(shapes, self.anchor_size, memory.device, memory.dtype)
        projected = self.enc_output(valid.to(memory.dtype) * memory)
        logits, coords = self.enc_score_head(projected), self.enc_bbox_head(projected) + anchors
        top = logits.max(-1).values.topk(self.num_queries, dim=1).indices[..., None]  # IoU-aware when trained so

        def gather(t: Tensor) -> Tensor:
            return t.gather(1, top.expand(-1, -1, t.shape[-1]))

        cell_boxes = coords.detach().sigmoid()
        coords = gather(coords)
        return RTDetrMemory(memory, shapes, projected, coords.detach().sigmoid(), gather(projected).detach(),
                            cell_boxes, valid, DecoderOutput(gather(logits)[None], coords.sigmoid()[None]))

    def lr_multipliers(self) -> dict[str, float]:
        """None: RT-DETR trains every parameter outside the backbone at the base rate (the backbone at
        `train.lr_backbone`)."""
        return {}

    def class_slots(self) -> dict[str, ClassSlots]:
        """Every layer's class head, the proposal scorer and the denoising label embedding."""
        return class_slots_by_prefix(self, ("class_embed.", "enc_score_head.", "denoising.label_embed."))

    def learned_queries(self, batch_size: int, memory: Optional[RTDetrMemory] = None) -> Queries:
        """The selected proposals' boxes (the specific distillation points) and the detection queries' content."""
        if memory is None:
            raise ValueError("RT-DETR selects its queries per image: pass `memory`")
        return Queries(memory.selected, self._inputs(memory, None)[0])

    def point_contents(self, memory: RTDetrMemory, anchors: Tensor) -> Tensor:
        """`point_content` of anchors `[B, K, 4]`: `[B, K, D]` (see the class docstring), detached."""
        batch, count, dim = anchors.shape[0], anchors.shape[1], self.hidden_dim
        if self.point_content == "zeros":
            return anchors.new_zeros(batch, count, dim)
        if self.point_content == "proposal":
            overlap = box_iou(anchors.float(), memory.cell_boxes.float(), fmt="cxcywh")  # [B, K, S]
            best = overlap.masked_fill(~memory.valid[..., 0][:, None], -1).argmax(-1)
            return memory.projected.gather(1, best[..., None].expand(-1, -1, dim)).detach()
        grid = (2 * anchors[..., :2] - 1)[:, :, None].to(memory.projected.dtype)  # [B, K, 1, 2]
        samples = []
        for (h, w), level in zip(memory.shapes, memory.projected.split([h * w for h, w in memory.shapes], 1)):
            level_map = level.transpose(1, 2).reshape(batch, dim, h, w)
            samples.append(F.grid_sample(level_map, grid, padding_mode="border", align_corners=False)[..., 0])
        stacked = torch.stack(samples, 1).transpose(2, 3)  # [B, L, K, D]
        size = anchors[..., 2:].prod(-1).clamp(min=1e-12).sqrt()
        level = torch.log2(size / self.anchor_size).round().clamp(0, len(memory.shapes) - 1).long()
        chosen = stacked.gather(1, level[:, None, :, None].expand(-1, -1, -1, dim))[:, 0]
        return chosen.detach()

    def group_memory(self, memory: RTDetrMemory) -> RTDetrMemory:
        """The memory extra query groups are decoded over: `memory`, or (`point_memory_grad: false`) with the
        decoder's input levels detached."""
        return memory if self.point_memory_grad else dataclasses.replace(memory, memory=memory.memory.detach())

    def _inputs(self, memory: RTDetrMemory, queries: Optional[Queries]) -> tuple[Tensor, Tensor]:
        """Content `[B, K, D]` and anchors `[B, K, 4]` of a group (None: the detection queries)."""
        batch = memory.memory.shape[0]
        anchors = memory.selected if queries is None else queries.anchors.expand(batch, -1, -1)
        if queries is not None and queries.content is not None:
            return queries.content.expand(batch, -1, -1), anchors
        if self.query_content is not None:  # learned content in slot order (cycled for larger groups)
            slots = torch.arange(anchors.shape[1], device=anchors.device) % self.num_queries
            return self.query_content(slots).expand(batch, -1, -1), anchors
        return (memory.content if queries is None else self.point_contents(memory, anchors)), anchors

    def _decode(self, content: Tensor, anchors: Tensor, memory: RTDetrMemory,
                self_attn_mask: Optional[Tensor]) -> DecoderOutput:
        if self_attn_mask is not None and self_attn_mask.dim() == 3:  # per image -> per image and head
            self_attn_mask = self_attn_mask.repeat_interleave(self.decoder[0].self_attn.num_heads, dim=0)
        levels = len(memory.shapes)
        tgt, reference, previous, logits, boxes = content, anchors, None, [], []
        for layer, class_head, box_head in zip(self.decoder, self.class_embed, self.bbox_embed):
            tgt = layer(tgt, self.query_pos_head(reference), reference[:, :, None].expand(-1, -1, levels, -1),
                        memory, self_attn_mask)
            delta = box_head(tgt)
            box = (delta + inverse_sigmoid(reference)).sigmoid()
            # the same values; with gradients to the previous layer's box (the reference's training outputs)
            boxes.append(box if previous is None else (delta + inverse_sigmoid(previous)).sigmoid())
            logits.append(class_head(tgt))
            previous, reference = box, box.detach()
        return DecoderOutput(torch.stack(logits), torch.stack(boxes))

    def decode(self, memory: RTDetrMemory, queries: Optional[Queries] = None,
               self_attn_mask: Optional[Tensor] = None) -> DecoderOutput:
        """Decode one set of queries (None: the detection queries); `self_attn_mask` True = may not attend."""
        return self._decode(*self._inputs(memory, queries), memory, self_attn_mask)

    def decode_groups(self, memory: RTDetrMemory, groups: Sequence[Optional[Queries]]) -> list[DecoderOutput]:
        """Decode query groups isolated from each other (`group_isolation`: see `query_groups.decode_groups`)."""
        return decode_groups([self._inputs(memory, group) for group in groups], memory, self._decode,
                             self.group_isolation)



def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """A bias-free convolution and a batch norm: RT-DETR's input projections."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False),
                         nn.BatchNorm2d(out_channels))


def _check(cfg: ModelConfig) -> None:
    """What the options allow: RT-DETRv2's sampling options need `version: v2`; sizes that fit."""
    options = cfg.options
    if min(options.num_points, default=0) < 1:
        raise UserError(f"model.rt_detr.num_points: positive counts expected, got {options.num_points}")
    if len(options.num_points) not in (1, cfg.num_feature_levels):
        raise UserError(f"model.rt_detr.num_points: one count or one per level ({cfg.num_feature_levels}), "
                        f"got {options.num_points}")
    if options.version == "v1" and (len(set(options.num_points)) > 1 or options.decoder_method != "default"
                                    or options.decoder_offset_scale != 0.5):
        raise UserError("model.rt_detr: per-level num_points, decoder_method and decoder_offset_scale are "
                        "RT-DETRv2's; set model.rt_detr.version: v2")
    if (options.encoder_dim or cfg.hidden_dim) % 4:
        raise UserError("model.rt_detr.encoder_dim: AIFI's position embedding needs a multiple of 4")
    if cfg.num_feature_levels < 1 or not options.aifi_levels:
        raise UserError("model.num_feature_levels and model.rt_detr.aifi_levels: at least one level")
    if cfg.denoising.enabled and not cfg.denoising.contrastive:
        raise UserError("model.denoising.contrastive: RT-DETR's denoising is contrastive; set it true")


def build_criterion(cfg: ModelConfig, num_classes: int) -> SetCriterion:
    """RT-DETR's loss: varifocal class term (IoU targets), L1 and GIoU, every layer, proposals and denoising."""
    return SetCriterion(num_classes, build_matcher(cfg), cfg.loss, dn_loss_weight=cfg.denoising.loss_weight,
                        class_loss="varifocal", varifocal_alpha=cfg.options.varifocal_alpha,
                        varifocal_gamma=cfg.options.varifocal_gamma)

"""DN-DETR / DINO denoising queries: noised copies of the ground truth in groups, and the mask that keeps them apart."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_convert

from kddetr.config import DenoisingConfig
from kddetr.errors import UserError
from kddetr.models.protocol import DecoderOutput, DetectorOutput, ImageBatch, Queries
from kddetr.models.query_groups import GroupInputs, decode_groups, split_groups

MIN_SIZE = 1e-5  # smallest noised width/height: the decoder divides by them
# a padding query (images with fewer targets than the batch's most): zero content at the image's middle box, as
# DN-DETR's and DINO's zero logits; DN-DETR never scores it, DINO scores it as "no object"
PADDING_BOX = 0.5


@dataclass
class DenoisingGroups:
    """`num_groups` groups of `single_pad` queries per image, group-major: query `g * P + j` of image b is a
    noised copy of its target j for j < n_b (the layout `criterion.denoising_indices` expects); the
    others are padding, False in `valid [B, G * P]`. `contrastive` (DINO): the second half of every group
    holds the negatives, query `g * P + P / 2 + j` a farther-noised copy of target j."""

    queries: Queries
    valid: Tensor
    num_groups: int
    single_pad: int
    contrastive: bool = False

    @property
    def meta(self) -> dict[str, Any]:
        return {"num_groups": self.num_groups, "single_pad": self.single_pad, "contrastive": self.contrastive}


def noise_labels(labels: Tensor, ratio: float, num_classes: int,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """Each label replaced with probability `ratio` by a uniformly drawn class (possibly itself, as in DN-DETR)."""
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < ratio
    drawn = torch.randint(num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, drawn, labels)


def noise_boxes(boxes: Tensor, scale: float, generator: Optional[torch.Generator] = None,
                negative: bool | Tensor = False) -> Tensor:
    """cxcywh boxes with centres moved by up to `scale` * (w/2, h/2) and sizes scaled by [1 - scale, 1 + scale].

    Uniform noise as in DN-DETR, then clamped to the image: centres to [0, 1], sizes to [MIN_SIZE, 1].
    Where `negative` (a bool or a mask broadcastable to `boxes`) holds, each coordinate's noise lies between
    1x and 2x those bounds instead: DINO's contrastive negatives, close to a target but not on it.
    """
    wh = boxes[..., 2:]
    spread = torch.cat((wh / 2, wh), dim=-1) * scale
    uniform = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype) * 2 - 1
    uniform = torch.where(torch.as_tensor(negative, device=boxes.device),
                          torch.where(uniform < 0, -1.0, 1.0) + uniform, uniform)
    noised = boxes + uniform * spread
    return torch.cat((noised[..., :2].clamp(0, 1), noised[..., 2:].clamp(MIN_SIZE, 1)), dim=-1)


def noise_corners(boxes: Tensor, scale: float, generator: Optional[torch.Generator] = None,
                  negative: bool | Tensor = False) -> Tensor:
    """DINO's box noise: each corner of the cxcywh `boxes` moved by up to `scale` * (w/2, h/2), negatives (where
    `negative` holds) by between 1x and 2x that; corners clamped to the image. Where two corners crossed, the
    box collapses to MIN_SIZE at their midpoint (the reference's negative size, clamped by its inverse sigmoid)."""
    corners = box_convert(boxes, "cxcywh", "xyxy")
    spread = boxes[..., 2:].repeat(*[1] * (boxes.dim() - 1), 2) / 2 * scale
    magnitude = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype)
    magnitude = magnitude + torch.as_tensor(negative, device=boxes.device).to(boxes.dtype)
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device).to(boxes.dtype) * 2 - 1
    moved = (corners + sign * magnitude * spread).clamp(0, 1)
    centre, size = (moved[..., :2] + moved[..., 2:]) / 2, moved[..., 2:] - moved[..., :2]
    return torch.cat((centre, size.clamp(min=MIN_SIZE)), dim=-1)


def denoising_attn_mask(valid: Tensor, num_groups: int, sizes: Sequence[int]) -> Tensor:
    """`[B, N, N]` self-attention mask, True = blocked, for denoising groups followed by query groups of `sizes`.

    Every query sees its own group. Denoising queries also see `sizes[0]`, the detection queries, as in
    DN-DETR; the detection queries never see them, and later groups (e.g. distillation queries) see and
    are seen by no other group. Padding denoising queries (`valid` False) are seen by none but themselves.
    """
    device = valid.device
    pad = valid.shape[1] // num_groups
    group = torch.repeat_interleave(torch.tensor([pad] * num_groups + list(sizes), device=device))
    sees = group[:, None] == group[None, :]
    sees |= (group < num_groups)[:, None] & (group == num_groups)[None, :]
    visible = torch.cat((valid, valid.new_ones(valid.shape[0], sum(sizes))), dim=1)
    sees = sees & visible[:, None, :] | torch.eye(len(group), dtype=torch.bool, device=device)
    return ~sees


class DenoisingGenerator(nn.Module):
    """Builds the denoising groups of a batch from its targets (labels `[n]`, boxes `[n, 4]` cxcywh in [0, 1]).

    Anchors are the noised boxes. Content is a learned embedding of the noised label in `hidden_dim - 1`
    dims plus an indicator dim set to 1 (DN-DAB-DETR). Our detection queries keep their zero content, so
    their indicator is 0 and a denoising query is always told apart from a detection query, whatever the
    embedding learns; unlike DN-DAB-DETR there is no extra "unknown class" row, the detection queries
    do not use it.
    """

    def __init__(self, cfg: DenoisingConfig, num_classes: int, hidden_dim: int) -> None:
        super().__init__()
        if cfg.num_groups < 1:
            raise UserError(f"model.denoising.num_groups: must be >= 1, got {cfg.num_groups}")
        if not 0 <= cfg.label_noise <= 1:
            raise UserError(f"model.denoising.label_noise: must be in [0, 1], got {cfg.label_noise}")
        if cfg.box_noise < 0:
            raise UserError(f"model.denoising.box_noise: must be >= 0, got {cfg.box_noise}")
        if cfg.query_budget < 0:
            raise UserError(f"model.denoising.query_budget: must be >= 0 (0: num_groups), got {cfg.query_budget}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.label_embed = nn.Embedding(num_classes, hidden_dim - 1)

    def forward(self, targets: list[dict[str, Tensor]],
                generator: Optional[torch.Generator] = None) -> DenoisingGroups:
        device = self.label_embed.weight.device
        sizes = [len(t["labels"]) for t in targets]
        pad, contrastive = max(sizes, default=0), self.cfg.contrastive
        groups = max(1, self.cfg.query_budget // pad) if self.cfg.query_budget > 0 and pad else self.cfg.num_groups
        labels = pad_sequence([t["labels"] for t in targets], batch_first=True).to(device)
        boxes = pad_sequence([t["boxes"] for t in targets], batch_first=True, padding_value=PADDING_BOX).to(device)
        copies = 2 if contrastive else 1  # positives, then negatives, in every group
        ratio = self.cfg.label_noise / 2 if contrastive else self.cfg.label_noise  # DINO flips half as many
        labels = noise_labels(labels.repeat(1, groups * copies), ratio, self.num_classes, generator)
        negative = torch.arange(groups * copies * pad, device=device) // pad % copies == 1
        noise = noise_corners if contrastive else noise_boxes
        boxes = noise(boxes.repeat(1, groups * copies, 1), self.cfg.box_noise, generator, negative[:, None])
        valid = (torch.arange(pad, device=device) < torch.tensor(sizes, device=device)[:, None]).repeat(
            1, groups * copies)
        boxes = torch.where(valid[..., None], boxes, PADDING_BOX)  # padding is not noised
        return DenoisingGroups(Queries(boxes, self.content(labels, valid)), valid, groups, copies * pad,
                               self.cfg.contrastive)

    def content(self, labels: Tensor, valid: Tensor) -> Tensor:
        """The queries' content `[B, N, D]` from their noised labels `[B, N]`; zero for padding (`valid` False)."""
        embedding = self.label_embed(labels)
        content = torch.cat((embedding, embedding.new_ones(*labels.shape, 1)), dim=-1)
        return content * valid[..., None]


def decode_with_denoising(inputs: Sequence[GroupInputs], denoising: DenoisingGroups, memory: Any,
                          decode: Callable[..., DecoderOutput], mode: str, group_memory: Any = None
                          ) -> list[DecoderOutput]:
    """Outputs of `[denoising, *groups]` from their decoder inputs (`inputs[0]`: the denoising queries',
    `inputs[1]`: the detection queries', as in `query_groups.decode_groups`).

    Denoising and detection queries share one pass under `denoising_attn_mask`; `query_groups.decode_groups`
    decodes the other groups on their own (`mode`), over `group_memory` (default `memory`).
    """
    group_memory = memory if group_memory is None else group_memory
    sizes = [parts[0].shape[1] for parts in inputs[:2]]
    mask = denoising_attn_mask(denoising.valid, denoising.num_groups, sizes[1:])
    outputs = split_groups(decode(*[torch.cat(parts, 1) for parts in zip(*inputs[:2])], memory, mask), sizes)
    rest = inputs[2:]
    return outputs + (decode_groups(rest, group_memory, decode, mode) if rest else [])


class DenoisedForward:
    """`forward` of a query-selecting detector with denoising groups in training (DINO, RT-DETR): it needs
    `encode`, `decode_groups`, `_inputs` (a group's decoder inputs), `_decode`, `group_isolation`, `denoising`
    (a `DenoisingGenerator` or None) and a memory with the encoder's `proposals`."""

    def group_memory(self, memory: Any) -> Any:
        """The memory extra query groups are decoded over (a detector may detach parts of it)."""
        return memory

    def forward(self, images: ImageBatch, targets: Optional[list[dict[str, Tensor]]] = None,
                extra_queries: Optional[list[Queries]] = None) -> DetectorOutput:
        memory = self.encode(images)
        groups = [None, *(extra_queries or [])]
        noised, meta = None, None
        group_memory = self.group_memory(memory)
        if not self.training or self.denoising is None or targets is None:
            if group_memory is memory:
                detections, *extra = self.decode_groups(memory, groups)
            else:
                detections, extra = self.decode_groups(memory, [None])[0], self.decode_groups(group_memory, groups[1:])
        else:
            dn = self.denoising(targets)
            inputs = [self._inputs(memory, group) for group in [dn.queries, *groups]]
            noised, detections, *extra = decode_with_denoising(inputs, dn, memory, self._decode, self.group_isolation,
                                                               group_memory)
            meta = dn.meta
        return DetectorOutput(logits=detections.logits, boxes=detections.boxes, extra=extra, denoising=noised,
                              denoising_meta=meta, encoder_memory=memory.memory, encoder_proposals=memory.proposals)

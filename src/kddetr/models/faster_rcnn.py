"""Faster R-CNN (torchvision) over our ResNet body, adapted to the detector protocol for heterogeneous KD."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, RPNHead, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, box_convert
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from kddetr.config import ModelConfig, positive
from kddetr.errors import UserError
from kddetr.models.backbone import Backbone
from kddetr.models.protocol import (ClassSlots, DecoderOutput, DetectorOutput, ImageBatch, Queries,
                                    class_slots_by_prefix)

Targets = list[dict[str, Tensor]]


@dataclass
class RCNNMemory:
    """What `encode` returns: FPN features, the unpadded image sizes, the RPN's proposals (xyxy pixels) and losses."""

    features: dict[str, Tensor]
    image_sizes: list[tuple[int, int]]
    proposals: list[Tensor]
    rpn_losses: dict[str, Tensor]


def image_sizes(mask: Tensor) -> list[tuple[int, int]]:
    """(h, w) of each image's unpadded region; padding is at the bottom/right (mask True = padding)."""
    heights = (~mask[:, :, 0]).sum(1).tolist()
    widths = (~mask[:, 0, :]).sum(1).tolist()
    return list(zip(heights, widths))


def _scale(size: tuple[int, int], like: Tensor) -> Tensor:
    h, w = size
    return torch.tensor([w, h, w, h], dtype=like.dtype, device=like.device)


def to_pixels(anchors: Tensor, size: tuple[int, int]) -> Tensor:
    """cxcywh in [0, 1] of the image `[K, 4]` -> xyxy pixels."""
    return box_convert(anchors, "cxcywh", "xyxy") * _scale(size, anchors)


def to_normalized(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """xyxy pixels `[..., 4]` -> cxcywh in [0, 1] of the image."""
    return box_convert(boxes / _scale(size, boxes), "xyxy", "cxcywh")


def pad_cyclic(boxes: Tensor, count: int, size: tuple[int, int]) -> Tensor:
    """`boxes [n, 4]` repeated cyclically to `count` rows (no proposals at all: the whole image)."""
    if len(boxes) == 0:
        boxes = torch.tensor([[0.0, 0.0, size[1], size[0]]], dtype=boxes.dtype, device=boxes.device)
    return boxes[torch.arange(count, device=boxes.device) % len(boxes)]


@contextlib.contextmanager
def _inference(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode for the block (the RPN then needs no targets and keeps its test-time top-n)."""
    was_training = module.training
    module.train(False)
    try:
        yield
    finally:
        module.train(was_training)


@dataclass
class RCNNOptions:
    """`model.faster_rcnn`: one anchor size (pixels) per FPN level and the aspect ratios; RoIs sampled per image
    for the RoI-head loss; width of the two-layer RoI box head (torchvision's defaults)."""

    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    roi_batch_size: int = positive(512)
    roi_head_dim: int = positive(1024)


class FasterRCNN(TorchvisionFasterRCNN):
    """torchvision's Faster R-CNN (FPN, RPN, RoI heads) over our `Backbone` body, speaking the detector protocol.

    The inputs are our padded, normalised `ImageBatch` (torchvision's own resize/normalise transform is
    bypassed); targets are ours (cxcywh in [0, 1], labels 0..C-1) and become torchvision's (xyxy pixels,
    labels 1..C, 0 = background). FPN levels: the last `num_feature_levels` backbone stages plus a
    max-pooled level, `hidden_dim` channels, one anchor size per level. The RPN keeps `num_queries`
    proposals per image (before and after NMS, training and test alike).

    Protocol view, one "decoder layer": a query is a box, its prediction the RoI head's at that box given
    as a proposal (box_roi_pool -> box_head -> box_predictor -> box_coder.decode). The detection queries
    are the RPN proposals of the step; `decode(memory, queries)` predicts at any boxes; RoIs do not
    interact, so groups are isolated by construction. Class mapping: `logits[c] = z[c + 1] - z[0]` (softmax
    logits z, 0 = background), the log-odds of class c against background; `softmax([0, logits])` is the
    RoI head's softmax exactly, and for a sigmoid (DETR) head the same padding with a zero background
    logit turns its per-class log-odds into a distribution with background (`kd.cls_background`); with
    `kd.cls_loss: bce`, `sigmoid(logits[c]) = p(c) / (p(c) + p(background))` meets the teacher's sigmoid.
    `boxes` are the box of the most probable foreground class, cxcywh normalised by the image size
    (not clipped, so that KD gradients reach boxes that overrun the image). The FPN sits under `backbone.`
    (torchvision's names), so it trains at `train.lr_backbone`.

    Training losses (torchvision's: RPN objectness and box, RoI classifier and box) come in
    `DetectorOutput.losses`; at inference `DetectorOutput.detections` holds torchvision's post-processed
    detections (score threshold, per-class NMS, top 100), boxes xyxy normalised to [0, 1].
    """

    num_decoder_layers = 1

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        options: RCNNOptions = cfg.options
        body = Backbone.from_config(cfg.backbone)
        num_stages = len(body.stage_channels)
        levels = min(cfg.num_feature_levels, num_stages)
        stages = range(num_stages - levels, num_stages)
        fpn = BackboneWithFPN(body.body, {f"layer{i + 1}": str(j) for j, i in enumerate(stages)},
                              [body.stage_channels[i] for i in stages], cfg.hidden_dim, LastLevelMaxPool())
        if len(options.anchor_sizes) != levels + 1:
            raise UserError(f"model.faster_rcnn.anchor_sizes: {len(options.anchor_sizes)} sizes for {levels + 1} "
                            f"FPN levels ({levels} backbone stages + a max-pooled one); give one size per level")
        anchors = AnchorGenerator(tuple((s,) for s in options.anchor_sizes),
                                  (tuple(options.anchor_ratios),) * (levels + 1))
        roi_pool = MultiScaleRoIAlign([str(j) for j in range(levels)], output_size=7, sampling_ratio=2)
        top_n = cfg.num_queries
        super().__init__(
            fpn, num_classes=None, rpn_anchor_generator=anchors,
            rpn_head=RPNHead(cfg.hidden_dim, len(options.anchor_ratios)),
            rpn_pre_nms_top_n_train=top_n, rpn_pre_nms_top_n_test=top_n,
            rpn_post_nms_top_n_train=top_n, rpn_post_nms_top_n_test=top_n,
            box_roi_pool=roi_pool, box_head=TwoMLPHead(cfg.hidden_dim * 7 * 7, options.roi_head_dim),
            box_predictor=FastRCNNPredictor(options.roi_head_dim, num_classes + 1),
            box_batch_size_per_image=options.roi_batch_size)
        self.num_classes = num_classes
        self.num_queries = top_n

    def _targets(self, targets: Targets, sizes: list[tuple[int, int]]) -> Targets:
        return [{"boxes": to_pixels(t["boxes"].float(), size), "labels": t["labels"] + 1}
                for t, size in zip(targets, sizes)]

    def encode(self, images: ImageBatch, targets: Optional[Targets] = None) -> RCNNMemory:
        """Backbone + FPN + RPN. Without targets (or in eval) the RPN runs as at inference and has no losses."""
        sizes = image_sizes(images.mask)
        image_list = ImageList(images.tensors, sizes)
        features = self.backbone(images.tensors)
        if self.training and targets is not None:
            proposals, losses = self.rpn(image_list, features, self._targets(targets, sizes))
        else:
            with _inference(self.rpn):
                proposals, losses = self.rpn(image_list, features)
        return RCNNMemory(features, sizes, proposals, losses)

    def roi_predictions(self, memory: RCNNMemory, rois: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The RoI head at the given boxes (xyxy pixels, one tensor per image): class logits `[N, C + 1]` and
        box deltas `[N, 4 (C + 1)]`, rows image by image."""
        heads = self.roi_heads
        return heads.box_predictor(heads.box_head(heads.box_roi_pool(memory.features, rois, memory.image_sizes)))

    def _output(self, memory: RCNNMemory, rois: list[Tensor], class_logits: Tensor, deltas: Tensor) -> DecoderOutput:
        """Protocol outputs `[1, B, K, ...]` from the RoI head's predictions at `rois` (K boxes in every image)."""
        batch, count = len(rois), len(rois[0])
        logits = class_logits[:, 1:] - class_logits[:, :1]
        best = logits.detach().argmax(-1) + 1
        boxes = self.roi_heads.box_coder.decode(deltas, rois)[torch.arange(len(best), device=best.device), best]
        boxes = torch.stack([to_normalized(b, size)
                             for b, size in zip(boxes.view(batch, count, 4), memory.image_sizes)])
        return DecoderOutput(logits=logits.view(1, batch, count, -1), boxes=boxes.unsqueeze(0))

    def decode(self, memory: RCNNMemory, queries: Optional[Queries] = None) -> DecoderOutput:
        """Predictions at `queries.anchors` given as proposals (`None`: at the RPN proposals of the step)."""
        if queries is None:
            queries = self.learned_queries(len(memory.image_sizes), memory)
        rois = [to_pixels(a, size) for a, size in zip(queries.anchors, memory.image_sizes)]
        return self._output(memory, rois, *self.roi_predictions(memory, rois))

    def decode_groups(self, memory: RCNNMemory, groups: Sequence[Optional[Queries]]) -> list[DecoderOutput]:
        """RoI predictions never see each other: every group is decoded on its own."""
        return [self.decode(memory, q) for q in groups]

    def _padded_proposals(self, memory: RCNNMemory) -> list[Tensor]:
        count = max(1, max(len(p) for p in memory.proposals))
        return [pad_cyclic(p, count, size) for p, size in zip(memory.proposals, memory.image_sizes)]

    def lr_multipliers(self) -> dict[str, float]:
        return {}

    def class_slots(self) -> dict[str, ClassSlots]:
        """The RoI predictor: class scores after the background row, 4 box deltas per class after the background's."""
        return (class_slots_by_prefix(self, ("roi_heads.box_predictor.cls_score.",), ClassSlots(first=1))
                | class_slots_by_prefix(self, ("roi_heads.box_predictor.bbox_pred.",), ClassSlots(first=4, width=4)))

    def learned_queries(self, batch_size: int, memory: Optional[RCNNMemory] = None) -> Queries:
        """The RPN proposals of the step (cxcywh in [0, 1]), padded by repetition to one count per batch."""
        if memory is None:
            raise ValueError("Faster R-CNN's queries are its proposals of an image: pass `memory`")
        rois = self._padded_proposals(memory)
        anchors = torch.stack([to_normalized(r, size) for r, size in zip(rois, memory.image_sizes)])
        return Queries(anchors=anchors.detach())

    def forward(self, images: ImageBatch, targets: Optional[Targets] = None,
                extra_queries: Optional[list[Queries]] = None) -> DetectorOutput:  # type: ignore[override]
        memory = self.encode(images, targets)
        rois = self._padded_proposals(memory)
        class_logits, deltas = self.roi_predictions(memory, rois)
        detections = self._output(memory, rois, class_logits, deltas)
        extra = self.decode_groups(memory, extra_queries or [])
        out = DetectorOutput(logits=detections.logits, boxes=detections.boxes, extra=extra)
        if self.training and targets is not None:
            _, roi_losses = self.roi_heads(memory.features, memory.proposals, memory.image_sizes,
                                           self._targets(targets, memory.image_sizes))
            out.losses = {**memory.rpn_losses, **roi_losses}
        elif not self.training:
            out.detections = self._detections(memory, rois, class_logits, deltas)
        return out

    def _detections(self, memory: RCNNMemory, rois: list[Tensor], class_logits: Tensor,
                    deltas: Tensor) -> list[dict[str, Tensor]]:
        """torchvision's post-processing (per-class NMS) at the proposals; boxes xyxy in [0, 1], labels 0..C-1."""
        boxes, scores, labels = self.roi_heads.postprocess_detections(class_logits, deltas, rois, memory.image_sizes)
        return [{"boxes": b / _scale(size, b), "scores": s, "labels": l - 1}
                for b, s, l, size in zip(boxes, scores, labels, memory.image_sizes)]


class RCNNCriterion(nn.Module):
    """The detector's own losses, passed through (torchvision's Faster R-CNN computes them in its forward)."""

    def forward(self, outputs: DetectorOutput, targets: Targets) -> dict[str, Tensor]:
        if outputs.losses is None:
            raise ValueError("criterion: the detector returned no losses (train mode with targets needed)")
        return dict(outputs.losses)


def build_criterion(cfg: ModelConfig, num_classes: int) -> RCNNCriterion:
    """Faster R-CNN's losses come from its own forward (torchvision's RPN and RoI heads)."""
    return RCNNCriterion()

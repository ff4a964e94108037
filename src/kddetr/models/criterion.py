"""Set-prediction loss: focal classification, L1 and GIoU on Hungarian-matched pairs, plus denoising terms."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from kddetr.config import LossConfig, ModelConfig
from kddetr.models.matcher import HungarianMatcher, Indices
from kddetr.models.protocol import DecoderOutput, DetectorOutput


def denoising_indices(sizes: list[int], num_groups: int, single_pad: int,
                      device: torch.device | str | None = None) -> Indices:
    """The fixed (query_idx, target_idx) pairs of denoising groups laid out as described in `SetCriterion`."""
    if sizes and max(sizes) > single_pad:
        raise ValueError(f"denoising: single_pad={single_pad} is smaller than an image's {max(sizes)} targets")
    offsets = torch.arange(num_groups, device=device)[:, None] * single_pad
    indices = []
    for n in sizes:
        j = torch.arange(n, device=device)
        indices.append(((offsets + j).flatten(), j.repeat(num_groups)))
    return indices


def _num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> Tensor:
    """Target boxes per worker, averaged over distributed workers, at least 1."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1)


class SetCriterion(nn.Module):
    """DAB-DETR detection loss over every decoder layer; returns already weighted terms.

    Keys: `loss_ce`, `loss_bbox`, `loss_giou` (last layer), the same with `_{l}` for auxiliary layers
    l = 0..L-2 when `aux_loss`, and `dn_`-prefixed copies for denoising groups.

    Denoising (DN-DETR): `outputs.denoising` holds `logits [L, B, G * P, C]` and `boxes [L, B, G * P, 4]`,
    `outputs.denoising_meta = {"num_groups": G, "single_pad": P}` with P >= the most targets of any image.
    Query `g * P + j` of image b reconstructs target j of `targets[b]` (j < n_b); the remaining queries are
    padding and get no loss. The denoising terms skip matching, score only the reconstructing queries, are
    normalised by G * num_boxes and scaled by `dn_loss_weight`.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, loss_cfg: LossConfig,
                 dn_loss_weight: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.cfg = loss_cfg
        self.weights = {"loss_ce": loss_cfg.cls_weight, "loss_bbox": loss_cfg.bbox_weight,
                        "loss_giou": loss_cfg.giou_weight}
        self.dn_loss_weight = dn_loss_weight

    def loss_labels(self, logits: Tensor, targets: list[dict[str, Tensor]], indices: Indices,
                    num_boxes: Tensor, matched_only: bool = False) -> Tensor:
        """Sigmoid focal loss summed over queries and classes / num_boxes (DAB-DETR's `mean(1).sum() * Q`)."""
        batch_idx, query_idx = _query_index(indices)
        onehot = torch.zeros_like(logits)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot[batch_idx, query_idx, labels] = 1
        focal = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma)
        if matched_only:
            focal = focal[batch_idx, query_idx]
        return focal.sum() / num_boxes

    def loss_boxes(self, boxes: Tensor, targets: list[dict[str, Tensor]], indices: Indices,
                   num_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """L1 on cxcywh and 1 - GIoU of the matched pairs, each summed / num_boxes."""
        src = boxes[_query_index(indices)]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        l1 = (src - tgt).abs().sum() / num_boxes
        giou = generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"),
                                        reduction="sum") / num_boxes
        return l1, giou

    def _layer(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], indices: Indices,
               num_boxes: Tensor, prefix: str, suffix: str, scale: float = 1.0,
               matched_only: bool = False) -> dict[str, Tensor]:
        l1, giou = self.loss_boxes(boxes, targets, indices, num_boxes)
        terms = {"loss_ce": self.loss_labels(logits, targets, indices, num_boxes, matched_only),
                 "loss_bbox": l1, "loss_giou": giou}
        return {f"{prefix}{name}{suffix}": self.weights[name] * scale * value for name, value in terms.items()}

    def _layers(self, out: DecoderOutput) -> list[tuple[int, str]]:
        """(layer, key suffix): the last layer first, then the auxiliary ones."""
        last = out.logits.shape[0] - 1
        aux = [(l, f"_{l}") for l in range(last)] if self.cfg.aux_loss else []
        return [(last, "")] + aux

    def forward(self, outputs: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if outputs.logits.shape[-1] != self.num_classes:
            raise ValueError(f"criterion: logits have {outputs.logits.shape[-1]} classes, expected {self.num_classes}")
        num_boxes = _num_boxes(targets, outputs.logits.device)
        losses: dict[str, Tensor] = {}
        for l, suffix in self._layers(outputs):
            indices = self.matcher(outputs.logits[l], outputs.boxes[l], targets)
            losses.update(self._layer(outputs.logits[l], outputs.boxes[l], targets, indices, num_boxes, "", suffix))
        if outputs.denoising is not None:
            dn, meta = outputs.denoising, outputs.denoising_meta
            if meta is None:
                raise ValueError("denoising: outputs.denoising_meta is missing")
            groups, pad = meta["num_groups"], meta["single_pad"]
            if dn.logits.shape[2] != groups * pad:
                raise ValueError(f"denoising: {dn.logits.shape[2]} queries != num_groups * single_pad = {groups * pad}")
            indices = denoising_indices([len(t["labels"]) for t in targets], groups, pad, dn.logits.device)
            for l, suffix in self._layers(dn):
                losses.update(self._layer(dn.logits[l], dn.boxes[l], targets, indices, num_boxes * groups,
                                          "dn_", suffix, self.dn_loss_weight, matched_only=True))
        return losses


def _query_index(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx) of all matched queries, for advanced indexing of `[B, Q, ...]` tensors."""
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
    return batch_idx, torch.cat([q for q, _ in indices])


def build_criterion(cfg: ModelConfig, num_classes: int) -> SetCriterion:
    loss = cfg.loss
    matcher = HungarianMatcher(loss.match_cls_cost, loss.match_bbox_cost, loss.match_giou_cost,
                               loss.focal_alpha, loss.focal_gamma)
    return SetCriterion(num_classes, matcher, loss, dn_loss_weight=cfg.denoising.loss_weight)

"""Set-prediction loss: focal class, L1 and GIoU terms on Hungarian-matched pairs, plus denoising and encoder terms."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss, sigmoid_focal_loss

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


def varifocal_loss(logits: Tensor, target_score: Tensor, positive: Tensor, alpha: float = 0.75,
                   gamma: float = 2.0) -> Tensor:
    """Elementwise varifocal loss (VarifocalNet, arXiv 2008.13367; RT-DETR's class term): binary cross-entropy
    towards `target_score` (a positive's IoU with its target at its class, else 0), weighted by the target score
    where `positive` (1: a matched query's class) and by `alpha * p ** gamma` (p the detached predicted
    probability) elsewhere."""
    prob = logits.detach().sigmoid()
    weight = alpha * prob.pow(gamma) * (1 - positive) + target_score
    return F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")


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
    l = 0..L-2 when `aux_loss`, `dn_`-prefixed copies for denoising groups and `enc_`-prefixed ones for the
    encoder proposals of query-selecting detectors.

    Denoising (DN-DETR): `outputs.denoising` holds `logits [L, B, G * P, C]` and `boxes [L, B, G * P, 4]`,
    `outputs.denoising_meta = {"num_groups": G, "single_pad": P}` with P >= the most targets of any image.
    Query `g * P + j` of image b reconstructs target j of `targets[b]` (j < n_b); the remaining queries are
    padding and get no loss. The denoising terms skip matching, score only the reconstructing queries, are
    normalised by G * num_boxes and scaled by `dn_loss_weight`. With `denoising_meta["contrastive"]` (DINO),
    query `g * P + P / 2 + j` is target j's negative: it only gets the classification term, as "no object".

    Encoder proposals (`outputs.encoder_proposals`, two-stage Deformable DETR and DINO): Hungarian-matched
    to the targets like a decoder layer, as in the reference code's `enc_outputs` loss; when they are
    class-agnostic (Deformable DETR ranks proposals by the first column) every target counts as class 0 and every
    other column is trained towards 0, as the reference's binary targets do.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, loss_cfg: LossConfig,
                 dn_loss_weight: float = 1.0, class_loss: Literal["focal", "varifocal"] = "focal",
                 varifocal_alpha: float = 0.75, varifocal_gamma: float = 2.0) -> None:
        """`class_loss`: the `loss_ce` term, sigmoid focal loss (`loss_cfg.focal_alpha`, `focal_gamma`) or varifocal
        loss towards the matched boxes' IoU (RT-DETR, `varifocal_alpha`, `varifocal_gamma`)."""
        super().__init__()
        if class_loss not in ("focal", "varifocal"):
            raise ValueError(f"criterion: unknown class loss {class_loss!r} (focal or varifocal)")
        self.class_loss, self.varifocal_alpha, self.varifocal_gamma = class_loss, varifocal_alpha, varifocal_gamma
        self.num_classes = num_classes
        self.matcher = matcher
        self.cfg = loss_cfg
        self.weights = {"loss_ce": loss_cfg.cls_weight, "loss_bbox": loss_cfg.bbox_weight,
                        "loss_giou": loss_cfg.giou_weight}
        self.dn_loss_weight = dn_loss_weight

    def loss_labels(self, logits: Tensor, targets: list[dict[str, Tensor]], indices: Indices,
                    num_boxes: Tensor, scored: Optional[tuple[Tensor, Tensor]] = None,
                    boxes: Optional[Tensor] = None) -> Tensor:
        """Sigmoid focal (or varifocal) loss summed over queries and classes / num_boxes (DAB-DETR's
        `mean(1).sum() * Q`).

        `scored`: (batch_idx, query_idx) of the only queries to score (the others get no loss); matched queries
        are positives, the rest of `scored` background. `boxes [B, Q, 4]`: the predictions whose IoU with their
        targets the varifocal loss aims at.
        """
        batch_idx, query_idx = _query_index(indices)
        onehot = torch.zeros_like(logits)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot[batch_idx, query_idx, labels] = 1
        if self.class_loss == "varifocal":
            if boxes is None:
                raise ValueError("criterion: the varifocal loss needs the predicted boxes")
            src = box_convert(boxes[batch_idx, query_idx].detach(), "cxcywh", "xyxy")
            tgt = box_convert(torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src), "cxcywh",
                              "xyxy")
            target_score = torch.zeros_like(logits)
            target_score[batch_idx, query_idx, labels] = box_iou(src, tgt).diagonal().to(logits.dtype)
            focal = varifocal_loss(logits, target_score, onehot, self.varifocal_alpha, self.varifocal_gamma)
        else:
            focal = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma)
        if scored is not None:
            focal = focal[scored]
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
               scored: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
        l1, giou = self.loss_boxes(boxes, targets, indices, num_boxes)
        terms = {"loss_ce": self.loss_labels(logits, targets, indices, num_boxes, scored, boxes),
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
            losses.update(self._denoising(outputs, targets, num_boxes))
        if outputs.encoder_proposals is not None:
            enc = outputs.encoder_proposals
            if outputs.encoder_class_agnostic:
                targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            indices = self.matcher(enc.logits[-1], enc.boxes[-1], targets)
            losses.update(self._layer(enc.logits[-1], enc.boxes[-1], targets, indices, num_boxes, "enc_", ""))
        return losses

    def _denoising(self, outputs: DetectorOutput, targets: list[dict[str, Tensor]],
                   num_boxes: Tensor) -> dict[str, Tensor]:
        dn, meta = outputs.denoising, outputs.denoising_meta
        if meta is None:
            raise ValueError("denoising: outputs.denoising_meta is missing")
        groups, pad = meta["num_groups"], meta["single_pad"]
        if dn.logits.shape[2] != groups * pad:
            raise ValueError(f"denoising: {dn.logits.shape[2]} queries != num_groups * single_pad = {groups * pad}")
        sizes = [len(t["labels"]) for t in targets]
        indices = denoising_indices(sizes, groups, pad, dn.logits.device)
        scored = _query_index(indices)  # DN-DETR: the noised targets only, padding gets no loss
        if meta.get("contrastive", False):  # DINO: every query, negatives and padding as "no object"
            if sizes and 2 * max(sizes) > pad:
                raise ValueError(f"denoising: single_pad={pad} holds fewer than 2 x {max(sizes)} targets")
            scored = None
        losses = {}
        for l, suffix in self._layers(dn):
            losses.update(self._layer(dn.logits[l], dn.boxes[l], targets, indices, num_boxes * groups,
                                      "dn_", suffix, self.dn_loss_weight, scored))
        return losses


def _query_index(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx) of all matched queries, for advanced indexing of `[B, Q, ...]` tensors."""
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
    return batch_idx, torch.cat([q for q, _ in indices])


def build_matcher(cfg: ModelConfig) -> HungarianMatcher:
    loss = cfg.loss
    return HungarianMatcher(loss.match_cls_cost, loss.match_bbox_cost, loss.match_giou_cost, loss.focal_alpha,
                            loss.focal_gamma)


def build_criterion(cfg: ModelConfig, num_classes: int) -> SetCriterion:
    return SetCriterion(num_classes, build_matcher(cfg), cfg.loss, dn_loss_weight=cfg.denoising.loss_weight)

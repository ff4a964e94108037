"""KD-DETR distillation losses: teacher-confidence weights, class KD, L1 + GIoU box KD, per decoder layer."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from kddetr.config import KDConfig
from kddetr.models.protocol import DecoderOutput


def teacher_confidence(teacher_logits: Tensor) -> Tensor:
    """Foreground weight of each point: the teacher's max class probability, detached, no threshold."""
    return teacher_logits.detach().sigmoid().amax(dim=-1)


def _reduce(per_point: Tensor, weights: Tensor, normalize: bool) -> Tensor:
    weighted = (per_point * weights).sum()
    return weighted / weights.sum().clamp(min=1e-6) if normalize else weighted


def class_kd_loss(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, kind: str = "kl",
                  temperature: float = 10.0, normalize: bool = False, background: bool = False,
                  target_scale: Optional[Tensor] = None) -> Tensor:
    """Class distillation over points `[..., C]`.

    `kl`: KL(softmax(t/T) || softmax(s/T)) averaged over classes, times T², as in the released code.
    `bce`: per-class binary KL between the teacher's and the student's sigmoid probabilities
    (fits sigmoid/focal heads; no temperature). Weighted by `weights`, summed over points, or a
    weighted mean when `normalize`. `background` (kl only): both logits are read as log-odds against
    background and a zero background logit joins the softmax (C + 1 classes), so that a softmax student
    with background (Faster R-CNN) and a sigmoid teacher compare full distributions, objectness included.
    `target_scale` (bce only, per point, detached): multiplies the teacher's probabilities.
    """
    if target_scale is not None and kind != "bce":
        raise ValueError("target_scale needs the bce class KD loss")
    teacher_logits = teacher_logits.detach().float()
    student_logits = student_logits.float()
    if kind == "kl":
        if background:
            teacher_logits, student_logits = F.pad(teacher_logits, (1, 0)), F.pad(student_logits, (1, 0))
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
        log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
        per_point = (log_p_t.exp() * (log_p_t - log_p_s)).mean(-1) * temperature**2
    elif kind == "bce":
        p_t = teacher_logits.sigmoid()
        if target_scale is not None:
            p_t = p_t * target_scale.detach().float()[..., None]
        cross = F.binary_cross_entropy_with_logits(student_logits, p_t, reduction="none")
        entropy = F.binary_cross_entropy(p_t, p_t, reduction="none")
        per_point = (cross - entropy).mean(-1)
    else:
        raise ValueError(f"unknown class KD loss {kind!r}")
    return _reduce(per_point, weights, normalize)


def box_kd_losses(student_boxes: Tensor, teacher_boxes: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """L1 (mean over cx, cy, w, h) and 1 − GIoU between matching boxes `[..., 4]`, weighted means."""
    teacher_boxes = teacher_boxes.detach().float()
    student_boxes = student_boxes.float()
    l1 = (student_boxes - teacher_boxes).abs().mean(-1)
    giou = generalized_box_iou_loss(box_convert(student_boxes, "cxcywh", "xyxy"),
                                    box_convert(teacher_boxes, "cxcywh", "xyxy"), reduction="none")
    return _reduce(l1, weights, True), _reduce(giou, weights, True)


def paired_iou(boxes: Tensor, other: Tensor) -> Tensor:
    """IoU `[...]` of each box with the box at the same place in `other` (both cxcywh `[..., 4]`), detached."""
    a = box_convert(boxes.detach().float(), "cxcywh", "xyxy")
    b = box_convert(other.detach().float(), "cxcywh", "xyxy")
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1) - inter
    return inter / union.clamp(min=1e-6)


def teacher_layer_for(student_layer: int, student_layers: int, teacher_layers: int, mode: str) -> int:
    """Which teacher layer supervises a student layer: always the last, or the proportional one."""
    if mode == "last":
        return teacher_layers - 1
    return round((student_layer + 1) * teacher_layers / student_layers) - 1


class DistillationLoss(nn.Module):
    """Every student decoder layer against the teacher (last layer by default), on one group of points."""

    def __init__(self, cfg: KDConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def layer_terms(self, s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor,
                    point_mask: Optional[Tensor] = None, locality: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Weighted `kd_cls`, `kd_bbox`, `kd_giou` for one layer; `point_mask` drops padded points, `locality`
        (per point) scales the weights."""
        cfg = self.cfg
        weights = teacher_confidence(t_logits) if cfg.foreground_reweight else torch.ones_like(t_logits[..., 0])
        if point_mask is not None:
            weights = weights * point_mask
        if locality is not None:
            weights = weights * locality
        iou_target = paired_iou(s_boxes, t_boxes) if cfg.cls_iou_target else None
        cls = class_kd_loss(s_logits, t_logits, weights, cfg.cls_loss, cfg.temperature, cfg.cls_normalize,
                            cfg.cls_background, iou_target)
        l1, giou = box_kd_losses(s_boxes, t_boxes, weights)
        return {"kd_cls": cfg.cls_weight * cls, "kd_bbox": cfg.bbox_weight * l1, "kd_giou": cfg.giou_weight * giou}

    def forward(self, student: DecoderOutput, teacher: DecoderOutput, point_mask: Optional[Tensor] = None,
                anchors: Optional[Tensor] = None) -> dict[str, Tensor]:
        """`anchors [B, K, 4]`: the points themselves, needed with `locality_reweight`."""
        num_s, num_t = student.logits.shape[0], teacher.logits.shape[0]
        locality = None
        if self.cfg.locality_reweight:
            if anchors is None:
                raise ValueError("kd.locality_reweight needs the points' anchors")
            locality = paired_iou(anchors, teacher.boxes[-1])  # the teacher's answer is about the given box
        losses: dict[str, Tensor] = {}
        for layer in range(num_s):
            t = teacher_layer_for(layer, num_s, num_t, self.cfg.layer_mode)
            terms = self.layer_terms(student.logits[layer], student.boxes[layer],
                                     teacher.logits[t], teacher.boxes[t], point_mask, locality)
            suffix = "" if layer == num_s - 1 else f"_{layer}"
            losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        return losses

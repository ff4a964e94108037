"""The classic "inconsistent points" KD baseline: distil teacher/student predictions paired by Hungarian matching.

As in the released code's `--loss_kd_logits` switch: teacher and student detection outputs are each
Hungarian-matched to the ground truth; the two predictions assigned to the same object form a pair.
Student layer l is paired with the corresponding teacher layer. On each pair: softmax KL with
temperature (mean over classes and pairs) and smooth-L1 on boxes (beta 1/9); weights cls 10, box 1.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kddetr.kd.losses import class_kd_loss, teacher_layer_for
from kddetr.models.protocol import DecoderOutput

Matcher = Callable[[Tensor, Tensor, list[dict[str, Tensor]]], list[tuple[Tensor, Tensor]]]


def _by_target(matches: list[tuple[Tensor, Tensor]], num_targets: list[int]) -> list[Tensor]:
    """For each image, the query index assigned to each ground-truth object (-1 when unassigned)."""
    out = []
    for (query_idx, target_idx), n in zip(matches, num_targets):
        order = torch.full((n,), -1, dtype=torch.long)
        order[target_idx.cpu()] = query_idx.cpu()
        out.append(order)
    return out


class HungarianKD(nn.Module):
    """Pairs student and teacher predictions through the ground truth they are matched to."""

    def __init__(self, matcher: Matcher, temperature: float = 10.0, cls_weight: float = 10.0,
                 bbox_weight: float = 1.0) -> None:
        super().__init__()
        self.matcher = matcher
        self.temperature = temperature
        self.cls_weight = cls_weight
        self.bbox_weight = bbox_weight

    @torch.no_grad()
    def _pairs(self, student_logits: Tensor, student_boxes: Tensor, teacher_logits: Tensor,
               teacher_boxes: Tensor, targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        sizes = [len(t["labels"]) for t in targets]
        s_order = _by_target(self.matcher(student_logits, student_boxes, targets), sizes)
        t_order = _by_target(self.matcher(teacher_logits, teacher_boxes, targets), sizes)
        batch_idx, s_idx, t_idx = [], [], []
        for b, (s, t) in enumerate(zip(s_order, t_order)):
            keep = (s >= 0) & (t >= 0)
            batch_idx.append(torch.full((int(keep.sum()),), b, dtype=torch.long))
            s_idx.append(s[keep])
            t_idx.append(t[keep])
        return torch.cat(batch_idx), torch.cat(s_idx), torch.cat(t_idx)

    def forward(self, student: DecoderOutput, teacher: DecoderOutput,
                targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        num_s, num_t = student.logits.shape[0], teacher.logits.shape[0]
        losses: dict[str, Tensor] = {}
        for layer in range(num_s):
            t_layer = teacher_layer_for(layer, num_s, num_t, "layerwise")
            s_logits, s_boxes = student.logits[layer], student.boxes[layer]
            t_logits, t_boxes = teacher.logits[t_layer], teacher.boxes[t_layer]
            b, si, ti = (i.to(s_logits.device) for i in self._pairs(s_logits, s_boxes, t_logits, t_boxes, targets))
            suffix = "" if layer == num_s - 1 else f"_{layer}"
            if len(b) == 0:
                zero = s_logits.sum() * 0.0
                losses.update({f"kd_cls{suffix}": zero, f"kd_bbox{suffix}": zero})
                continue
            ones = torch.ones(len(b), device=s_logits.device)
            cls = class_kd_loss(s_logits[b, si], t_logits[b, ti], ones, "kl", self.temperature, normalize=True)
            box = F.smooth_l1_loss(s_boxes[b, si].float(), t_boxes[b, ti].float(), beta=1 / 9)
            losses[f"kd_cls{suffix}"] = self.cls_weight * cls
            losses[f"kd_bbox{suffix}"] = self.bbox_weight * box
        return losses

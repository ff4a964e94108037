"""Hungarian matching between a detector's predictions and a set of target boxes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]


def assign(cost: Tensor, sizes: list[int]) -> Indices:
    """Optimal assignment per image of a cost `[B, Q, sum(sizes)]` whose last axis holds each image's targets in turn.

    Returns `(query_idx, target_idx)` int64 pairs per image, sorted by query index.
    """
    cost = cost.detach().float().cpu()
    indices = []
    for b, c in enumerate(cost.split(sizes, dim=-1)):
        rows, cols = linear_sum_assignment(c[b].numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


class HungarianMatcher(nn.Module):
    """One-to-one matching with the DAB/Deformable-DETR cost: focal class cost, L1 on cxcywh and -GIoU.

    Pass targets built from another model's outputs (argmax labels, boxes) to match two models' predictions.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        """Pairwise cost `[B, Q, N]` of every query against all N targets of the batch (concatenated)."""
        B, Q, _ = logits.shape
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device).float()
        logits, boxes = logits.flatten(0, 1).float(), boxes.flatten(0, 1).float()

        # Focal loss of labelling a query positive minus that of labelling it background, at each target's class.
        prob = logits.sigmoid()
        a, g = self.focal_alpha, self.focal_gamma
        pos = a * (1 - prob) ** g * -F.logsigmoid(logits)
        neg = (1 - a) * prob ** g * -F.logsigmoid(-logits)
        cost_class = (pos - neg)[:, tgt_labels]
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                         box_convert(tgt_boxes, "cxcywh", "xyxy"))
        cost = self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        return cost.view(B, Q, -1)

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> Indices:
        """`logits [B, Q, C]` (raw), `boxes [B, Q, 4]` cxcywh; targets with `labels [n]`, `boxes [n, 4]` cxcywh."""
        indices = assign(self.cost(logits, boxes, targets), [len(t["boxes"]) for t in targets])
        return [(q.to(logits.device), t.to(logits.device)) for q, t in indices]

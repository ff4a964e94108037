"""Collapse diagnostic: how much a tensor varies across the images of a batch, relative to its total spread.

A DETR that collapses to image-independent predictions drives these ratios towards 0 within a few
hundred steps (see cpu-convergence.md); a learning run keeps them well above 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kddetr.models.protocol import DetectorOutput


def across_image_spread(x: Tensor) -> float:
    """Mean over elements of the std across the batch axis, divided by the std of all elements."""
    if x.shape[0] < 2:
        return float("nan")
    x = x.detach().float()
    total = x.std()
    if total <= 0:
        return 0.0
    return float(x.std(dim=0).mean() / total)


@torch.no_grad()
def collapse_stats(outputs: DetectorOutput) -> dict[str, float]:
    stats = {"spread/boxes": across_image_spread(outputs.pred_boxes),
             "spread/logits": across_image_spread(outputs.pred_logits)}
    if outputs.encoder_memory is not None:
        stats["spread/encoder"] = across_image_spread(outputs.encoder_memory)
    return stats

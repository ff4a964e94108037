"""Detector tests; inputs shared by them."""
from __future__ import annotations

import torch

from kddetr.models.protocol import ImageBatch, Queries


def image_batch(batch_size: int = 2, size: int = 64) -> ImageBatch:
    torch.manual_seed(1)
    return ImageBatch(torch.randn(batch_size, 3, size, size), torch.zeros(batch_size, size, size, dtype=torch.bool))


def extra_groups(batch_size: int = 2, dim: int = 32) -> list[Queries]:
    """Two distillation-style groups: shared random anchors, and per-image anchors with content."""
    gen = torch.Generator().manual_seed(2)
    random_anchors = Queries(torch.rand(1, 5, 4, generator=gen).expand(batch_size, -1, -1))
    with_content = Queries(torch.rand(batch_size, 4, 4, generator=gen), torch.randn(batch_size, 4, dim, generator=gen))
    return [random_anchors, with_content]

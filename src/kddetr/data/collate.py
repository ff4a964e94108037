"""Batch images of different sizes: zero-pad bottom/right to a common size, mask the padding."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kddetr.models.protocol import ImageBatch


def collate(batch: Sequence[tuple[Tensor, dict[str, Tensor]]],
            size_divisibility: int = 1) -> tuple[ImageBatch, list[dict[str, Tensor]]]:
    """`[(image [3,h,w], target)] -> (ImageBatch [B,3,H,W] + mask True on padding, [target])`.

    H and W are the largest image height and width, rounded up to a multiple of `size_divisibility`
    (use `functools.partial(collate, size_divisibility=32)` as a DataLoader `collate_fn`).
    """
    images, targets = zip(*batch)
    height = math.ceil(max(im.shape[-2] for im in images) / size_divisibility) * size_divisibility
    width = math.ceil(max(im.shape[-1] for im in images) / size_divisibility) * size_divisibility
    tensors = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for tensor, m, image in zip(tensors, mask, images):
        h, w = image.shape[-2:]
        tensor[:, :h, :w].copy_(image)
        m[:h, :w] = False
    return ImageBatch(tensors, mask), list(targets)

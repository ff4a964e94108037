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


def assert_groups_isolated(model: torch.nn.Module) -> tuple[object, object, list[Queries]]:
    """Detection outputs unchanged by extra groups; each group equals its own decode. Returns (plain, memory, groups)."""
    images, groups = image_batch(), extra_groups()
    with torch.no_grad():
        plain = model(images)
        with_extra = model(images, extra_queries=groups)
        memory = model.encode(images)
        alone = [model.decode(memory, group) for group in groups]
    torch.testing.assert_close(with_extra.logits, plain.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_extra.boxes, plain.boxes, atol=1e-6, rtol=0)
    assert len(with_extra.extra) == len(groups)
    for out, ref, group in zip(with_extra.extra, alone, groups):
        assert out.logits.shape == (model.num_decoder_layers, 2, group.num_queries, model.num_classes)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.boxes, ref.boxes, atol=1e-5, rtol=0)
    return plain, memory, groups


def paint_boxes(images: ImageBatch, targets: list[dict[str, torch.Tensor]]) -> None:
    """Bright target boxes on the noise images (in place), so that there is something to find."""
    for t, image in zip(targets, images.tensors):
        h_img, w_img = image.shape[-2:]
        for cx, cy, w, h in t["boxes"].tolist():
            image[:, int((cy - h / 2) * h_img):int((cy + h / 2) * h_img),
                  int((cx - w / 2) * w_img):int((cx + w / 2) * w_img)] = 3


def train_totals(model: torch.nn.Module, criterion, images: ImageBatch, targets: list[dict[str, torch.Tensor]],
                 steps: int, lr: float = 1e-3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train `steps` AdamW steps on one batch: the total loss of every step and the last step's terms."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    totals, losses = [], {}
    for _ in range(steps):
        losses = criterion(model(images, targets), targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total.detach()))
    return totals, losses

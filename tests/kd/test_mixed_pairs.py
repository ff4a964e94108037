"""Mixed teacher/student pairs through the distiller: anchor-box points mean the same to DINO and DAB-DETR."""
from __future__ import annotations

import pytest
import torch

from kddetr.config import BackboneConfig, DenoisingConfig, KDConfig, ModelConfig
from kddetr.kd.distiller import Distiller
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.protocol import ImageBatch

CLASSES = 3
BACKBONE = BackboneConfig(name="resnet10", num_stages=3)
CONFIGS = {
    "dab_detr": ModelConfig(backbone=BACKBONE, hidden_dim=32, num_heads=4, encoder_layers=1, decoder_layers=2,
                            dim_feedforward=64, num_queries=6, activation="relu",
                            denoising=DenoisingConfig(enabled=True, num_groups=2)),
    "dino": ModelConfig(arch="dino", backbone=BACKBONE, hidden_dim=32, num_heads=4, encoder_layers=1,
                        decoder_layers=2, dim_feedforward=64, num_queries=8, activation="relu", num_feature_levels=2,
                        denoising=DenoisingConfig(enabled=True, num_groups=2, contrastive=True)).replace(num_points=2),
}


def batch() -> tuple[ImageBatch, list[dict]]:
    gen = torch.Generator().manual_seed(1)
    images = ImageBatch(torch.randn(2, 3, 64, 64, generator=gen), torch.zeros(2, 64, 64, dtype=torch.bool))
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .6, .4, .3]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[.5, .5, .5, .6]])}]
    return images, targets


@pytest.mark.parametrize("teacher_arch,student_arch", [("dino", "dab_detr"), ("dab_detr", "dino")])
def test_distils_across_architectures(teacher_arch: str, student_arch: str) -> None:
    torch.manual_seed(0)
    teacher = build_detector(CONFIGS[teacher_arch], CLASSES)
    with torch.no_grad():  # an untrained teacher would predict what the untrained student does: the priors
        for name, p in teacher.named_parameters():
            if name.startswith(("class_embed", "bbox_embed")):
                p.add_(0.3 * torch.randn_like(p))
    student = build_detector(CONFIGS[student_arch], CLASSES)
    criterion = build_criterion(CONFIGS[student_arch], CLASSES)
    distiller = Distiller(student, teacher, criterion, KDConfig(general_points=10)).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    images, targets = batch()
    totals, kd = [], []
    for _ in range(4):
        outputs, losses = distiller(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
        kd.append(sum(v.item() for k, v in losses.items() if "/kd_" in k))
    specific = teacher.num_queries
    assert [o.logits.shape[2] for o in outputs.extra] == [10, specific]  # general points, the teacher's queries
    assert outputs.denoising is not None and any(k.startswith("dn_") for k in losses)  # DN beside the KD groups
    assert {"general/kd_cls", "specific/kd_bbox", "specific/kd_giou_0"} <= set(losses)
    assert all(torch.isfinite(torch.tensor(totals + kd)))
    assert all(p.grad is None for p in teacher.parameters())
    assert min(totals[1:]) < totals[0] and min(kd[1:]) < kd[0], (totals, kd)

"""Heterogeneous KD: a DAB-DETR teacher distilled into a Faster R-CNN student through the detector protocol."""
from pathlib import Path

import torch

from kddetr.config import KDConfig, load_config
from kddetr.kd.distiller import Distiller
from kddetr.kd.losses import class_kd_loss
from kddetr.kd.points import StudentProposals, build_samplers
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.protocol import ImageBatch
from tests.kd import kd_on_fresh_points_ratio
from tests.models.test_faster_rcnn import NUM_CLASSES, tiny_config

TINY = Path(__file__).parent.parent / "fixtures" / "tiny.yaml"


def _models(seed: int = 0):
    torch.manual_seed(seed)
    teacher = build_detector(load_config(TINY, ["model.decoder_layers=3"]).model, NUM_CLASSES)
    student_cfg = tiny_config()
    return teacher, build_detector(student_cfg, NUM_CLASSES), student_cfg


def _batch():
    g = torch.Generator().manual_seed(5)
    images = ImageBatch(torch.randn(2, 3, 64, 64, generator=g), torch.zeros(2, 64, 64, dtype=torch.bool))
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.4]])}
               for _ in range(2)]
    return images, targets


def test_background_mapping_compares_objectness():
    teacher = torch.tensor([[4.0, -6.0, -6.0], [-6.0, -6.0, -6.0]])  # a confident class-0 point, a background point
    weights = torch.ones(2)
    kl = lambda s, bg: float(class_kd_loss(s, teacher, weights, "kl", 1.0, background=bg))  # noqa: E731
    assert kl(teacher.clone(), True) < 1e-6
    shifted = teacher + 5.0  # same per-class ranking, but every class now beats background
    assert kl(shifted, False) < 1e-6 < kl(shifted, True)  # without background the shift is invisible


def test_distill_step_losses_and_frozen_teacher():
    teacher, student, cfg = _models()
    kd_cfg = KDConfig(general_points=16, cls_background=True)
    distiller = Distiller(student, teacher, build_criterion(cfg, NUM_CLASSES), kd_cfg).train()
    images, targets = _batch()
    outputs, losses = distiller(images, targets)
    sum(losses.values()).backward()
    assert outputs.extra[0].logits.shape == (1, 2, 16, NUM_CLASSES)
    assert outputs.extra[1].logits.shape[2] == teacher.num_queries  # the teacher's learned queries
    expected = {"loss_classifier", "loss_objectness", "general/kd_cls", "general/kd_giou", "specific/kd_bbox"}
    assert expected <= set(losses)
    assert all(p.grad is None for p in teacher.parameters())
    assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_kd_loss_falls_on_fresh_points():
    teacher, student, _ = _models(seed=1)
    kd_cfg = KDConfig(general_points=32, general_distribution="uniform", specific_points=False, cls_background=True)
    distiller = Distiller(student, teacher, lambda out, tgt: {}, kd_cfg).train()  # KD terms only
    images, targets = _batch()
    assert kd_on_fresh_points_ratio(distiller, images, targets, steps=25) < 0.6


def test_student_proposals_are_the_proposals_of_the_step():
    _, student, _ = _models()
    student.train()
    images, targets = _batch()
    assert [s.name for s in build_samplers(KDConfig(student_proposals=True))] == ["general", "specific", "proposals"]
    with torch.no_grad():
        queries = StudentProposals()(2, torch.device("cpu"), student=student, student_memory=student.encode(images))
        outputs = student(images, targets, extra_queries=[queries])
    # the student's detection queries in training are its RPN proposals: the same boxes, the same predictions
    assert torch.allclose(outputs.extra[0].logits, outputs.logits, atol=1e-5)
    assert torch.allclose(outputs.extra[0].boxes, outputs.boxes, atol=1e-5)


def test_distiller_decodes_the_students_own_proposals():
    teacher, student, cfg = _models()
    kd_cfg = KDConfig(general_points=8, student_proposals=True, cls_background=True)
    distiller = Distiller(student, teacher, build_criterion(cfg, NUM_CLASSES), kd_cfg).train()
    images, targets = _batch()
    outputs, losses = distiller(images, targets)
    sum(losses.values()).backward()
    assert {"proposals/kd_cls", "proposals/kd_bbox", "proposals/kd_giou"} <= set(losses)
    # the third group is the student's proposals of this step: its predictions are the detection predictions
    assert torch.allclose(outputs.extra[2].logits, outputs.logits, atol=1e-5)

"""The distiller with real (tiny) DAB-DETRs: isolation, frozen teacher, and that KD moves the student."""
import math
from pathlib import Path

import pytest
import torch

from kddetr.config import KDConfig, load_config
from kddetr.kd.distiller import Distiller
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.protocol import ImageBatch
from tests.kd import kd_on_fresh_points_ratio

TINY = Path(__file__).parent.parent / "fixtures" / "tiny.yaml"
NUM_CLASSES = 5


def _models(seed=0):
    torch.manual_seed(seed)
    teacher_cfg = load_config(TINY, ["model.hidden_dim=48", "model.decoder_layers=3"]).model
    student_cfg = load_config(TINY).model
    return build_detector(teacher_cfg, NUM_CLASSES), build_detector(student_cfg, NUM_CLASSES), student_cfg


def _batch(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    images = ImageBatch(torch.randn(n, 3, 64, 64, generator=g), torch.zeros(n, 64, 64, dtype=torch.bool))
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}
               for _ in range(n)]
    return images, targets


def test_detection_outputs_unchanged_by_distillation_groups():
    teacher, student, cfg = _models()
    distiller = Distiller(student, teacher, build_criterion(cfg, NUM_CLASSES), KDConfig(general_points=20))
    images, targets = _batch()
    student.eval()
    with torch.no_grad():
        plain = student(images)
        outputs, _ = distiller(images, targets)
    assert len(outputs.extra) == 2 and outputs.extra[0].logits.shape[2] == 20
    assert outputs.extra[1].logits.shape[2] == teacher.num_queries
    assert torch.allclose(plain.logits, outputs.logits, atol=1e-6)
    assert torch.allclose(plain.boxes, outputs.boxes, atol=1e-6)


def test_teacher_frozen_student_trained_and_loss_names():
    teacher, student, cfg = _models()
    distiller = Distiller(student, teacher, build_criterion(cfg, NUM_CLASSES), KDConfig(general_points=20)).train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    images, targets = _batch()
    for _ in range(2):
        _, losses = distiller(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for group in ("general", "specific"):
        for term in ("kd_cls", "kd_bbox", "kd_giou", "kd_cls_0"):
            assert f"{group}/{term}" in losses
    assert "loss_ce" in losses and not any(k.startswith("general/loss") for k in losses)


def test_mismatched_classes_refused():
    teacher, student, cfg = _models()
    other = build_detector(cfg, NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="classes"):
        Distiller(other, teacher, build_criterion(cfg, NUM_CLASSES + 1), KDConfig())


def test_distillation_moves_student_towards_teacher_on_fresh_points():
    teacher, student, cfg = _models(seed=1)
    kd_cfg = KDConfig(general_points=32, general_distribution="uniform", seed=0)
    distiller = Distiller(student, teacher, lambda out, tgt: {}, kd_cfg).train()  # KD terms only
    images, targets = _batch(seed=3)
    assert kd_on_fresh_points_ratio(distiller, images, targets, steps=40) < 0.6


def test_general_weight_scales_the_general_group_only():
    """The same step (same points: the samplers' generators start from kd.seed) with kd.general_weight 0.25:
    every general-group term is a quarter, the specific group and the detection loss are unchanged."""
    teacher, student, cfg = _models()
    images, targets = _batch()
    losses = {}
    for weight in (1.0, 0.25):
        distiller = Distiller(student, teacher, build_criterion(cfg, NUM_CLASSES),
                              KDConfig(general_points=20, general_weight=weight)).eval()
        with torch.no_grad():
            losses[weight] = distiller(images, targets)[1]
    for key, value in losses[1.0].items():
        scale = 0.25 if key.startswith("general/") else 1.0
        assert torch.allclose(losses[0.25][key], scale * value, rtol=1e-5, atol=1e-7), key
    assert any(k.startswith("general/") for k in losses[1.0]) and any(k.startswith("specific/") for k in losses[1.0])


def test_fade_scales_every_kd_term_then_stops_the_teacher(monkeypatch):
    """kd.fade_steps: at step k every KD term is the constant-weight one x (1 + cos(pi k / N)) / 2, the detection
    loss unchanged; from step N the teacher is not run and only the detection loss remains."""
    teacher, student, cfg = _models()
    images, targets = _batch()
    criterion = build_criterion(cfg, NUM_CLASSES)
    constant = Distiller(student, teacher, criterion, KDConfig(general_points=20)).eval()
    faded = Distiller(student, teacher, criterion, KDConfig(general_points=20, fade_steps=4)).eval()
    start = constant.extra_state()
    with torch.no_grad():
        reference = constant(images, targets)[1]
        for step, factor in ((0, 1.0), (1, 0.5 * (1 + 2 ** -0.5)), (2, 0.5)):
            faded.load_extra_state(start | {"steps_taken": step})  # the same points at each step
            losses = faded(images, targets)[1]
            assert losses.keys() == reference.keys()
            for key, value in reference.items():
                scale = factor if key.startswith(("general/", "specific/")) else 1.0
                assert torch.allclose(losses[key], scale * value, rtol=1e-5, atol=1e-7), (step, key)
        monkeypatch.setattr(teacher, "encode", lambda *a: pytest.fail("the teacher ran after the fade"))
        faded.steps_taken = 4
        losses = faded(images, targets)[1]
    assert set(losses) == {k for k in reference if "/" not in k}
    for key, value in losses.items():
        assert torch.allclose(value, reference[key], rtol=1e-5, atol=1e-7), key


def test_training_steps_are_counted_and_checkpointed():
    teacher, student, cfg = _models()
    kd_cfg = KDConfig(general_points=4, fade_steps=10)
    distiller = Distiller(student, teacher, build_criterion(cfg, NUM_CLASSES), kd_cfg)
    images, targets = _batch()
    distiller.train()
    for _ in range(2):
        distiller(images, targets)
    with torch.no_grad():
        distiller.eval()(images, targets)  # evaluation is not a training step
    resumed = Distiller(student, teacher, build_criterion(cfg, NUM_CLASSES), kd_cfg)
    resumed.load_extra_state(distiller.extra_state())
    assert distiller.steps_taken == resumed.steps_taken == 2
    assert resumed.terms.fade(resumed.steps_taken) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))

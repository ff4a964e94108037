"""What every registered detector must do, run for each registry entry: a new detector gets these checks for free.

The protocol in full; distillation groups isolated from the detection queries and from each other; a KD-DETR
step (teacher and student of the architecture) that trains the student only; learning (the loss of one batch
falls); checkpoints that reload to the same outputs; class rows for fine-tuning; and, for every detector with an
HF converter, the same outputs as its HF transformers counterpart. Tests tied to one detector's reference
(hand-checked values, official checkpoints, AP after overfitting) live beside it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kddetr.config import KDConfig, load_config
from kddetr.engine.checkpoint import DatasetInfo, load_checkpoint, save_checkpoint
from kddetr.kd.distiller import Distiller
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.protocol import Detector, ImageBatch, Queries
from kddetr.registry import REGISTRY

ROOT = Path(__file__).parents[2]
CLASSES = 4
SIZE = 96


def tiny_config(arch: str):
    """The arch's embedded student with random backbone weights and two decoder layers (fast, same code paths)."""
    entry = REGISTRY[arch]
    assert entry.student_config is not None, f"{arch}: the registry entry needs a student_config"
    cfg = load_config(ROOT / entry.student_config, ["model.backbone.weights=null"])
    if entry.set_prediction:
        cfg.model = dataclasses.replace(cfg.model, decoder_layers=2, encoder_layers=1)
    return cfg


def batch() -> tuple[ImageBatch, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = ImageBatch(torch.randn(2, 3, SIZE, SIZE, generator=g), torch.zeros(2, SIZE, SIZE, dtype=torch.bool))
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.4]])
    targets = [{"labels": torch.tensor([1, 3]), "boxes": boxes, "orig_size": torch.tensor([SIZE, SIZE]),
                "size": torch.tensor([SIZE, SIZE])} for _ in range(2)]
    return images, targets


def groups(sizes: tuple[int, ...] = (7, 5)) -> list[Queries]:
    g = torch.Generator().manual_seed(1)
    return [Queries(torch.rand(2, n, 4, generator=g) * 0.5 + 0.25) for n in sizes]


ARCHS = list(REGISTRY)


@pytest.mark.parametrize("arch", ARCHS)
def test_meets_the_detector_protocol(arch: str) -> None:
    torch.manual_seed(0)
    model = build_detector(tiny_config(arch).model, CLASSES).eval()
    assert isinstance(model, Detector) and model.num_classes == CLASSES
    images, _ = batch()
    with torch.no_grad():
        memory = model.encode(images)
        own = model.learned_queries(2, memory)
        out = model.decode(memory, None)
    assert own.anchors.shape[:1] == (2,) and own.anchors.shape[-1] == 4
    assert out.logits.shape[:2] == (model.num_decoder_layers, 2) and out.logits.shape[-1] == CLASSES
    assert out.boxes.shape[-1] == 4 and ((out.boxes >= 0) & (out.boxes <= 1)).all()
    assert all(isinstance(v, float) and v > 0 for v in model.lr_multipliers().values())


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_are_isolated_from_the_detection_queries_and_each_other(arch: str) -> None:
    torch.manual_seed(0)
    model = build_detector(tiny_config(arch).model, CLASSES).eval()
    images, _ = batch()
    first, second = groups()
    with torch.no_grad():
        plain = model(images)
        both = model(images, extra_queries=[first, second])
        alone = model(images, extra_queries=[second])
        memory = model.encode(images)
        decoded = model.decode_groups(memory, [first, second])
    torch.testing.assert_close(both.logits, plain.logits, atol=1e-5, rtol=0)  # detection queries see no point
    torch.testing.assert_close(both.boxes, plain.boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(both.extra[1].logits, alone.extra[0].logits, atol=1e-5, rtol=0)  # nor each other
    for out, dec in zip(both.extra, decoded):
        torch.testing.assert_close(out.logits, dec.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.boxes, dec.boxes, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_kd_detr_step_trains_the_student_only(arch: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    teacher, student = build_detector(cfg.model, CLASSES), build_detector(cfg.model, CLASSES)
    distiller = Distiller(student, teacher, build_criterion(cfg.model, CLASSES), KDConfig(general_points=6)).train()
    images, targets = batch()
    _, losses = distiller(images, targets)
    assert any(k.startswith("general/kd_") for k in losses) and any(k.startswith("specific/kd_") for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_checkpoint_reloads_to_the_same_outputs(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    model = build_detector(cfg.model, CLASSES).eval()
    save_checkpoint(tmp_path / "ckpt", model, cfg, DatasetInfo(list(range(1, CLASSES + 1)), list("abcd")))
    loaded = load_checkpoint(tmp_path / "ckpt", torch.device("cpu")).model
    images, _ = batch()
    with torch.no_grad():
        a, b = model.decode(model.encode(images), groups()[0]), loaded.decode(loaded.encode(images), groups()[0])
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_class_rows_cover_every_class(arch: str) -> None:
    model = build_detector(tiny_config(arch).model, CLASSES)
    slots, state = model.class_slots(), model.state_dict()
    assert slots, f"{arch}: class_slots() names no tensor: fine-tuning onto other classes could not map them"
    for name, slot in slots.items():
        assert state[name].shape[0] == slot.first + CLASSES * slot.width, name


@pytest.mark.parametrize("arch", ARCHS)
def test_learns_one_batch(arch: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    model, criterion = build_detector(cfg.model, CLASSES).train(), build_criterion(cfg.model, CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = batch()
    totals = []
    for _ in range(30):
        loss = sum(criterion(model(images, targets), targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        totals.append(float(loss.detach()))
    assert sum(totals[-5:]) < 0.7 * sum(totals[:5]), totals


@pytest.mark.parametrize("arch", [arch for arch, entry in REGISTRY.items() if entry.hf])
def test_matches_its_hf_transformers_counterpart(arch: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from kddetr.interop.hf import converter_for, write_hf

    cfg = tiny_config(arch).model
    cfg = cfg.replace(denoising=dataclasses.replace(cfg.denoising, enabled=False),  # HF: no denoising groups
                      backbone=dataclasses.replace(cfg.backbone, frozen_bn=True))  # and frozen batch norm
    torch.manual_seed(0)
    ours = build_detector(cfg, CLASSES).eval()
    write_hf(tmp_path, cfg, ours.state_dict(), DatasetInfo(list(range(1, CLASSES + 1)), list("abcd")))
    hf = getattr(transformers, converter_for(arch).architecture).from_pretrained(tmp_path).eval()
    images, _ = batch()
    with torch.no_grad():
        out = ours(images)
        ref = hf(pixel_values=images.tensors, pixel_mask=(~images.mask).long())
    torch.testing.assert_close(out.pred_logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-4, rtol=0)

"""Deformable DETR: shapes, levels, the query mapping, isolation of query groups, gradients, overfitting, KD."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from kddetr.config import BackboneConfig, KDConfig, ModelConfig, from_dict
from kddetr.errors import UserError
from kddetr.kd.distiller import Distiller
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.deformable_detr import NOMINAL_SIZE, DeformableDETR
from kddetr.models.protocol import Detector, Queries

from . import assert_groups_isolated, extra_groups, image_batch

CLASSES = 3
VARIANTS = {"plain": dict(), "box_refine": dict(box_refine=True), "two_stage": dict(box_refine=True, two_stage=True)}


def tiny_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(arch="deformable_detr", backbone=BackboneConfig(name="resnet10", num_stages=3), hidden_dim=32,
                      num_heads=4, encoder_layers=1, decoder_layers=2, dim_feedforward=64, num_queries=6,
                      activation="relu", num_feature_levels=2).replace(num_points=2)
    return cfg.replace(**overrides)


def tiny_model(**overrides) -> DeformableDETR:
    torch.manual_seed(0)
    model = build_detector(tiny_config(**overrides), CLASSES)
    for head in model.bbox_embed:  # zero at init: boxes would not depend on the decoder
        nn.init.normal_(head.layers[-1].weight, std=0.1)
    return model


@pytest.mark.parametrize("levels,sequence", [(1, 4 * 4), (2, 8 * 8 + 4 * 4), (4, 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes(variant: str, levels: int, sequence: int) -> None:
    model = tiny_model(num_feature_levels=levels, **VARIANTS[variant]).eval()
    assert isinstance(model, Detector) and model.num_decoder_layers == 2 and model.num_classes == CLASSES
    with torch.no_grad():
        out = model(image_batch(), extra_queries=extra_groups())
    assert out.logits.shape == (2, 2, 6, CLASSES) and out.boxes.shape == (2, 2, 6, 4)
    assert out.encoder_memory.shape == (2, sequence, 32)  # 64 px: C2..C4 at strides 4..16, then stride 32
    assert [o.boxes.shape for o in out.extra] == [(2, 2, 5, 4), (2, 2, 4, 4)]
    assert ((out.boxes > 0) & (out.boxes < 1)).all() and not torch.allclose(out.logits[:, 0], out.logits[:, 1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_learned_queries_reproduce_the_detection_outputs(variant: str) -> None:
    model = tiny_model(**VARIANTS[variant]).eval()
    images = image_batch()
    with torch.no_grad():
        out = model(images)
        memory = model.encode(images)
        queries = model.learned_queries(2, memory)
        decoded = model.decode(memory, queries)
        anchors_only = model.decode(memory, Queries(queries.anchors))
    assert queries.anchors.shape == (2, 6, 4) and ((queries.anchors > 0) & (queries.anchors < 1)).all()
    for got in (decoded, anchors_only):
        torch.testing.assert_close(got.logits, out.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.boxes, out.boxes, atol=1e-6, rtol=0)
    if variant == "two_stage":  # chosen per image from the encoder's proposals
        assert queries.content is None and not torch.allclose(queries.anchors[0], queries.anchors[1])
        with pytest.raises(ValueError, match="memory"):
            model.learned_queries(2)
    else:
        assert (queries.anchors[..., 2:] == NOMINAL_SIZE).all() and queries.content.shape == (2, 6, 32)
        assert torch.equal(queries.anchors[0], queries.anchors[1])


def test_one_stage_anchor_groups_use_the_nearest_learned_query_at_the_anchor_centre() -> None:
    model = tiny_model().eval()
    images = image_batch()
    with torch.no_grad():
        memory = model.encode(images)
        learned = model.learned_queries(2)
        resized = torch.cat((learned.anchors[..., :2], torch.rand(2, 6, 2)), -1)  # sizes are ignored
        same = model.decode(memory, Queries(resized))
        moved = learned.anchors.clone()
        moved[..., :2] = (moved[..., :2] + 0.01).clamp(max=0.999)
        shifted = model.decode(memory, Queries(moved))
        pos, content = model.query_embed.weight.split(32, -1)
        expected = model._decode(content.expand(2, -1, -1), pos.expand(2, -1, -1), moved[..., :2], memory, None)
    detections = model.decode(memory)
    torch.testing.assert_close(same.logits, detections.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(shifted.boxes, expected.boxes, atol=1e-6, rtol=0)
    assert not torch.allclose(shifted.boxes, detections.boxes, atol=1e-3)


@pytest.mark.parametrize("isolation", ["separate", "batch"])
@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_extra_groups_are_isolated(variant: str, isolation: str) -> None:
    model = tiny_model(group_isolation=isolation, **VARIANTS[variant]).eval()
    plain, memory, groups = assert_groups_isolated(model)
    inputs = zip(model._inputs(memory, None), model._inputs(memory, groups[0]))
    joint = model._decode(*[torch.cat(p, 1) for p in inputs], memory, None)
    assert not torch.allclose(joint.logits[:, :, :6], plain.logits, atol=1e-4)  # without isolation groups mix


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_trainable_parameter(variant: str) -> None:
    model = tiny_model(**VARIANTS[variant]).train()
    for name, p in model.named_parameters():  # zero at init: the queries' positions would get no gradient
        if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
            nn.init.normal_(p, std=0.1)
    images = image_batch()
    memory = model.encode(images)
    outputs = model.decode_groups(memory, [None, *extra_groups()])
    loss = sum(o.logits.sum() + o.boxes.sum() for o in outputs)
    if memory.proposals is not None:  # two-stage: what a proposal loss would train
        loss = loss + memory.proposals.logits.sum() + memory.proposals.boxes[memory.proposals.boxes < 1].sum()
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert silent == []


def test_heads_are_shared_without_box_refinement() -> None:
    assert len(tiny_model().class_embed) == 1 and len(tiny_model(box_refine=True).bbox_embed) == 2
    assert len(tiny_model(**VARIANTS["two_stage"]).class_embed) == 3  # + the proposal head
    model = tiny_model(box_refine=True)
    assert model.bbox_embed[0].layers[-1].bias[2:].eq(-2).all() and not model.bbox_embed[1].layers[-1].bias.any()


def test_config_checks() -> None:
    section = {"arch": "deformable_detr", "deformable_detr": {"two_stage": True, "box_refine": True}}
    assert from_dict(ModelConfig, section).options.two_stage
    with pytest.raises(UserError, match="box_refine"):
        tiny_model(two_stage=True)
    with pytest.raises(UserError, match="multiple of 32"):
        tiny_model(hidden_dim=48)


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_overfits_two_images(variant: str) -> None:
    model = tiny_model(**VARIANTS[variant]).train()
    criterion = build_criterion(tiny_config(), CLASSES)
    targets = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([1])}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = image_batch()
    losses = []
    for _ in range(25):
        loss = sum(criterion(model(images, targets), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("teacher_variant,student_arch", [("two_stage", "deformable_detr"), ("plain", "dab_detr"),
                                                          ("two_stage", "dab_detr")])
def test_distiller_runs_with_deformable_teachers(teacher_variant: str, student_arch: str) -> None:
    teacher = tiny_model(**VARIANTS[teacher_variant])
    torch.manual_seed(3)
    student_cfg = tiny_config(hidden_dim=64) if student_arch == "deformable_detr" else ModelConfig(
        backbone=BackboneConfig(name="resnet10", num_stages=3), hidden_dim=32, num_heads=4, encoder_layers=1,
        decoder_layers=2, dim_feedforward=64, num_queries=6)
    student = build_detector(student_cfg, CLASSES)
    cfg = KDConfig(general_points=7)
    distiller = Distiller(student, teacher, build_criterion(student_cfg, CLASSES), cfg).train()
    targets = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3]]), "labels": torch.tensor([1])}] * 2
    outputs, losses = distiller(image_batch(), targets)
    assert [o.logits.shape[2] for o in outputs.extra] == [7, 6]  # general points, the teacher's queries
    assert {"general/kd_cls", "specific/kd_bbox", "loss_ce"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone.body.conv1.weight.grad.any()


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_runs_under_bfloat16_autocast(variant: str) -> None:
    model = tiny_model(**VARIANTS[variant]).eval()
    with torch.no_grad():
        full = model(image_batch(), extra_queries=extra_groups())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(image_batch(), extra_queries=extra_groups())
    assert half.logits.dtype == torch.bfloat16 and torch.isfinite(half.logits).all()
    for a, b in zip([half, *half.extra], [full, *full.extra]):
        torch.testing.assert_close(a.boxes.float(), b.boxes, atol=0.02, rtol=0)

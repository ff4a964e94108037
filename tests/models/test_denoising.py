"""DN-DETR denoising: noise bounds, group layout, the attention mask, isolation in DAB-DETR, loss and overfit."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from kddetr.config import BackboneConfig, DenoisingConfig, ModelConfig, load_config
from kddetr.errors import UserError
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.criterion import denoising_indices
from kddetr.models.denoising import (MIN_SIZE, DenoisingGenerator, denoising_attn_mask, noise_boxes, noise_corners,
                                     noise_labels)
from kddetr.models.protocol import ImageBatch, Queries

from . import paint_boxes, train_totals

CLASSES, DIM, QUERIES, GROUPS = 3, 32, 6, 3
TINY = Path(__file__).parents[1] / "fixtures" / "tiny.yaml"


def config(**overrides) -> ModelConfig:
    dn = DenoisingConfig(enabled=True, num_groups=GROUPS)
    cfg = ModelConfig(backbone=BackboneConfig(name="resnet10", num_stages=3), hidden_dim=DIM, num_heads=4,
                      encoder_layers=1, decoder_layers=2, dim_feedforward=64, num_queries=QUERIES, denoising=dn)
    return cfg.replace(**overrides)


def model(**overrides) -> nn.Module:
    torch.manual_seed(0)
    detector = build_detector(config(**overrides), CLASSES).train()
    nn.init.normal_(detector.bbox_embed.layers[-1].weight, std=0.1)  # zero at init: boxes would equal anchors
    return detector


def batch() -> tuple[ImageBatch, list[dict]]:
    gen = torch.Generator().manual_seed(1)
    images = ImageBatch(torch.randn(2, 3, 64, 64, generator=gen), torch.zeros(2, 64, 64, dtype=torch.bool))
    targets = [{"labels": torch.tensor([0, 2, 1]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .5, .4, .3],
                                                                          [.5, .8, .1, .2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[.5, .5, .5, .6]])}]
    return images, targets


def extra_groups() -> list[Queries]:
    gen = torch.Generator().manual_seed(2)
    return [Queries(torch.rand(2, 5, 4, generator=gen)),
            Queries(torch.rand(2, 4, 4, generator=gen), torch.randn(2, 4, DIM, generator=gen))]


def assert_same(a, b, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.logits, b.logits, atol=atol, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)


def test_noise_stays_within_its_bounds_and_uses_them() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(20000, 1)
    noised = noise_boxes(boxes, 0.4, torch.Generator().manual_seed(0))
    shift, ratio = (noised[:, :2] - boxes[:, :2]).abs() / (boxes[:, 2:] / 2), noised[:, 2:] / boxes[:, 2:]
    assert shift.max() <= 0.4 + 1e-6 and shift.max() > 0.39
    assert ratio.min() >= 0.6 - 1e-6 and ratio.max() <= 1.4 + 1e-6 and ratio.min() < 0.61 and ratio.max() > 1.39
    edge = noise_boxes(torch.tensor([[0.01, 0.99, 1.0, 0.9]]).repeat(1000, 1), 1.0)
    assert edge.min() >= 0 and edge.max() <= 1 and edge[:, 2:].min() > 0
    assert torch.equal(noise_boxes(boxes, 0.0), boxes)

    labels = torch.randint(1000, (20000,), generator=torch.Generator().manual_seed(1))
    changed = (noise_labels(labels, 0.2, 1000) != labels).float().mean()
    assert 0.18 < changed < 0.22  # a drawn class equals the old one only 1 time in 1000
    assert torch.equal(noise_labels(labels, 0.0, 1000), labels)
    assert noise_labels(labels, 1.0, 5).max() < 5


def test_groups_follow_the_criterion_layout() -> None:
    torch.manual_seed(0)
    cfg = DenoisingConfig(enabled=True, num_groups=GROUPS, label_noise=0.0, box_noise=0.4)
    generator = DenoisingGenerator(cfg, CLASSES, DIM)
    _, targets = batch()
    groups = generator(targets, torch.Generator().manual_seed(3))
    pad = 3  # the most targets of an image
    assert groups.meta == {"num_groups": GROUPS, "single_pad": pad, "contrastive": False} and groups.single_pad == pad
    assert groups.queries.anchors.shape == (2, GROUPS * pad, 4)
    assert groups.queries.content.shape == (2, GROUPS * pad, DIM)
    indices = denoising_indices([3, 1], GROUPS, pad)
    for b, (target, (query_idx, target_idx)) in enumerate(zip(targets, indices)):
        assert torch.equal(groups.valid[b].nonzero().flatten(), query_idx.sort().values)
        anchors, content = groups.queries.anchors[b, query_idx], groups.queries.content[b, query_idx]
        truth = target["boxes"][target_idx]
        assert ((anchors[:, :2] - truth[:, :2]).abs() <= 0.4 * truth[:, 2:] / 2 + 1e-6).all()
        assert not torch.allclose(anchors, truth)
        expected = torch.cat((generator.label_embed(target["labels"][target_idx]), torch.ones(len(target_idx), 1)), 1)
        torch.testing.assert_close(content, expected)
    again = generator(targets, torch.Generator().manual_seed(3))
    assert torch.equal(again.queries.anchors, groups.queries.anchors)

    empty = generator([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2)
    assert empty.queries.anchors.shape == (2, 0, 4) and empty.single_pad == 0


def test_mask_rule() -> None:
    valid = torch.tensor([[True, True], [True, False]]).repeat(1, 2)  # 2 groups, pad 2; image 1 has one target
    blocked = denoising_attn_mask(valid, 2, [3, 2])  # then 3 detection queries and one extra group of 2
    assert blocked.shape == (2, 9, 9)
    dn0, dn1, det, extra = slice(0, 2), slice(2, 4), slice(4, 7), slice(7, 9)
    assert blocked[:, det, :4].all() and blocked[:, dn0, dn1].all() and blocked[:, dn1, dn0].all()
    assert not blocked[:, dn0, det].any() and not blocked[:, det, det].any()  # denoising sees detection (DN-DETR)
    assert blocked[:, extra, :7].all() and blocked[:, :7, extra].all() and not blocked[:, extra, extra].any()
    assert not blocked[0, dn0, dn0].any()
    assert blocked[1, :, [1, 3]].sum() == 2 * 9 - 2 and not blocked[1, 1, 1] and not blocked[1, 3, 3]  # padding


@pytest.mark.parametrize("isolation", ["separate", "batch"])
def test_denoising_does_not_change_the_detection_and_extra_outputs(isolation: str) -> None:
    detector = model(group_isolation=isolation)
    images, targets = batch()
    with torch.no_grad():
        plain = detector(images, extra_queries=extra_groups())
        noised = detector(images, targets, extra_queries=extra_groups())
    assert plain.denoising is None
    assert noised.denoising_meta == {"num_groups": GROUPS, "single_pad": 3, "contrastive": False}
    assert noised.denoising.logits.shape == (2, 2, GROUPS * 3, CLASSES) and noised.denoising.boxes.shape[2] == 9
    assert_same(noised, plain)
    for a, b in zip(noised.extra, plain.extra, strict=True):
        assert_same(a, b)


def test_no_denoising_at_inference_or_without_targets() -> None:
    detector = model()
    images, targets = batch()
    with torch.no_grad():
        assert detector(images).denoising is None
        assert detector.eval()(images, targets).denoising is None
    off = build_detector(config(denoising=DenoisingConfig(enabled=False)), CLASSES)
    assert off.denoising is None and not any("denoising" in name for name, _ in off.named_parameters())


def test_groups_and_padding_are_isolated_in_the_decoder() -> None:
    """Changing one denoising group (or a padding query) changes nothing else; detection queries do reach them."""
    detector = model(group_isolation="batch")
    images, targets = batch()

    def decode(dn, learned):
        with torch.no_grad():
            return detector.decode_with_denoising(memory, dn, [learned, *extra_groups()])

    with torch.no_grad():
        memory = detector.encode(images)
        dn = detector.denoising(targets)
        learned = detector.learned_queries(2)
    reference = decode(dn, learned)
    anchors, content = dn.queries.anchors.clone(), dn.queries.content.clone()
    group_1, padding = [3, 4, 5], [1, 2, 4, 5, 7, 8]  # G = 3, P = 3; image 1 has one target
    for b, changed_idx in ((0, group_1), (1, padding)):
        anchors[b, changed_idx] = torch.rand(len(changed_idx), 4) * 0.5 + 0.25
        content[b, changed_idx] = torch.randn(len(changed_idx), DIM)
    changed = decode(dataclasses.replace(dn, queries=Queries(anchors, content)), learned)
    for b, kept in ((0, [0, 1, 2, 6, 7, 8]), (1, [0, 3, 6])):
        torch.testing.assert_close(changed[0].logits[:, b, kept], reference[0].logits[:, b, kept], atol=1e-5, rtol=0)
        torch.testing.assert_close(changed[0].boxes[:, b, kept], reference[0].boxes[:, b, kept], atol=1e-5, rtol=0)
    assert not torch.allclose(changed[0].logits[:, 0, group_1], reference[0].logits[:, 0, group_1], atol=1e-3)
    for a, b in zip(changed[1:], reference[1:]):
        assert_same(a, b)

    moved = Queries(learned.anchors.flip(1), torch.randn(2, QUERIES, DIM))
    assert not torch.allclose(decode(dn, moved)[0].logits, reference[0].logits, atol=1e-3)


def test_criterion_scores_the_denoising_groups() -> None:
    cfg = config()
    detector = model()
    criterion = build_criterion(cfg, CLASSES)
    images, targets = batch()
    out = detector(images, targets, extra_queries=extra_groups())
    losses = criterion(out, targets)
    dn_keys = {f"dn_loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0")}
    assert dn_keys <= losses.keys() and all(torch.isfinite(losses[k]) and losses[k] > 0 for k in dn_keys)
    sum(losses[k] for k in dn_keys).backward()
    assert detector.denoising.label_embed.weight.grad[[0, 1, 2]].abs().sum() > 0

    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = detector(images, empty)
    losses = criterion(out, empty)
    assert out.denoising.logits.shape[2] == 0 and all(torch.isfinite(v) for v in losses.values())


def test_bad_config_is_a_user_error() -> None:
    for bad in (dict(num_groups=0), dict(label_noise=1.5), dict(box_noise=-0.1)):
        with pytest.raises(UserError, match="model.denoising"):
            DenoisingGenerator(DenoisingConfig(enabled=True, **bad), CLASSES, DIM)


def test_overfits_two_images() -> None:
    cfg = load_config(TINY, ["model.denoising.enabled=true", "model.num_queries=10"]).model
    torch.manual_seed(0)
    detector = build_detector(cfg, CLASSES).train()
    criterion = build_criterion(cfg, CLASSES)
    images, targets = batch()
    paint_boxes(images, targets)
    totals, losses = train_totals(detector, criterion, images, targets, steps=40)
    assert any(k.startswith("dn_") for k in losses)
    assert sum(totals[-5:]) / 5 < 0.8 * sum(totals[:5]) / 5


def test_negative_noise_lies_between_one_and_two_times_the_bounds() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.2]]).repeat(20000, 1)  # small: no clamping
    noised = noise_boxes(boxes, 0.4, torch.Generator().manual_seed(0), negative=True)
    shift, ratio = (noised[:, :2] - boxes[:, :2]).abs() / (boxes[:, 2:] / 2), noised[:, 2:] / boxes[:, 2:]
    assert shift.min() >= 0.4 - 1e-5 and shift.max() <= 0.8 + 1e-5 and shift.min() < 0.41 and shift.max() > 0.79
    change = (ratio - 1).abs()
    assert change.min() >= 0.4 - 1e-5 and change.max() <= 0.8 + 1e-5 and (ratio < 1).any() and (ratio > 1).any()
    negative = torch.tensor([[False], [True], [False], [True]])
    mixed = noise_boxes(boxes[:4], 0.4, torch.Generator().manual_seed(0), negative=negative)
    positive = noise_boxes(boxes[:4], 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(mixed[[0, 2]], positive[[0, 2]]) and not torch.allclose(mixed[[1, 3]], positive[[1, 3]])


def test_contrastive_groups_hold_positives_then_negatives() -> None:
    torch.manual_seed(0)
    cfg = DenoisingConfig(enabled=True, num_groups=GROUPS, label_noise=0.0, box_noise=0.4, contrastive=True)
    generator = DenoisingGenerator(cfg, CLASSES, DIM)
    _, targets = batch()
    groups = generator(targets, torch.Generator().manual_seed(3))
    half = 3  # the most targets of an image
    assert groups.meta == {"num_groups": GROUPS, "single_pad": 2 * half, "contrastive": True}
    assert groups.queries.anchors.shape == (2, GROUPS * 2 * half, 4) and groups.valid.shape == (2, GROUPS * 2 * half)
    for b, target in enumerate(targets):
        n, truth = len(target["labels"]), target["boxes"]
        for g in range(GROUPS):
            start = g * 2 * half
            positives, negatives = (box_convert(groups.queries.anchors[b, start + o:start + o + n], "cxcywh", "xyxy")
                                    for o in (0, half))
            bound = 0.4 * truth[:, 2:].repeat(1, 2) / 2  # DINO moves corners
            corners = box_convert(truth, "cxcywh", "xyxy")
            assert ((positives - corners).abs() <= bound + 1e-6).all()
            assert ((negatives - corners).abs().amax(-1) >= bound.amin(-1) - 1e-6).all()
            assert groups.valid[b, start:start + 2 * half].tolist() == ([True] * n + [False] * (half - n)) * 2
            torch.testing.assert_close(groups.queries.content[b, start:start + n],
                                       groups.queries.content[b, start + half:start + half + n])  # same labels


def test_corner_noise_stays_inside_the_image_keeps_box_order_and_uses_its_bounds() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.2]]).repeat(20000, 1)  # small and central: no clamping
    corners = box_convert(boxes, "cxcywh", "xyxy")
    bound = torch.tensor([0.05, 0.1, 0.05, 0.1]) * 0.4
    for negative, (low, high) in ((False, (0.0, 1.0)), (True, (1.0, 2.0))):
        noised = noise_corners(boxes, 0.4, torch.Generator().manual_seed(0), negative=negative)
        moved = (box_convert(noised, "cxcywh", "xyxy") - corners).abs() / bound
        assert moved.min() >= low - 1e-4 and moved.max() <= high + 1e-4
        assert moved.min() < low + 0.01 and moved.max() > high - 0.01  # the whole range is used
    edge = noise_corners(torch.tensor([[0.02, 0.97, 0.04, 0.05]]).repeat(2000, 1), 1.0, negative=True)
    xyxy = box_convert(edge, "cxcywh", "xyxy")
    assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all() and (edge[:, 2:] >= MIN_SIZE).all()
    assert (xyxy[:, 2:] >= xyxy[:, :2]).all()
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]]).repeat(64, 1)
    crossed = noise_corners(boxes, 1.0, negative=True, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws by hand
    magnitude, sign = torch.rand((64, 4), generator=g) + 1, torch.randint(0, 2, (64, 4), generator=g) * 2 - 1
    moved = torch.tensor([[0.45, 0.45, 0.55, 0.55]]) + sign * magnitude * 0.05
    size = moved[:, 2:] - moved[:, :2]
    assert (size < 0).any() and (size > 0).any()
    expected = torch.cat(((moved[:, :2] + moved[:, 2:]) / 2, size.clamp(min=MIN_SIZE)), -1)
    torch.testing.assert_close(crossed, expected)  # a crossed axis collapses to MIN_SIZE at the corners' midpoint
    torch.testing.assert_close(noise_corners(boxes[:3], 0.0), boxes[:3], atol=1e-6, rtol=0)


def test_contrastive_denoising_follows_dino_label_noise_and_query_budget() -> None:
    """Half of `label_noise` is flipped (DINO's `label_noise_ratio * 0.5`), and `query_budget` (its dn_number)
    sets the groups per batch from the most targets of an image."""
    many = [{"labels": torch.zeros(400, dtype=torch.long), "boxes": torch.rand(400, 4) * 0.5 + 0.25}]
    flipped = {}
    for contrastive in (False, True):
        cfg = DenoisingConfig(enabled=True, num_groups=2, label_noise=0.8, contrastive=contrastive)
        generator = DenoisingGenerator(cfg, 1000, DIM)
        out = generator(many, torch.Generator().manual_seed(0))
        embedded = generator.label_embed(torch.zeros(1, dtype=torch.long))
        same = torch.isclose(out.queries.content[0, :, :-1], embedded).all(-1)
        flipped[contrastive] = 1 - same.float().mean().item()
    assert flipped[False] == pytest.approx(0.8, abs=0.03) and flipped[True] == pytest.approx(0.4, abs=0.03)
    budget = DenoisingConfig(enabled=True, contrastive=True, query_budget=100)
    _, targets = batch()  # at most 3 targets per image
    groups = DenoisingGenerator(budget, CLASSES, DIM)(targets)
    assert groups.num_groups == 100 // 3 and groups.queries.anchors.shape[1] == 33 * 2 * 3


def test_unknown_class_content_is_learned_by_the_detection_queries_only() -> None:
    """DN-DAB-DETR's option: detection queries carry a learned "unknown class" vector with indicator 0;
    distillation points keep zero content and specific points share only the anchors."""
    from kddetr.kd.points import SpecificPoints

    detector = model(unknown_class_content=True).train()
    queries = detector.learned_queries(2)
    unknown = detector.unknown_content.weight[0]
    assert queries.content.shape == (2, QUERIES, DIM)
    torch.testing.assert_close(queries.content[1, 3], torch.cat((unknown, torch.zeros(1))))
    assert SpecificPoints()(2, torch.device("cpu"), detector, None).content is None
    images, targets = batch()
    out = detector(images, targets, extra_queries=[Queries(torch.rand(2, 4, 4) * 0.5 + 0.25)])
    criterion = build_criterion(config(), CLASSES)
    sum(criterion(out, targets).values()).backward()
    assert detector.unknown_content.weight.grad.abs().sum() > 0
    assert model().unknown_content is None and model().learned_queries(1).content is None


@pytest.mark.parametrize("contrastive", [False, True])
def test_padding_queries_are_the_middle_box_with_zero_content(contrastive: bool) -> None:
    """Images with fewer targets than the batch's most get padding queries: zero content at (0.5, 0.5, 0.5, 0.5),
    not noised (the references' zero logits); the real queries keep their label embedding and indicator."""
    cfg = DenoisingConfig(enabled=True, num_groups=GROUPS, label_noise=0.0, box_noise=0.4, contrastive=contrastive)
    _, targets = batch()
    groups = DenoisingGenerator(cfg, CLASSES, DIM)(targets, torch.Generator().manual_seed(0))
    padding = ~groups.valid
    assert padding.any() and groups.valid.any()
    assert (groups.queries.anchors[padding] == 0.5).all() and (groups.queries.content[padding] == 0).all()
    assert (groups.queries.content[groups.valid][:, -1] == 1).all()

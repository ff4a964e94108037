"""Set criterion: values against hand-written formulas, aux layers, weights, gradients, denoising, num_boxes."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kddetr.config import LossConfig, ModelConfig
from kddetr.models.criterion import SetCriterion, build_criterion
from kddetr.models.matcher import HungarianMatcher
from kddetr.models.protocol import DecoderOutput, DetectorOutput

ALPHA, GAMMA = 0.3, 1.5
CFG = LossConfig(cls_weight=3.0, bbox_weight=7.0, giou_weight=0.5, focal_alpha=ALPHA, focal_gamma=GAMMA)


def focal(x: float, t: float) -> float:
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (ALPHA * t + (1 - ALPHA) * (1 - t)) * (1 - p_t) ** GAMMA * ce


def one_minus_giou(a: list[float], b: list[float]) -> float:
    corners = [(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) for cx, cy, w, h in (a, b)]
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = corners
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return 1 - (inter / union - (hull - union) / hull)


def criterion(cfg: LossConfig = CFG, num_classes: int = 2, dn_loss_weight: float = 1.0) -> SetCriterion:
    return SetCriterion(num_classes, HungarianMatcher(focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma), cfg,
                        dn_loss_weight)


def random_case(L: int, B: int, Q: int, C: int, sizes: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, B, Q, C, generator=gen, requires_grad=True)
    raw_boxes = torch.randn(L, B, Q, 4, generator=gen, requires_grad=True)
    targets = [{"labels": torch.randint(C, (n,), generator=gen),
                "boxes": torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2,
                                    torch.rand(n, 2, generator=gen) * 0.3 + 0.05], 1)} for n in sizes]
    return logits, raw_boxes, targets


def test_values_by_hand():
    # image 0: one target (class 1), query 1 is the obvious match; image 1: no target, all its queries are background
    tgt = [0.5, 0.5, 0.4, 0.4]
    logits = [[[1.0, -2.0], [-1.0, 0.5]], [[0.3, -0.4], [-1.5, 2.0]]]
    boxes = [[[0.2, 0.2, 0.1, 0.1], [0.55, 0.5, 0.4, 0.2]], [[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.2, 0.1]]]
    out = DetectorOutput(torch.tensor([logits]), torch.tensor([boxes]))
    losses = criterion()(out, [{"labels": torch.tensor([1]), "boxes": torch.tensor([tgt])},
                               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}])
    positive = {(0, 1, 1)}
    ce = sum(focal(logits[b][q][c], float((b, q, c) in positive)) for b in range(2) for q in range(2) for c in range(2))
    l1 = sum(abs(p - t) for p, t in zip(boxes[0][1], tgt))
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert losses["loss_ce"].item() == pytest.approx(3.0 * ce, rel=1e-5)  # num_boxes = 1
    assert losses["loss_bbox"].item() == pytest.approx(7.0 * l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(0.5 * one_minus_giou(boxes[0][1], tgt), rel=1e-5)


def test_normalised_by_num_boxes():
    logits, raw, targets = random_case(1, 2, 6, 2, [1, 3])
    boxes = raw.sigmoid()
    losses = criterion()(DetectorOutput(logits, boxes), targets)
    indices = HungarianMatcher(focal_alpha=ALPHA, focal_gamma=GAMMA)(logits[0], boxes[0], targets)
    l1 = sum((boxes[0, b, q] - t["boxes"][j]).abs().sum().item() for b, (t, (q, j)) in enumerate(zip(targets, indices)))
    assert losses["loss_bbox"].item() == pytest.approx(7.0 * l1 / 4, rel=1e-5)


def test_aux_layers_and_weights():
    logits, raw, targets = random_case(3, 2, 5, 2, [2, 0])
    out = DetectorOutput(logits, raw.sigmoid())
    losses = criterion()(out, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_1")}
    for l, suffix in ((0, "_0"), (1, "_1"), (2, "")):  # each layer matched on its own, as if it were the last
        single = criterion()(DetectorOutput(logits[l:l + 1], raw[l:l + 1].sigmoid()), targets)
        for name in ("loss_ce", "loss_bbox", "loss_giou"):
            assert losses[name + suffix].item() == pytest.approx(single[name].item(), rel=1e-6)
    unit = criterion(LossConfig(cls_weight=1.0, bbox_weight=1.0, giou_weight=1.0, focal_alpha=ALPHA, focal_gamma=GAMMA))
    unweighted = unit(out, targets)
    for key, value in losses.items():
        weight = {"ce": 3.0, "bbox": 7.0, "giou": 0.5}[key.split("_")[1]]
        assert value.item() == pytest.approx(weight * unweighted[key].item(), rel=1e-6)
    no_aux = criterion(LossConfig(aux_loss=False))(out, targets)
    assert set(no_aux) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_gradient_reaches_every_layer():
    logits, raw, targets = random_case(3, 2, 5, 2, [2, 1])
    losses = criterion()(DetectorOutput(logits, raw.sigmoid()), targets)
    sum(losses.values()).backward()
    for l in range(3):
        assert logits.grad[l].abs().sum() > 0 and raw.grad[l].abs().sum() > 0


def test_no_targets_anywhere():
    logits, raw, targets = random_case(2, 2, 3, 2, [0, 0])
    losses = criterion()(DetectorOutput(logits, raw.sigmoid()), targets)
    ce = sum(focal(x, 0.0) for x in logits[-1].flatten().tolist())
    assert losses["loss_ce"].item() == pytest.approx(3.0 * ce, rel=1e-5)  # num_boxes clamped to 1
    assert losses["loss_bbox"].item() == losses["loss_giou"].item() == 0.0
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0


def test_denoising_by_hand():
    G, P, C = 2, 2, 3
    logits, raw, targets = random_case(2, 2, 4, C, [2, 1], seed=3)
    dn_logits, dn_raw, _ = random_case(2, 2, G * P, C, [], seed=4)
    meta = {"num_groups": G, "single_pad": P}
    dn_boxes = dn_raw.sigmoid()
    out = DetectorOutput(logits, raw.sigmoid(), denoising=DecoderOutput(dn_logits, dn_boxes), denoising_meta=meta)
    losses = criterion(num_classes=C, dn_loss_weight=0.5)(out, targets)
    plain = criterion(num_classes=C)(DetectorOutput(logits, raw.sigmoid()), targets)
    assert set(losses) == set(plain) | {"dn_" + k for k in plain}
    for key in plain:
        assert torch.equal(losses[key], plain[key])

    norm = G * 3  # every group reconstructs all 3 boxes of the batch
    for l, suffix in ((0, "_0"), (1, "")):
        ce = l1 = giou = 0.0
        for b, t in enumerate(targets):
            for g in range(G):
                for j in range(len(t["labels"])):
                    q = g * P + j
                    ce += sum(focal(dn_logits[l, b, q, c].item(), float(c == t["labels"][j])) for c in range(C))
                    pred, tgt = dn_boxes[l, b, q].tolist(), t["boxes"][j].tolist()
                    l1 += sum(abs(p - v) for p, v in zip(pred, tgt))
                    giou += one_minus_giou(pred, tgt)
        assert losses["dn_loss_ce" + suffix].item() == pytest.approx(0.5 * 3.0 * ce / norm, rel=1e-5)
        assert losses["dn_loss_bbox" + suffix].item() == pytest.approx(0.5 * 7.0 * l1 / norm, rel=1e-5)
        assert losses["dn_loss_giou" + suffix].item() == pytest.approx(0.5 * 0.5 * giou / norm, rel=1e-5)

    # image 1 has one target: its queries 1 and 3 are padding and must not count
    padded_logits, padded_boxes = dn_logits.detach().clone(), dn_boxes.detach().clone()
    padded_logits[:, 1, [1, 3]] = 9.0
    padded_boxes[:, 1, [1, 3]] = 0.9
    out.denoising = DecoderOutput(padded_logits, padded_boxes)
    again = criterion(num_classes=C, dn_loss_weight=0.5)(out, targets)
    for key in losses:
        assert again[key].item() == pytest.approx(losses[key].item(), rel=1e-6)

    out.denoising_meta = {"num_groups": 3, "single_pad": 2}
    with pytest.raises(ValueError, match="single_pad"):
        criterion(num_classes=C)(out, targets)


def test_build_criterion_reads_config():
    cfg = ModelConfig(loss=LossConfig(cls_weight=2.0, match_bbox_cost=3.0, focal_alpha=0.4, aux_loss=False))
    cfg.denoising.loss_weight = 0.25
    crit = build_criterion(cfg, num_classes=5)
    assert crit.matcher.cost_bbox == 3.0 and crit.matcher.focal_alpha == 0.4
    assert crit.weights["loss_ce"] == 2.0 and crit.dn_loss_weight == 0.25 and crit.num_classes == 5
    with pytest.raises(ValueError, match="classes"):
        crit(DetectorOutput(torch.zeros(1, 1, 2, 4), torch.full((1, 1, 2, 4), 0.5)), [])


def _distributed_worker(rank: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    logits, raw, targets = random_case(1, 1, 4, 2, [3 if rank == 0 else 1], seed=rank)
    out = DetectorOutput(logits, raw.sigmoid())
    results[rank] = criterion()(out, targets)["loss_bbox"].item()
    dist.destroy_process_group()
    results[f"local{rank}"] = criterion()(out, targets)["loss_bbox"].item()


def test_num_boxes_averaged_over_workers(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(str(tmp_path / "store"), results), nprocs=2)
        results = dict(results)
    # 3 and 1 boxes: every worker divides by their mean, 2
    assert results[0] == pytest.approx(results["local0"] * 3 / 2, rel=1e-6)
    assert results[1] == pytest.approx(results["local1"] * 1 / 2, rel=1e-6)


def test_contrastive_denoising_by_hand():
    G, half, C = 2, 2, 3
    logits, raw, targets = random_case(2, 2, 4, C, [2, 1], seed=3)
    dn_logits, dn_raw, _ = random_case(2, 2, G * 2 * half, C, [], seed=4)
    dn_boxes = dn_raw.sigmoid()
    meta = {"num_groups": G, "single_pad": 2 * half, "contrastive": True}
    out = DetectorOutput(logits, raw.sigmoid(), denoising=DecoderOutput(dn_logits, dn_boxes), denoising_meta=meta)
    losses = criterion(num_classes=C)(out, targets)
    norm = G * 3
    for l, suffix in ((0, "_0"), (1, "")):
        ce = l1 = 0.0
        for b, t in enumerate(targets):
            for g in range(G):
                for j in range(len(t["labels"])):
                    positive, negative = g * 2 * half + j, g * 2 * half + half + j
                    ce += sum(focal(dn_logits[l, b, positive, c].item(), float(c == t["labels"][j])) for c in range(C))
                    ce += sum(focal(dn_logits[l, b, negative, c].item(), 0.0) for c in range(C))  # "no object"
                    l1 += sum(abs(p - v) for p, v in zip(dn_boxes[l, b, positive].tolist(), t["boxes"][j].tolist()))
        # padding (image 1: queries 1, 3, 5, 7) is "no object" too, as in DINO
        ce += sum(focal(dn_logits[l, 1, q, c].item(), 0.0) for q in (1, 3, 5, 7) for c in range(C))
        assert losses["dn_loss_ce" + suffix].item() == pytest.approx(3.0 * ce / norm, rel=1e-5)
        assert losses["dn_loss_bbox" + suffix].item() == pytest.approx(7.0 * l1 / norm, rel=1e-5)

    # negatives' and padding's boxes count for nothing; padding scored as "object" costs class loss
    changed_boxes = dn_boxes.detach().clone()
    changed_boxes[:, :, [2, 3, 6, 7]] = 0.9
    changed_boxes[:, 1, [1, 5]] = 0.9
    out.denoising = DecoderOutput(dn_logits, changed_boxes)
    again = criterion(num_classes=C)(out, targets)
    for key in losses:
        assert again[key].item() == pytest.approx(losses[key].item(), rel=1e-6)
    confident = dn_logits.detach().clone()
    confident[:, 1, [1, 3, 5, 7]] = 9.0
    out.denoising = DecoderOutput(confident, dn_boxes)
    assert criterion(num_classes=C)(out, targets)["dn_loss_ce"] > losses["dn_loss_ce"] + 1
    out.denoising_meta = {"num_groups": 4, "single_pad": 2, "contrastive": True}  # 2 targets need 4 per group
    with pytest.raises(ValueError, match="single_pad"):
        criterion(num_classes=C)(out, targets)


@pytest.mark.parametrize("agnostic", [False, True])
def test_encoder_proposals_are_matched_like_a_layer(agnostic: bool):
    logits, raw, targets = random_case(2, 2, 4, 2, [2, 1], seed=5)
    enc_logits, enc_raw, _ = random_case(1, 2, 7, 2, [], seed=6)
    out = DetectorOutput(logits, raw.sigmoid(), encoder_proposals=DecoderOutput(enc_logits, enc_raw.sigmoid()),
                         encoder_class_agnostic=agnostic)
    losses = criterion()(out, targets)
    plain = criterion()(DetectorOutput(logits, raw.sigmoid()), targets)
    assert set(losses) == set(plain) | {"enc_loss_ce", "enc_loss_bbox", "enc_loss_giou"}
    if agnostic:  # every target is class 0; column 1 is trained towards 0 everywhere (the reference's binary targets)
        targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
    alone = criterion(num_classes=2)(DetectorOutput(enc_logits, enc_raw.sigmoid()), targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses["enc_" + name].item() == pytest.approx(alone[name].item(), rel=1e-6)
        assert torch.equal(losses[name], plain[name])


def test_encoder_loss_reaches_the_deformable_proposal_head():
    from kddetr.config import BackboneConfig
    from kddetr.models.build import build_detector
    from kddetr.models.protocol import ImageBatch

    cfg = ModelConfig(arch="deformable_detr", backbone=BackboneConfig(name="resnet10", num_stages=3), hidden_dim=32,
                      num_heads=4, encoder_layers=1, decoder_layers=2, dim_feedforward=64, num_queries=6,
                      num_feature_levels=2).replace(num_points=2, box_refine=True, two_stage=True)
    torch.manual_seed(0)
    model = build_detector(cfg, 3).train()
    images = ImageBatch(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.2]])}] * 2
    out = model(images, targets)
    assert out.encoder_proposals.logits.shape == (1, 2, 8 * 8 + 4 * 4, 3)  # every cell, every class column
    assert out.encoder_class_agnostic  # trained as "object or not" in column 0, the others towards 0
    losses = build_criterion(cfg, 3)(out, targets)
    sum(v for k, v in losses.items() if k.startswith("enc_")).backward()
    box_out = model.bbox_embed[2].layers[-1]  # zero at init, so the layers before it get no gradient yet
    for module in (model.enc_output, model.enc_output_norm, model.class_embed[2], box_out, model.encoder):
        assert all(p.grad is not None and p.grad.any() for p in module.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())  # the decoder has its own terms

import math

import pytest
import torch

from kddetr.config import KDConfig
from kddetr.kd.losses import (DistillationLoss, box_kd_losses, class_kd_loss, paired_iou, teacher_confidence,
                              teacher_layer_for)
from kddetr.models.protocol import DecoderOutput


def _kl_by_hand(s, t, T):
    ps = [math.exp(x / T) for x in s]
    pt = [math.exp(x / T) for x in t]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    return sum(b * math.log(b / a) for a, b in zip(ps, pt)) / len(s) * T * T


def test_teacher_confidence_is_max_sigmoid_and_detached():
    t = torch.tensor([[[0.0, 2.0, -1.0], [-3.0, -4.0, -5.0]]], requires_grad=True)
    w = teacher_confidence(t)
    assert not w.requires_grad
    assert torch.allclose(w, torch.tensor([[1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(3.0))]]))


def test_class_kl_matches_hand_value_weighted_sum():
    s = torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.5, 3.0]])
    t = torch.tensor([[3.0, -1.0, 0.0], [0.0, 2.0, 1.0]])
    w = torch.tensor([0.25, 2.0])
    T = 2.0
    expected = 0.25 * _kl_by_hand(s[0].tolist(), t[0].tolist(), T) + 2.0 * _kl_by_hand(s[1].tolist(), t[1].tolist(), T)
    got = class_kd_loss(s, t, w, "kl", T, normalize=False)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got_norm = class_kd_loss(s, t, w, "kl", T, normalize=True)
    assert got_norm.item() == pytest.approx(expected / 2.25, rel=1e-5)


def test_class_bce_is_binary_kl_by_hand():
    s = torch.tensor([[1.0, -2.0]])
    t = torch.tensor([[0.0, 1.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))
    kl = 0.0
    for a, b in zip(s[0].tolist(), t[0].tolist()):
        p, q = sig(b), sig(a)
        kl += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    got = class_kd_loss(s, t, torch.ones(1), "bce")
    assert got.item() == pytest.approx(kl / 2, rel=1e-5)


def test_class_bce_scaled_targets_by_hand():
    """The teacher's probabilities times the point's scale are the targets; the loss is 0 where they are met."""
    s, t = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))
    targets = [0.5 * sig(b) for b in t[0].tolist()]
    kl = sum(p * math.log(p / sig(a)) + (1 - p) * math.log((1 - p) / (1 - sig(a)))
             for a, p in zip(s[0].tolist(), targets))
    got = class_kd_loss(s, t, torch.ones(1), "bce", target_scale=torch.tensor([0.5]))
    assert got.item() == pytest.approx(kl / 2, rel=1e-5)
    met = torch.logit(torch.tensor([targets]))
    assert class_kd_loss(met, t, torch.ones(1), "bce", target_scale=torch.tensor([0.5])).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="bce"):
        class_kd_loss(s, t, torch.ones(1), "kl", target_scale=torch.tensor([0.5]))


def test_iou_target_scales_the_teacher_scores_by_the_students_box():
    """Same boxes: plain bce KD. A student box off the teacher's: every target is 0 (the student should not be
    confident about a box that misses the teacher's)."""
    s, t = _outputs(1, K=3, seed=20), _outputs(1, K=3, seed=21)
    s.boxes.copy_(t.boxes)
    plain = DistillationLoss(KDConfig(cls_loss="bce"))(s, t)["kd_cls"]
    iou_aware = DistillationLoss(KDConfig(cls_loss="bce", cls_iou_target=True))(s, t)["kd_cls"]
    assert iou_aware.item() == pytest.approx(plain.item(), rel=1e-4)
    t.boxes[:] = torch.tensor([0.25, 0.25, 0.2, 0.2])
    s.boxes[:] = torch.tensor([0.75, 0.75, 0.2, 0.2])
    away = DistillationLoss(KDConfig(cls_loss="bce", cls_iou_target=True))(s, t)["kd_cls"]
    weights = teacher_confidence(t.logits[-1])
    q = s.logits[-1].sigmoid()
    expected = (-(1 - q).log().mean(-1) * weights).sum()
    assert away.item() == pytest.approx(expected.item(), rel=1e-4)


def test_box_losses_by_hand():
    s = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    t = torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.3, 0.3, 0.2, 0.2]])
    w = torch.tensor([1.0, 3.0])
    l1, giou = box_kd_losses(s, t, w)
    # first pair: L1 mean |0.2|/4 = 0.05; IoU = 0.04/0.08 = 0.5, hull = union -> GIoU 0.5; second pair exact.
    assert l1.item() == pytest.approx(1.0 * 0.05 / 4.0, rel=1e-5)
    assert giou.item() == pytest.approx(1.0 * 0.5 / 4.0, abs=1e-5)


def test_giou_penalises_disjoint_boxes_beyond_iou():
    s = torch.tensor([[0.2, 0.5, 0.2, 0.2]])
    t = torch.tensor([[0.8, 0.5, 0.2, 0.2]])
    _, giou = box_kd_losses(s, t, torch.ones(1))
    # IoU 0, hull 0.8 x 0.2 = 0.16, union 0.08 -> GIoU = -0.5 -> loss 1.5
    assert giou.item() == pytest.approx(1.5, rel=1e-5)


def _outputs(layers, B=2, K=5, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DecoderOutput(torch.randn(layers, B, K, C, generator=g), torch.rand(layers, B, K, 4, generator=g) * 0.5 + 0.25)


def test_zero_when_student_equals_teacher_positive_otherwise():
    loss = DistillationLoss(KDConfig())
    t = _outputs(3)
    same = DecoderOutput(t.logits[-1:].expand(3, -1, -1, -1).clone(), t.boxes[-1:].expand(3, -1, -1, -1).clone())
    terms = loss(same, t)
    assert set(terms) == {f"{k}{s}" for k in ("kd_cls", "kd_bbox", "kd_giou") for s in ("", "_0", "_1")}
    assert all(v.abs().item() < 1e-5 for v in terms.values())
    other = loss(_outputs(3, seed=1), t)
    assert all(v.item() > 0 for v in other.values())


def test_every_student_layer_uses_teacher_last_layer_and_weights_applied():
    cfg = KDConfig(cls_weight=1.0, bbox_weight=5.0, giou_weight=2.0, foreground_reweight=False)
    s, t = _outputs(2, seed=3), _outputs(6, seed=4)
    terms = DistillationLoss(cfg)(s, t)
    ones = torch.ones(2, 5)
    l1, giou = box_kd_losses(s.boxes[0], t.boxes[-1], ones)
    assert terms["kd_bbox_0"].item() == pytest.approx(5 * l1.item(), rel=1e-6)
    assert terms["kd_giou_0"].item() == pytest.approx(2 * giou.item(), rel=1e-6)
    cls = class_kd_loss(s.logits[1], t.logits[-1], ones, "kl", 10.0)
    assert terms["kd_cls"].item() == pytest.approx(cls.item(), rel=1e-6)


def test_foreground_reweighting_changes_box_weights():
    s, t = _outputs(1, seed=5), _outputs(1, seed=6)
    on = DistillationLoss(KDConfig(foreground_reweight=True))(s, t)["kd_bbox"]
    w = teacher_confidence(t.logits[0])
    l1, _ = box_kd_losses(s.boxes[0], t.boxes[0], w)
    assert on.item() == pytest.approx(5 * l1.item(), rel=1e-6)
    off = DistillationLoss(KDConfig(foreground_reweight=False))(s, t)["kd_bbox"]
    assert off.item() != pytest.approx(on.item(), rel=1e-3)


def test_point_mask_excludes_points():
    s, t = _outputs(1, seed=7), _outputs(1, seed=8)
    mask = torch.zeros(2, 5)
    mask[:, :2] = 1
    masked = DistillationLoss(KDConfig())(s, t, point_mask=mask)
    cut = DistillationLoss(KDConfig())(DecoderOutput(s.logits[:, :, :2], s.boxes[:, :, :2]),
                                       DecoderOutput(t.logits[:, :, :2], t.boxes[:, :, :2]))
    for k in masked:
        assert masked[k].item() == pytest.approx(cut[k].item(), rel=1e-5)


def test_paired_iou_is_the_iou_of_boxes_at_the_same_place():
    anchors = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    teacher = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    iou = paired_iou(anchors, teacher)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 0.15 / 0.25, 0.0]]))  # shifted by a quarter of its width


def test_locality_reweight_ignores_points_the_teacher_moved_away():
    """A point whose teacher box is far from its anchor adds nothing; near ones keep their (scaled) weight."""
    s, t = _outputs(1, K=4, seed=10), _outputs(1, K=4, seed=11)
    t.boxes[:, :, 2:] = torch.tensor([0.8, 0.8, 0.1, 0.1])
    anchors = t.boxes[-1].clone()
    anchors[:, 2:] = torch.tensor([0.2, 0.2, 0.1, 0.1])  # points 2, 3: the teacher answered about another place
    cfg = KDConfig(locality_reweight=True)
    s.boxes.requires_grad_(True)
    terms = DistillationLoss(cfg)(s, t, anchors=anchors)
    grad, = torch.autograd.grad(sum(terms.values()), s.boxes)
    assert grad[..., 2:, :].abs().max() == 0 and grad[..., :2, :].abs().min() > 0
    near = DistillationLoss(KDConfig())(DecoderOutput(s.logits[:, :, :2], s.boxes[:, :, :2]),
                                        DecoderOutput(t.logits[:, :, :2], t.boxes[:, :, :2]))
    assert terms["kd_bbox"].item() == pytest.approx(near["kd_bbox"].item(), rel=1e-5)  # IoU 1: unchanged weights
    with pytest.raises(ValueError, match="anchors"):
        DistillationLoss(cfg)(s, t)


@pytest.mark.parametrize("s_layers,t_layers,expected", [(6, 6, [0, 1, 2, 3, 4, 5]), (3, 6, [1, 3, 5]), (2, 2, [0, 1])])
def test_layerwise_mapping(s_layers, t_layers, expected):
    assert [teacher_layer_for(l, s_layers, t_layers, "layerwise") for l in range(s_layers)] == expected
    assert {teacher_layer_for(l, s_layers, t_layers, "last") for l in range(s_layers)} == {t_layers - 1}


def test_gradients_reach_student_only():
    s = _outputs(2, seed=9)
    s = DecoderOutput(s.logits.requires_grad_(), s.boxes.requires_grad_())
    t = _outputs(2, seed=10)
    t = DecoderOutput(t.logits.requires_grad_(), t.boxes.requires_grad_())
    sum(DistillationLoss(KDConfig())(s, t).values()).backward()
    assert s.logits.grad.abs().sum() > 0 and s.boxes.grad.abs().sum() > 0
    assert t.logits.grad is None and t.boxes.grad is None

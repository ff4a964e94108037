import pytest
import torch
from torchvision.ops import box_convert

from kddetr.config import KDConfig
from kddetr.errors import UserError
from kddetr.kd.points import (GeneralPoints, NearTeacherPoints, SpecificPoints, build_samplers, load_sampler_states,
                              sampler_states)
from kddetr.models.protocol import ImageBatch, Queries


def test_general_points_shape_range_and_shared_across_batch():
    sampler = GeneralPoints(300, "uniform", seed=0)
    q = sampler(4, torch.device("cpu"))
    assert q.anchors.shape == (4, 300, 4) and q.content is None
    assert (q.anchors > 0).all() and (q.anchors < 1).all()
    assert torch.equal(q.anchors[0], q.anchors[3])


def test_general_points_reproducible_and_resampled_each_step():
    a, b = GeneralPoints(50, "logit_normal", seed=7), GeneralPoints(50, "logit_normal", seed=7)
    first_a, first_b = a(1, "cpu").anchors, b(1, "cpu").anchors
    assert torch.equal(first_a, first_b)
    assert not torch.equal(first_a, a(1, "cpu").anchors)


def test_distributions_differ_as_documented():
    uni = GeneralPoints(20000, "uniform", seed=1).sample_anchors()
    logit = GeneralPoints(20000, "logit_normal", seed=1).sample_anchors()
    assert abs(uni.mean().item() - 0.5) < 0.01 and abs(logit.median().item() - 0.5) < 0.01
    assert uni.std() > logit.std()  # logit-normal clusters at the centre
    assert (uni < 0.1).float().mean() > 2 * (logit < 0.1).float().mean()


def test_sampler_state_roundtrip_resumes_the_stream():
    s = GeneralPoints(10, "uniform", seed=3)
    s(1, "cpu")
    state = sampler_states([s])
    expected = s(1, "cpu").anchors
    fresh = GeneralPoints(10, "uniform", seed=99)
    load_sampler_states([fresh], state)
    assert torch.equal(fresh(1, "cpu").anchors, expected)


class _Teacher:
    def learned_queries(self, batch_size, memory=None):
        anchors = torch.linspace(0.1, 0.9, 12).view(1, 3, 4).expand(batch_size, -1, -1)
        return Queries(anchors=anchors.clone().requires_grad_(), content=torch.ones(batch_size, 3, 8))


def test_specific_points_are_teacher_anchors_without_content():
    q = SpecificPoints()(2, torch.device("cpu"), _Teacher())
    assert q.anchors.shape == (2, 3, 4) and not q.anchors.requires_grad
    assert q.content is None


def test_build_samplers_follows_config():
    assert [s.name for s in build_samplers(KDConfig())] == ["general", "specific"]
    assert [s.name for s in build_samplers(KDConfig(general_points=0))] == ["specific"]
    assert [s.name for s in build_samplers(KDConfig(specific_points=False))] == ["general"]


def test_specific_points_from_final_boxes_are_the_teachers_last_layer_boxes_per_image():
    """With a real DAB-DETR teacher: the anchors are the same for every image, its final boxes are not; the
    final-box points are exactly its last layer's boxes (clamped inside the image), without gradient."""
    from pathlib import Path

    from kddetr.config import load_config
    from kddetr.models.build import build_detector

    torch.manual_seed(0)
    teacher = build_detector(load_config(Path(__file__).parents[1] / "fixtures" / "tiny.yaml").model, 5).eval()
    with torch.no_grad():  # as after training: DAB-DETR's box heads start at zero (final boxes = anchors)
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    images = ImageBatch(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    with torch.no_grad():
        memory = teacher.encode(images)
        boxes = teacher.decode(memory, None).boxes[-1]
        anchors = SpecificPoints("anchors")(2, torch.device("cpu"), teacher, memory).anchors
        final = SpecificPoints("final_boxes")(2, torch.device("cpu"), teacher, memory).anchors
    assert torch.equal(anchors[0], anchors[1]) and not torch.equal(final[0], final[1])
    assert torch.equal(final, boxes.clamp(1e-4, 1 - 1e-4)) and not final.requires_grad
    assert [s.source for s in build_samplers(KDConfig(specific_source="final_boxes")) if s.name == "specific"] == [
        "final_boxes"]


def test_near_teacher_points_lie_around_the_teachers_anchors_and_resume():
    """Each point is one of the teacher's anchors with every corner moved by at most box_noise x (w/2, h/2)."""
    teacher = _Teacher()
    anchors = teacher.learned_queries(2).anchors.detach()
    sampler = NearTeacherPoints(200, box_noise=0.5, seed=0)
    points = sampler(2, torch.device("cpu"), teacher).anchors
    assert points.shape == (2, 200, 4) and not points.requires_grad
    corners, teacher_corners = box_convert(points, "cxcywh", "xyxy"), box_convert(anchors, "cxcywh", "xyxy")
    reach = anchors[..., 2:].repeat(1, 1, 2) / 2 * 0.5  # [B, 3, 4]
    offset = (corners[:, :, None] - teacher_corners[:, None]).abs()  # [B, 200, 3, 4]
    near = (offset <= reach[:, None] + 1e-5).all(-1)  # [B, 200, 3]: within reach of that anchor
    assert near.any(-1).all()
    assert near[0].float().argmax(-1).unique().numel() == 3  # every anchor is drawn
    assert not torch.equal(points[0], points[1])  # drawn per image

    state = sampler_states([sampler])
    expected = sampler(2, torch.device("cpu"), teacher).anchors
    fresh = NearTeacherPoints(200, box_noise=0.5, seed=5)
    load_sampler_states([fresh], state)
    assert torch.equal(fresh(2, torch.device("cpu"), teacher).anchors, expected)
    assert [type(s) for s in build_samplers(KDConfig(general_distribution="near_teacher"))][0] is NearTeacherPoints
    with pytest.raises(UserError, match="kd.general_box_noise: must be >= 0"):
        build_samplers(KDConfig(general_distribution="near_teacher", general_box_noise=-0.5))

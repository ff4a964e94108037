import torch

from kddetr.config import KDConfig
from kddetr.kd.points import GeneralPoints, SpecificPoints, build_samplers, load_sampler_states, sampler_states
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

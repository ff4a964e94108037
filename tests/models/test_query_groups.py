"""The three ways of isolating query groups give the same outputs and gradients, for DAB-DETR and Deformable DETR."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from kddetr.config import BackboneConfig, DenoisingConfig, ModelConfig
from kddetr.models.build import build_detector
from kddetr.models.protocol import Queries
from kddetr.models.query_groups import ISOLATION_MODES, repeat_batch, size_buckets

from . import assert_groups_isolated, extra_groups, image_batch

CLASSES = 3
DETECTORS = {
    "dab": dict(arch="dab_detr"),
    "deformable": dict(arch="deformable_detr", activation="relu", num_feature_levels=2, num_points=2),
    "two_stage": dict(arch="deformable_detr", activation="relu", num_feature_levels=2, num_points=2,
                      box_refine=True, two_stage=True),
}


def tiny_model(detector: str, isolation: str, **overrides) -> nn.Module:
    cfg = ModelConfig(backbone=BackboneConfig(name="resnet10", num_stages=3), hidden_dim=32, num_heads=4,
                      encoder_layers=1, decoder_layers=2, dim_feedforward=64, num_queries=6,
                      group_isolation=isolation).replace(**DETECTORS[detector])
    torch.manual_seed(0)
    model = build_detector(cfg.replace(**overrides), CLASSES)
    torch.manual_seed(3)
    for name, p in model.named_parameters():  # zero-initialised box heads would hide differences between layers
        if "bbox_embed" in name and name.endswith("weight"):
            nn.init.normal_(p, std=0.1)
    return model


def groups_of_three_sizes(batch_size: int = 2) -> list[Queries]:
    """Sizes 5 and 4 beside the 6 detection queries (padded into one stacked pass), and 2 (a pass of its own)."""
    small = Queries(torch.rand(1, 2, 4, generator=torch.Generator().manual_seed(4)).expand(batch_size, -1, -1))
    return [*extra_groups(batch_size), small]


def test_size_buckets_pad_only_when_little_is_wasted() -> None:
    assert size_buckets([30, 300, 300]) == [[1, 2], [0]]
    assert size_buckets([6, 5, 4, 2]) == [[0, 1], [2], [3]]
    assert size_buckets([100, 90, 80, 76], max_padding=0.25) == [[0, 1, 2, 3]]
    assert size_buckets([7]) == [[0]]


def test_repeat_batch_repeats_batch_first_tensors_group_major() -> None:
    model = tiny_model("two_stage", "batch").eval()
    with torch.no_grad():
        memory = model.encode(image_batch())
    stacked = repeat_batch(memory, 3)
    assert stacked.memory.shape[0] == 6 and stacked.valid_ratios.shape[0] == 6 and stacked.shapes == memory.shapes
    torch.testing.assert_close(stacked.memory[4:], memory.memory, rtol=0, atol=0)
    assert stacked.proposals is memory.proposals  # not batch-first: left alone


@pytest.mark.parametrize("detector", DETECTORS)
def test_isolation_modes_give_the_same_outputs_and_gradients(detector: str) -> None:
    images, groups = image_batch(), groups_of_three_sizes()
    results = {}
    for mode in ISOLATION_MODES:
        model = tiny_model(detector, mode).train()
        out = model(images, extra_queries=groups)
        loss = sum((o.logits.sigmoid() * torch.linspace(0, 1, o.logits.shape[2])[:, None]).sum() + o.boxes.sum()
                   for o in [out, *out.extra])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = ([out, *out.extra], grads)
    ref_outputs, ref_grads = results["separate"]
    for mode in ("batch",):
        outputs, grads = results[mode]
        for got, want in zip(outputs, ref_outputs):
            torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0, msg=mode)
            torch.testing.assert_close(got.boxes, want.boxes, atol=1e-5, rtol=0, msg=mode)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-4, msg=f"{mode} {name}")


@pytest.mark.parametrize("detector", DETECTORS)
def test_batch_stacking_isolates_groups_in_as_few_passes_as_sizes_allow(detector: str) -> None:
    model = tiny_model(detector, "batch").eval()
    assert_groups_isolated(model)  # detection outputs untouched, each group as if decoded alone
    batches = []
    model._decode = _recording(model._decode, batches)
    with torch.no_grad():
        model(image_batch(), extra_queries=groups_of_three_sizes())
    assert sorted(batches) == [2, 2, 4]  # {6, 5 padded to 6} stacked, then 4 and 2 alone


def test_batch_stacking_beside_denoising_groups() -> None:
    images, groups = image_batch(), groups_of_three_sizes()
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    outputs = {}
    for mode in ("separate", "batch"):
        model = tiny_model("dab", mode, denoising=DenoisingConfig(enabled=True, num_groups=2)).train()
        torch.manual_seed(5)  # the same noised targets in both
        outputs[mode] = model(images, targets, extra_queries=groups)
    batch, separate = outputs["batch"], outputs["separate"]
    for got, want in zip([batch, *batch.extra], [separate, *separate.extra]):
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.boxes, want.boxes, atol=1e-5, rtol=0)


def _recording(decode, batches: list[int]):
    def run(*args, **kwargs):
        batches.append(args[0].shape[0])
        return decode(*args, **kwargs)
    return run

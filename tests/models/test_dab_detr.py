"""DAB-DETR: output shapes, padding, isolation of query groups, the detector protocol, gradients."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from kddetr.config import BackboneConfig, ModelConfig, from_dict
from kddetr.errors import UserError
from kddetr.models.build import build_detector, count_parameters
from kddetr.models.dab_detr import DABDETR
from kddetr.models.protocol import Detector, ImageBatch, Queries

from . import assert_groups_isolated, extra_groups, image_batch

CLASSES = 3


def tiny_config(**overrides) -> ModelConfig:
    backbone = overrides.pop("backbone", BackboneConfig(name="resnet10", num_stages=3))
    cfg = ModelConfig(backbone=backbone, hidden_dim=32, num_heads=4, encoder_layers=1, decoder_layers=2,
                      dim_feedforward=64, num_queries=6)
    return cfg.replace(**overrides)


def tiny_model(**overrides) -> DABDETR:
    torch.manual_seed(0)
    return build_detector(tiny_config(**overrides), CLASSES)


@pytest.mark.parametrize("name", ["resnet10", "resnet18", "resnet34", "resnet50", "resnet101"])
def test_forward_shapes(name: str) -> None:
    model = tiny_model(backbone=BackboneConfig(name=name, num_stages=4)).eval()
    assert isinstance(model, Detector) and model.num_decoder_layers == 2 and model.num_classes == CLASSES
    with torch.no_grad():
        out = model(image_batch())
    assert out.logits.shape == (2, 2, 6, CLASSES) and out.boxes.shape == (2, 2, 6, 4)
    assert out.encoder_memory.shape == (2, 4, 32)  # 64 px at stride 32
    assert out.extra == [] and ((out.boxes > 0) & (out.boxes < 1)).all()


def test_every_layer_predicts_and_refines() -> None:
    model = tiny_model()
    nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.1)  # zero at init: boxes would equal anchors
    with torch.no_grad():
        out = model(image_batch())
    assert torch.equal(out.pred_logits, out.logits[-1]) and torch.equal(out.pred_boxes, out.boxes[-1])
    assert not torch.allclose(out.boxes[0], out.boxes[1]) and not torch.allclose(out.logits[0], out.logits[1])
    assert not torch.allclose(out.logits[:, 0], out.logits[:, 1])  # outputs depend on the image


def test_class_prior_and_zero_box_head_at_init() -> None:
    model = tiny_model()
    with torch.no_grad():
        out = model(image_batch())
    assert torch.allclose(model.class_embed.bias.sigmoid(), torch.full((CLASSES,), 0.01))
    anchors = model.learned_queries(2).anchors
    torch.testing.assert_close(out.boxes[0], anchors)  # first layer's boxes are the anchors themselves


def test_padding_is_invisible() -> None:
    """An image padded inside a batch gives the same outputs as alone.

    A CNN mixes padding into the features near the image border, so the ResNet is replaced by a
    patchify convolution (stride = kernel = 16) here; what is tested is the mask in the position
    encoding, the encoder and the decoder's cross-attention.
    """
    model = tiny_model().eval()
    model.backbone.body = nn.Conv2d(3, model.backbone.num_channels, kernel_size=16, stride=16)
    torch.manual_seed(3)
    alone = torch.randn(1, 3, 48, 64)
    batch = torch.zeros(2, 3, 80, 96)
    batch[0, :, :48, :64] = alone[0]
    batch[1] = torch.randn(3, 80, 96)
    mask = torch.ones(2, 80, 96, dtype=torch.bool)
    mask[0, :48, :64] = False
    mask[1] = False
    with torch.no_grad():
        single = model(ImageBatch(alone, torch.zeros(1, 48, 64, dtype=torch.bool)))
        padded = model(ImageBatch(batch, mask))
    torch.testing.assert_close(padded.logits[:, :1], single.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.boxes[:, :1], single.boxes, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded.logits[:, 0], padded.logits[:, 1], atol=1e-3)


@pytest.mark.parametrize("isolation", ["separate", "batch"])
def test_extra_groups_are_isolated(isolation: str) -> None:
    model = tiny_model(group_isolation=isolation).eval()
    nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.1)
    assert_groups_isolated(model)


def test_isolation_modes_agree_and_a_block_mask_isolates_as_well() -> None:
    """Separate and batch-stacked passes agree; one joint pass under a block-diagonal `self_attn_mask` (per
    batch or per image) gives the same, and without the mask the groups mix."""
    separate = tiny_model(group_isolation="separate").eval()
    masked = tiny_model(group_isolation="batch").eval()
    masked.load_state_dict(separate.state_dict())
    images, groups = image_batch(), extra_groups()
    with torch.no_grad():
        a, b = separate(images, extra_queries=groups), masked(images, extra_queries=groups)
        memory = masked.encode(images)
        every = [masked.learned_queries(2), *groups]
        joint = Queries(torch.cat([g.anchors for g in every], dim=1),
                        torch.cat([torch.zeros(2, g.num_queries, 32) if g.content is None else g.content
                                   for g in every], dim=1))
        mask = ~torch.block_diag(*[torch.ones(g.num_queries, g.num_queries, dtype=torch.bool) for g in every])
        blocked = masked.decode(memory, joint, self_attn_mask=mask)
        per_image = masked.decode(memory, joint, self_attn_mask=mask.expand(2, -1, -1))
        mixed = masked.decode(memory, joint)
    for x, y in zip([a, *a.extra], [b, *b.extra]):
        torch.testing.assert_close(x.logits, y.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(x.boxes, y.boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(blocked.logits[:, :, :6], a.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_image.boxes, blocked.boxes, atol=1e-6, rtol=0)
    assert not torch.allclose(mixed.logits[:, :, :6], a.logits, atol=1e-4)  # without the mask groups mix


def test_learned_queries_reproduce_the_detection_outputs() -> None:
    model = tiny_model().eval()
    images = image_batch()
    with torch.no_grad():
        out = model(images)
        memory = model.encode(images)
        queries = model.learned_queries(2)
        decoded = model.decode(memory, queries)
    assert queries.content is None and queries.anchors.shape == (2, 6, 4)
    assert ((queries.anchors > 0) & (queries.anchors < 1)).all()
    torch.testing.assert_close(decoded.logits, out.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(decoded.boxes, out.boxes, atol=1e-6, rtol=0)


@pytest.mark.parametrize("options", [dict(), dict(pre_norm_layers=True, activation="relu", group_isolation="separate")])
def test_gradients_reach_every_trainable_parameter(options: dict) -> None:
    model = tiny_model(**options).train()
    nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.1)  # zero at init blocks the box head's gradient
    out = model(image_batch(), extra_queries=extra_groups())
    loss = sum(o.logits.sum() + o.boxes.sum() for o in [out, *out.extra])
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert silent == []


def test_random_refpoints_xy_are_fixed_and_spread() -> None:
    model = tiny_model(random_refpoints_xy=True, num_queries=200)
    out = model(image_batch(1))
    out.boxes.sum().backward()
    grad = model.refpoint_embed.weight.grad
    assert not grad[:, :2].any() and grad[:, 2:].any()
    xy = model.learned_queries(1).anchors[0, :, :2]
    assert xy.min() < 0.1 and xy.max() > 0.9  # uniform over the image, not clustered at the centre


def test_patterns_multiply_the_queries() -> None:
    model = tiny_model(num_patterns=3).eval()
    queries = model.learned_queries(2)
    assert queries.anchors.shape == (2, 18, 4) and queries.content.shape == (2, 18, 32)
    with torch.no_grad():
        out = model(image_batch(), extra_queries=extra_groups())
    assert out.logits.shape == (2, 2, 18, CLASSES) and out.extra[0].boxes.shape == (2, 2, 5, 4)


def test_config_and_parameter_count() -> None:
    with pytest.raises(UserError, match="group_isolation"):
        from_dict(ModelConfig, {"group_isolation": "stacked"})
    model = tiny_model()
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.backbone.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - count_parameters(model.backbone)


def test_runs_under_bfloat16_autocast() -> None:
    model = tiny_model(group_isolation="batch").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image_batch(), extra_queries=extra_groups())
        reference = model.decode(model.encode(image_batch()), extra_groups()[1])
    with torch.no_grad():
        full = model(image_batch())
    assert torch.isfinite(out.logits).all() and torch.isfinite(reference.boxes).all()
    torch.testing.assert_close(out.boxes.float(), full.boxes, atol=0.05, rtol=0)

"""DINO: query selection, look-forward-twice, isolation of denoising and KD groups, encoder loss, overfit."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from kddetr.config import BackboneConfig, DenoisingConfig, ModelConfig, from_dict
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.dino import DINO
from kddetr.models.protocol import Detector, ImageBatch

from . import assert_groups_isolated, extra_groups, image_batch, paint_boxes, train_totals

CLASSES, QUERIES, GROUPS = 3, 6, 2
TARGETS = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]), "labels": torch.tensor([0, 2])},
           {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([1])}]


def tiny_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(arch="dino", backbone=BackboneConfig(name="resnet10", num_stages=3), hidden_dim=32,
                      num_heads=4, encoder_layers=1, decoder_layers=3, dim_feedforward=64, num_queries=QUERIES,
                      activation="relu", num_feature_levels=2,
                      denoising=DenoisingConfig(enabled=True, num_groups=GROUPS, contrastive=True))
    cfg = cfg.replace(num_points=2)
    return cfg.replace(**overrides)


def tiny_model(**overrides) -> DINO:
    torch.manual_seed(0)
    model = build_detector(tiny_config(**overrides), CLASSES)
    for name, p in model.named_parameters():  # zero at init: boxes and positions would not depend on the queries
        if name.endswith(("sampling_offsets.weight", "attention_weights.weight")) or (
                name.startswith("bbox_embed") and name.endswith("layers.2.weight")):
            nn.init.normal_(p, std=0.1)
    return model


def assert_same(a, b, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.logits, b.logits, atol=atol, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)


def test_config_and_protocol() -> None:
    assert from_dict(ModelConfig, {"arch": "dino", "denoising": {"contrastive": True}}).denoising.contrastive
    assert not DenoisingConfig().contrastive  # existing configs keep DN-DETR groups
    model = tiny_model().eval()
    assert isinstance(model, Detector) and model.num_decoder_layers == 3 and len(model.class_embed) == 2
    with torch.no_grad():
        out = model(image_batch(), extra_queries=extra_groups())
    assert out.logits.shape == (3, 2, QUERIES, CLASSES) and [o.boxes.shape[2] for o in out.extra] == [5, 4]
    assert out.denoising is None and out.encoder_proposals.logits.shape == (1, 2, QUERIES, CLASSES)


def test_query_selection_takes_the_top_k_proposals_per_image() -> None:
    model = tiny_model().eval()
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 40:] = True  # image 1 is padded on the right
    images = ImageBatch(image_batch().tensors, mask)
    with torch.no_grad():
        memory = model.encode(images)
        logits, coords, valid = model._proposal_outputs(memory)
    score = logits.max(-1).values
    for b in range(2):
        distance = (memory.selected[b][:, None] - coords[b].sigmoid()[None]).abs().amax(-1)  # [K, S]
        assert distance.min(-1).values.max() < 1e-6
        chosen = distance.argmin(-1).tolist()
        assert len(set(chosen)) == QUERIES and valid[b, chosen].all()
        others = valid[b].clone()
        others[chosen] = False
        assert score[b, chosen].min() >= score[b, others].max()  # the best-scoring valid cells, by any class
    assert (~valid[1]).any() and not torch.allclose(memory.selected[0], memory.selected[1])
    queries = model.learned_queries(2, memory)
    assert queries.content is None and torch.equal(queries.anchors, memory.selected)
    with torch.no_grad():  # learned content in slot order: decoding the selected anchors gives the detections
        assert_same(model.decode(memory, queries), model.decode(memory))
    with pytest.raises(ValueError, match="memory"):
        model.learned_queries(2)


def test_look_forward_twice_trains_the_previous_layer_box_only() -> None:
    def box_grads(model: nn.Module, layer: int, what: str = "boxes") -> list[bool]:
        model.zero_grad()
        out = model(image_batch())
        getattr(out, what)[layer].sum().backward()
        return [head.layers[-1].weight.grad is not None and bool(head.layers[-1].weight.grad.any())
                for head in model.bbox_embed[:3]]

    dino = tiny_model(shared_heads=False).train()  # per-layer heads show which layer a gradient reaches
    assert box_grads(dino, 2) == [False, True, True]  # layer 1's box (not layer 0's: its reference is detached)
    assert box_grads(dino, 1) == [True, True, False]
    assert box_grads(dino, 2, "logits") == [False, False, False]  # references the layers attend from: detached
    deformable = tiny_model(arch="deformable_detr", two_stage=True, box_refine=True).train()
    for head in deformable.bbox_embed:
        nn.init.normal_(head.layers[-1].weight, std=0.1)
    assert box_grads(deformable, 2) == [False, False, True]  # Deformable DETR looks forward once


def test_decoder_layers_share_their_heads_and_read_a_normalised_output() -> None:
    """As the reference: one class and one box head for every decoder layer, the proposal heads apart, and a
    LayerNorm between each layer's output and the heads (the references are refined from the raw output)."""
    model = tiny_model().eval()
    heads = [model._head(i) for i in range(model.num_decoder_layers)]
    assert all(h[0] is heads[0][0] and h[1] is heads[0][1] for h in heads)
    proposal = model._head(model.num_decoder_layers)
    assert proposal[0] is not heads[0][0] and proposal[1] is not heads[0][1]
    nn.init.normal_(model.decoder_norm.weight)  # at init it is nearly the identity on post-norm layer outputs
    memory = model.encode(image_batch())
    with torch.no_grad():
        normed = model.decode(memory)
        model.decoder_norm = None  # the same weights, heads on the raw output
        raw = model.decode(memory)
    assert not torch.allclose(normed.logits, raw.logits, atol=1e-3)
    torch.testing.assert_close(normed.boxes[0], raw.boxes[0], atol=0.2, rtol=0)  # both refine the same anchors
    separate = tiny_model(shared_heads=False, decoder_norm=False)
    assert len(separate.class_embed) == 4 and separate.decoder_norm is None


@pytest.mark.parametrize("isolation", ["separate", "batch"])
def test_denoising_groups_do_not_leak(isolation: str) -> None:
    """Changing one denoising group changes neither the detection queries, nor the other group, nor KD groups."""
    model = tiny_model(group_isolation=isolation).train()
    images = image_batch()
    with torch.no_grad():
        torch.manual_seed(5)
        out = model(images, TARGETS, extra_queries=extra_groups())
        memory = model.encode(images)
        dn = model.denoising(TARGETS)
        inputs = [model._inputs(memory, q) for q in [dn.queries, None, *extra_groups()]]
        changed_inputs = [t.clone() for t in inputs[0]]
        pad = dn.single_pad  # 4: 2 positives and 2 negatives per group; image 0 has 2 targets
        changed_inputs[0][0, :pad] = torch.randn(pad, 32)
        changed_inputs[2][0, :pad] = torch.rand(pad, 4) * 0.5 + 0.25
        from kddetr.models.denoising import decode_with_denoising
        reference = decode_with_denoising(inputs, dn, memory, model._decode, isolation)
        changed = decode_with_denoising([tuple(changed_inputs), *inputs[1:]], dn, memory, model._decode, isolation)
    assert out.denoising_meta == {"num_groups": GROUPS, "single_pad": 4, "contrastive": True}
    torch.testing.assert_close(changed[0].logits[:, 0, pad:], reference[0].logits[:, 0, pad:], atol=1e-5, rtol=0)
    torch.testing.assert_close(changed[0].logits[:, 1], reference[0].logits[:, 1], atol=1e-5, rtol=0)
    assert not torch.allclose(changed[0].logits[:, 0, :pad], reference[0].logits[:, 0, :pad], atol=1e-3)
    for a, b in zip(changed[1:], reference[1:], strict=True):
        assert_same(a, b)
    with torch.no_grad():
        plain = model(images)  # no targets: no denoising
        alone = [model.decode(memory, group) for group in extra_groups()]
    assert_same(out, plain)
    for got, ref in zip(out.extra, alone, strict=True):
        assert_same(got, ref)


@pytest.mark.parametrize("isolation", ["separate", "batch"])
def test_kd_groups_are_isolated(isolation: str) -> None:
    model = tiny_model(group_isolation=isolation).eval()
    assert_groups_isolated(model)
    model.train()
    with torch.no_grad():
        torch.manual_seed(5)
        with_kd = model(image_batch(), TARGETS, extra_queries=extra_groups())
        torch.manual_seed(5)
        without_kd = model(image_batch(), TARGETS)
    assert_same(with_kd, without_kd)
    assert_same(with_kd.denoising, without_kd.denoising)


def test_encoder_loss_trains_the_proposal_head() -> None:
    model = tiny_model().train()
    criterion = build_criterion(tiny_config(), CLASSES)
    losses = criterion(model(image_batch(), TARGETS), TARGETS)
    assert {"enc_loss_ce", "enc_loss_bbox", "enc_loss_giou", "dn_loss_ce", "loss_ce_1"} <= set(losses)
    sum(v for k, v in losses.items() if k.startswith("enc_")).backward()
    for module in (*model._head(model.num_decoder_layers), model.enc_output):  # the proposal heads
        assert all(p.grad is not None and p.grad.any() for p in module.parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.tgt_embed.parameters())


def test_overfits_two_images() -> None:
    model = tiny_model().train()
    criterion = build_criterion(tiny_config(), CLASSES)
    images = image_batch()
    paint_boxes(images, TARGETS)
    totals, _ = train_totals(model, criterion, images, TARGETS, steps=45)  # shared heads: slower than per-layer
    assert sum(totals[-5:]) / 5 < 0.6 * sum(totals[:5]) / 5, totals


def test_images_without_objects() -> None:
    model = tiny_model().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    out = model(image_batch(), empty, extra_queries=extra_groups())
    losses = build_criterion(tiny_config(), CLASSES)(out, empty)
    assert out.denoising.logits.shape[2] == 0 and out.denoising_meta["single_pad"] == 0
    assert "enc_loss_ce" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_initialisation_positions_and_learning_rates_follow_the_reference() -> None:
    """Content queries Xavier-initialised, the image grid encoded as DINO's (temperature 20, no half-cell
    offset: DAB-DETR's encoding) and sampling offsets at the full learning rate by default."""
    from kddetr.models.position import PositionEmbeddingSine

    model = tiny_model()
    bound = (6 / sum(model.tgt_embed.weight.shape)) ** 0.5
    assert model.tgt_embed.weight.abs().max() <= bound and model.tgt_embed.weight.std() > bound / 3
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 4:] = True
    expected = PositionEmbeddingSine(16, 20.0, 20.0)(mask).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model._image_position(mask), expected)
    assert tiny_config().options.lr_linear_proj_mult == 1.0
    assert set(model.lr_multipliers().values()) <= {1.0}

"""RT-DETR(v2): HF transformers parity, query selection, distillation points, varifocal loss, learning."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert, box_iou

from kddetr.bench.teacher_points import AsPoints
from kddetr.config import BackboneConfig, DenoisingConfig, KDConfig, ModelConfig
from kddetr.errors import UserError
from kddetr.kd.distiller import Distiller
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.criterion import varifocal_loss
from kddetr.models.ms_deform_attn import deformable_sample
from kddetr.models.protocol import Detector, DetectorOutput, ImageBatch, Queries
from kddetr.models.rt_detr import RTDETR

from . import assert_groups_isolated, extra_groups, image_batch, paint_boxes, train_totals

CLASSES, QUERIES, HIDDEN = 3, 8, 32
TARGETS = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]), "labels": torch.tensor([0, 2])},
           {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([1])}]


def tiny_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(arch="rt_detr", backbone=BackboneConfig(name="resnet10", num_stages=4), hidden_dim=HIDDEN,
                      num_heads=4, encoder_layers=1, decoder_layers=3, dim_feedforward=64, num_queries=QUERIES,
                      activation="relu", num_feature_levels=3,
                      denoising=DenoisingConfig(enabled=True, contrastive=True, num_groups=2, label_noise=0.5,
                                                box_noise=1.0))
    return cfg.replace(csp_blocks=1, num_points=[2]).replace(**overrides)


def tiny_model(**overrides) -> RTDETR:
    torch.manual_seed(0)
    model = build_detector(tiny_config(**overrides), CLASSES)
    for name, p in model.named_parameters():  # zero at init: boxes would not depend on the queries
        if name.endswith(("sampling_offsets.weight", "attention_weights.weight")) or (
                "bbox_embed" in name and name.endswith("layers.2.weight")):
            nn.init.normal_(p, std=0.1)
    return model


def assert_same(a, b, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.logits, b.logits, atol=atol, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)


# --- parity with HF transformers ------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from tests.interop import randomise  # noqa: E402

WIDTHS = {"basic": [64, 128, 256, 512], "bottleneck": [256, 512, 1024, 2048]}


def hf_rt_detr(version: str = "v1", layer_type: str = "basic", depths=(1, 1, 1, 1), stages=(2, 3, 4),
               levels: int = 3, encoder_layers: int = 1, decoder_layers: int = 2, points: int = 2,
               method: str = "default", plain: bool = False, expansion: float = 1.0, names=None) -> nn.Module:
    """A randomised HF RT-DETR(v2) (hidden 32, 10 queries, 3 classes): unit-scale weights show wrong mappings."""
    widths = WIDTHS[layer_type]
    backbone_class = transformers.ResNetConfig if plain else transformers.RTDetrResNetConfig
    backbone = backbone_class(embedding_size=64, layer_type=layer_type, depths=list(depths), hidden_sizes=widths,
                              out_indices=list(stages))
    common = dict(backbone_config=backbone, d_model=HIDDEN, encoder_hidden_dim=HIDDEN,
                  encoder_in_channels=[widths[s - 1] for s in stages], decoder_in_channels=[HIDDEN] * len(stages),
                  encoder_layers=encoder_layers, decoder_layers=decoder_layers, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
                  num_feature_levels=levels, decoder_n_points=points, encode_proj_layers=[len(stages) - 1],
                  hidden_expansion=expansion, **({"id2label": dict(enumerate(names))} if names else {"num_labels": 3}))
    torch.manual_seed(0)
    if version == "v2":
        hf = transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(
            **common, decoder_n_levels=levels, decoder_method=method))
    else:
        hf = transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(**common))
    randomise(hf)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in hf.modules():
            if hasattr(module, "n_points_scale"):  # constants (1 / points per level), not a weight to randomise
                module.n_points_scale.copy_(torch.tensor([1 / n for n in module.n_points_list for _ in range(n)]))
            elif hasattr(module, "running_var"):  # HF inits batch-norm scales and convolutions at ~0.01:
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))  # cells would look
            elif isinstance(module, nn.Conv2d):  # alike, and the query selection would pick among near-ties
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in ** 0.5)
    return hf.eval()


def hf_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 96 x 128 images; RT-DETR masks no padding, so the mask is all image."""
    torch.manual_seed(1)
    return torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)


def max_errors(ours: nn.Module, hf: nn.Module) -> tuple[float, float]:
    """Max abs error of the final logits and boxes, and of every decoder layer's."""
    images, mask = hf_inputs()
    with torch.no_grad():
        out = ours(ImageBatch(images, mask))
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
    assert out.pred_logits.shape == ref.logits.shape
    spread = (out.pred_logits.std(dim=1).mean().item(), out.pred_boxes.std(dim=1).mean().item())
    assert spread[0] > 0.02 and spread[1] > 0.02, spread  # the queries differ
    with torch.no_grad():  # no near-ties among the best cells: float noise cannot change the selection
        scores = ours.enc_score_head(ours.encode(ImageBatch(images, mask)).projected).max(-1).values
    gap = (-scores.topk(ours.num_queries + 1, dim=1).values.diff(dim=1)).min().item()
    assert gap > 1e-4, gap
    layers = ((out.logits - ref.intermediate_logits.transpose(0, 1)).abs().max().item(),
              (out.boxes - ref.intermediate_reference_points.transpose(0, 1)).abs().max().item())
    final = ((out.pred_logits - ref.logits).abs().max().item(), (out.pred_boxes - ref.pred_boxes).abs().max().item())
    return max(final[0], layers[0]), max(final[1], layers[1])


PARITY = {
    "v1_r10vd_3_levels": dict(),
    "v1_r50vd": dict(layer_type="bottleneck", depths=(3, 4, 6, 3)),
    "v1_4_levels_3_layers": dict(levels=4, decoder_layers=3),
    "v1_1_level": dict(stages=(4,), levels=1),
    "v1_no_aifi_expansion_half": dict(encoder_layers=0, expansion=0.5),
    "v1_2_aifi_layers": dict(encoder_layers=2),
    "v1_plain_resnet_2_levels": dict(plain=True, stages=(2, 3), levels=2),
    "v2_default": dict(version="v2"),
    "v2_2_levels_3_points": dict(version="v2", stages=(3, 4), levels=2, points=3),
    "v2_discrete": dict(version="v2", method="discrete"),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_matches_hf_rt_detr(name: str) -> None:
    from kddetr.interop.hf_rt_detr import config_from_hf, state_to_ours

    hf = hf_rt_detr(**PARITY[name])
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.options.version == PARITY[name].get("version", "v1")
    ours = RTDETR(cfg, 3).eval()
    ours.load_state_dict(state_to_ours(hf.state_dict(), cfg), strict=True)
    logits, boxes = max_errors(ours, hf)
    print(f"\nRT-DETR parity {name}: max abs error logits {logits:.1e}, boxes {boxes:.1e}")
    # discrete sampling is discontinuous: float noise could move a point to the next cell (not with this seed)
    assert logits < 1e-4 and boxes < 1e-4


def test_discrete_sampling_matches_hf() -> None:
    hf_v2 = pytest.importorskip("transformers.models.rt_detr_v2.modeling_rt_detr_v2")
    shapes, gen = [(6, 8), (3, 4)], torch.Generator().manual_seed(0)
    value = torch.randn(2, sum(h * w for h, w in shapes), 4, 8, generator=gen)
    locations = torch.rand(2, 5, 4, 6, 2, generator=gen) * 1.4 - 0.2  # outside points clamp to the border cell
    weights = torch.rand(2, 5, 4, 6, generator=gen)
    for method, theirs in (("discrete", "discrete"), ("bilinear", "default")):
        ours = deformable_sample(value, shapes, locations, weights, [2, 4], method)
        ref = hf_v2.multi_scale_deformable_attention_v2(value, shapes, locations, weights, [2, 4], theirs)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


# --- the detector ---------------------------------------------------------------------------------------------------

def test_protocol_and_query_selection() -> None:
    model = tiny_model().eval()
    assert isinstance(model, Detector) and model.num_decoder_layers == 3 and model.lr_multipliers() == {}
    images = image_batch()
    with torch.no_grad():
        memory = model.encode(images)
        out = model(images, extra_queries=extra_groups())
        scores = model.enc_score_head(memory.projected).max(-1).values
    assert out.logits.shape == (3, 2, QUERIES, CLASSES) and [o.boxes.shape[2] for o in out.extra] == [5, 4]
    assert out.encoder_proposals.logits.shape == (1, 2, QUERIES, CLASSES) and not out.encoder_class_agnostic
    best = out.encoder_proposals.logits[0].max(-1).values
    for b in range(2):  # the top-k cells by their best class score
        assert best[b].min() >= scores[b].topk(QUERIES).values.min() - 1e-6
    queries = model.learned_queries(2, memory)
    assert torch.equal(queries.anchors, memory.selected) and queries.content.shape == (2, QUERIES, HIDDEN)
    with torch.no_grad():  # the selected anchors with their content are the detection queries
        assert_same(model.decode(memory, queries), model.decode(memory))
    with pytest.raises(ValueError, match="memory"):
        model.learned_queries(2)
    assert set(model.class_slots()) >= {"class_embed.0.weight", "enc_score_head.bias", "denoising.label_embed.weight"}


def test_point_content_is_the_memory_at_the_centre_on_the_level_of_its_size() -> None:
    model = tiny_model().eval()
    with torch.no_grad():
        memory = model.encode(image_batch())
    (h0, w0), (h1, w1), _ = memory.shapes
    levels = memory.projected.split([h * w for h, w in memory.shapes], 1)
    # a small box centred on cell (2, 3) of level 0, a box of level 1's anchor size centred on its cell (1, 2)
    anchors = torch.tensor([[[3.5 / w0, 2.5 / h0, 0.05, 0.05], [2.5 / w1, 1.5 / h1, 0.1, 0.1]]]).expand(2, -1, -1)
    content = model.point_contents(memory, anchors)
    torch.testing.assert_close(content[:, 0], levels[0][:, 2 * w0 + 3], atol=1e-6, rtol=0)
    torch.testing.assert_close(content[:, 1], levels[1][:, 1 * w1 + 2], atol=1e-6, rtol=0)
    between = anchors.clone()
    between[:, 0, 0] += 0.5 / w0  # halfway to the next cell: the mean of both
    torch.testing.assert_close(model.point_contents(memory, between)[:, 0],
                               (levels[0][:, 2 * w0 + 3] + levels[0][:, 2 * w0 + 4]) / 2, atol=1e-6, rtol=0)
    zeros = tiny_model(point_content="zeros")
    assert not zeros.point_contents(memory, anchors).any()


def test_proposal_content_decodes_a_selected_proposal_as_its_detection_query() -> None:
    model = tiny_model(point_content="proposal").eval()
    with torch.no_grad():
        memory = model.encode(image_batch())
        selected = model.learned_queries(2, memory).anchors
        assert_same(model.decode(memory, Queries(selected)), model.decode(memory, None), atol=1e-6)
        # any valid cell's own proposal box, as a point, takes that cell's content (unselected cells too)
        valid = memory.valid[0, :, 0].nonzero()[:, 0]
        cells = valid[torch.randperm(len(valid), generator=torch.Generator().manual_seed(0))[:20]]
        content = model.point_contents(memory, memory.cell_boxes[:, cells])
    torch.testing.assert_close(content, memory.projected[:, cells], atol=0, rtol=0)


def test_teacher_points_bench_sees_the_gap_that_proposal_content_closes() -> None:
    with torch.no_grad():
        for content, same in (("proposal", True), ("memory", False)):
            model = tiny_model(point_content=content).eval()
            nn.init.normal_(model.enc_bbox_head.layers[-1].weight, std=0.1)  # proposals off their cells' anchors
            detections, points = model(image_batch()), AsPoints(model)(image_batch())
            assert torch.allclose(points.logits, detections.logits, atol=1e-6) is same


def proposal_content_distiller(kd: KDConfig, student: RTDETR | None = None) -> Distiller:
    """A small `proposal`-content student under a larger teacher of the same content."""
    student = tiny_model(point_content="proposal", hidden_dim=16) if student is None else student
    teacher = tiny_model(point_content="proposal")
    return Distiller(student, teacher, build_criterion(tiny_config(hidden_dim=16), CLASSES), kd)


def test_near_teacher_points_lie_around_each_images_selected_proposals_in_a_distillation_step() -> None:
    kd = KDConfig(general_points=40, general_distribution="near_teacher", general_box_noise=0.2)
    distiller = proposal_content_distiller(kd).train()
    groups, _, _ = distiller._teacher_side(image_batch())
    general, specific = groups
    assert general.anchors.shape == (2, 40, 4)
    for image in range(2):  # each point overlaps one of its own image's selected proposals
        overlap = box_iou(general.anchors[image], specific.anchors[image], fmt="cxcywh")
        assert (overlap.max(-1).values > 0.4).all()
    assert not torch.equal(general.anchors[0], general.anchors[1])
    _, losses = distiller(image_batch(), TARGETS)
    sum(losses.values()).backward()
    assert "general/kd_giou" in losses and all(torch.isfinite(v) for v in losses.values())


def test_student_proposals_with_proposal_content_distil_the_students_own_detections() -> None:
    student = tiny_model(point_content="proposal", hidden_dim=16)
    nn.init.normal_(student.enc_bbox_head.layers[-1].weight, std=0.1)  # proposals off their cells' anchors
    distiller = proposal_content_distiller(KDConfig(general_points=0, student_proposals=True), student).eval()
    outputs, losses = distiller(image_batch(), TARGETS)
    assert [s.name for s in distiller.samplers] == ["specific", "proposals"]
    specific, proposals = outputs.extra
    assert_same(proposals, outputs, atol=1e-6)  # the student's points are its detection queries
    assert not torch.allclose(specific.boxes, outputs.boxes)  # the teacher's are not
    losses["proposals/kd_cls"].backward()
    assert student.class_embed[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("point_content", ["memory", "zeros", "proposal"])
@pytest.mark.parametrize("isolation", ["separate", "batch"])
def test_distillation_groups_are_isolated(point_content: str, isolation: str) -> None:
    model = tiny_model(point_content=point_content, group_isolation=isolation).eval()
    assert_groups_isolated(model)
    model.train()
    with torch.no_grad():  # training: beside the denoising groups too
        torch.manual_seed(5)
        with_kd = model(image_batch(), TARGETS, extra_queries=extra_groups())
        torch.manual_seed(5)
        without_kd = model(image_batch(), TARGETS)
        memory = model.encode(image_batch())
        alone = [model.decode(memory, group) for group in extra_groups()]
    assert_same(with_kd, without_kd)
    assert_same(with_kd.denoising, without_kd.denoising)
    for got, ref in zip(with_kd.extra, alone, strict=True):
        assert_same(got, ref)


@pytest.mark.parametrize("training", [False, True])
def test_point_memory_grad_off_keeps_distillation_losses_out_of_the_encoder(training: bool) -> None:
    def step(point_memory_grad: bool) -> tuple:
        model = tiny_model(point_memory_grad=point_memory_grad).train(training)
        torch.manual_seed(5)
        out = model(image_batch(), TARGETS, extra_queries=extra_groups())
        sum(group.logits.sum() + group.boxes.sum() for group in out.extra).backward()
        encoder = [p.grad for p in model.encoder.parameters()]
        decoder = [p.grad for p in model.decoder.parameters()]
        return out, encoder, decoder

    (on, encoder_on, decoder_on), (off, encoder_off, decoder_off) = step(True), step(False)
    assert_same(on, off, atol=0)
    for got, ref in zip(off.extra, on.extra, strict=True):
        assert_same(got, ref, atol=0)
    assert any(g is not None and g.any() for g in encoder_on)
    assert all(g is None or not g.any() for g in encoder_off)
    for got, ref in zip(decoder_off, decoder_on, strict=True):  # the decoder learns the same from the points
        torch.testing.assert_close(got, ref)


def test_a_layer_box_trains_the_previous_layer_box_head_too() -> None:
    model = tiny_model().train()
    for head in model.bbox_embed:
        nn.init.normal_(head.layers[-1].weight, std=0.1)

    def reached(layer: int) -> list[bool]:
        model.zero_grad()
        model(image_batch()).boxes[layer].sum().backward()
        return [bool(h.layers[-1].weight.grad is not None and h.layers[-1].weight.grad.any()) for h in model.bbox_embed]

    assert reached(2) == [False, True, True] and reached(0) == [True, False, False]


def test_options_are_checked() -> None:
    with pytest.raises(UserError, match="version: v2"):
        build_detector(tiny_config(num_points=[2, 3, 4]), CLASSES)
    with pytest.raises(UserError, match="version: v2"):
        build_detector(tiny_config(decoder_method="discrete"), CLASSES)
    with pytest.raises(UserError, match="aifi_levels"):
        build_detector(tiny_config(aifi_levels=[3]), CLASSES)
    with pytest.raises(UserError, match="contrastive"):
        build_detector(tiny_config(denoising=DenoisingConfig(enabled=True)), CLASSES)
    v2 = build_detector(tiny_config(version="v2", num_points=[1, 2, 3], decoder_method="discrete"), CLASSES).eval()
    with torch.no_grad():
        assert v2(image_batch()).boxes.shape == (3, 2, QUERIES, 4)
    plain = build_detector(tiny_config(resnet_variant="plain", backbone=BackboneConfig("resnet10", num_stages=3),
                                       num_feature_levels=2), CLASSES)
    assert type(plain.backbone).__name__ == "Backbone" and plain.num_encoder_levels == 2


# --- the loss -------------------------------------------------------------------------------------------------------

def test_varifocal_loss_by_hand() -> None:
    logits = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    target = torch.tensor([[0.6, 0.0], [0.0, 0.0]])  # query 0 matched to class 0 at IoU 0.6
    positive = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    alpha, gamma = 0.75, 2.0
    expected = torch.zeros(2, 2)
    for i in range(2):
        for c in range(2):
            p, q = torch.sigmoid(logits[i, c]), target[i, c]
            bce = -(q * torch.log(p) + (1 - q) * torch.log(1 - p))
            weight = q if positive[i, c] else alpha * p ** gamma
            expected[i, c] = weight * bce
    torch.testing.assert_close(varifocal_loss(logits, target, positive, alpha, gamma), expected)


def test_criterion_scores_classes_by_the_matched_iou() -> None:
    cfg = tiny_config()
    criterion = build_criterion(cfg, CLASSES)
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.3], [0.5, 0.5, 0.2, 0.2]]])
    logits = torch.tensor([[[2.0, -1.0, -3.0], [-1.0, -2.0, 0.5]]])
    target = [{"boxes": torch.tensor([[0.32, 0.3, 0.2, 0.25]]), "labels": torch.tensor([0])}]
    losses = criterion(DetectorOutput(logits[None], boxes[None]), target)
    iou = box_iou(box_convert(boxes[0, :1], "cxcywh", "xyxy"), box_convert(target[0]["boxes"], "cxcywh", "xyxy"))[0, 0]
    score = torch.zeros(1, 2, 3)
    score[0, 0, 0] = iou
    positive = (score > 0).float()
    expected = varifocal_loss(logits, score, positive).sum() * cfg.loss.cls_weight
    torch.testing.assert_close(losses["loss_ce"], expected)
    assert {"loss_bbox", "loss_giou"} <= set(losses)


def test_overfits_two_images() -> None:
    smaller = dict(decoder_layers=2, num_feature_levels=2, backbone=BackboneConfig("resnet10", num_stages=3))
    model = tiny_model(**smaller).train()
    criterion = build_criterion(tiny_config(**smaller), CLASSES)
    images = image_batch()
    paint_boxes(images, TARGETS)
    totals, losses = train_totals(model, criterion, images, TARGETS, steps=50, lr=2e-3)
    assert {"enc_loss_ce", "dn_loss_ce", "loss_ce_0"} <= set(losses)
    assert sum(totals[-5:]) / 5 < 0.6 * sum(totals[:5]) / 5, totals
    model.eval()
    with torch.no_grad():
        out = model(images)
    for b, t in enumerate(TARGETS):  # every object is found: a query's box overlaps it well
        ious = box_iou(box_convert(t["boxes"], "cxcywh", "xyxy"), box_convert(out.pred_boxes[b], "cxcywh", "xyxy"))
        assert (ious.max(1).values > 0.5).all(), ious.max(1).values


def test_denoising_content_is_zero_for_padding_queries() -> None:
    model = tiny_model().train()
    dn = model.denoising(TARGETS)
    assert dn.contrastive and dn.queries.content.shape[-1] == HIDDEN
    assert not dn.queries.content[~dn.valid].any() and dn.queries.content[dn.valid].abs().sum(-1).gt(0).all()
    assert model.denoising.label_embed.weight.shape == (CLASSES, HIDDEN)


def test_empty_images_and_queries_of_zero_width() -> None:
    model = tiny_model().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    out = model(image_batch(), empty, extra_queries=[Queries(torch.zeros(2, 3, 4))])
    losses = build_criterion(tiny_config(), CLASSES)(out, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


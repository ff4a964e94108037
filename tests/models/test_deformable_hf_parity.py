"""Numerical parity of our Deformable DETR with HF transformers' `DeformableDetrForObjectDetection`, shared weights."""
from __future__ import annotations

import pytest
import torch

from kddetr.config import BackboneConfig, ModelConfig
from kddetr.interop.hf_deformable_detr import state_to_ours as deformable_hf_to_ours
from kddetr.models.deformable_detr import DeformableDETR
from kddetr.models.layers import inverse_sigmoid
from kddetr.models.protocol import ImageBatch

transformers = pytest.importorskip("transformers")
from tests.interop import randomise  # noqa: E402
from tests.models.test_hf_parity import BACKBONES  # noqa: E402

HIDDEN, HEADS, FFN, QUERIES, CLASSES, POINTS, DECODER_LAYERS = 32, 4, 64, 10, 5, 2, 3


def _build_pair(levels: int, box_refine: bool, two_stage: bool):
    stages = [f"stage{i}" for i in range(max(2, 5 - levels), 5)]
    backbone_cfg = transformers.ResNetConfig(embedding_size=64, out_features=stages, **BACKBONES["resnet10"])
    hf_cfg = transformers.DeformableDetrConfig(
        backbone_config=backbone_cfg, d_model=HIDDEN, encoder_layers=2, decoder_layers=DECODER_LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        num_queries=QUERIES, two_stage_num_proposals=QUERIES, num_labels=CLASSES, num_feature_levels=levels,
        encoder_n_points=POINTS, decoder_n_points=POINTS, with_box_refine=box_refine, two_stage=two_stage,
        activation_function="relu", dropout=0.0)
    torch.manual_seed(0)
    hf = transformers.DeformableDetrForObjectDetection(hf_cfg).eval()
    randomise(hf)
    cfg = ModelConfig(arch="deformable_detr", backbone=BackboneConfig(name="resnet10", num_stages=4, frozen_bn=True),
                      hidden_dim=HIDDEN, num_heads=HEADS, encoder_layers=2, decoder_layers=DECODER_LAYERS,
                      dim_feedforward=FFN, num_queries=QUERIES, activation="relu", num_feature_levels=levels
                      ).replace(num_points=POINTS, box_refine=box_refine, two_stage=two_stage)
    ours = DeformableDETR(cfg, CLASSES).eval()
    ours.load_state_dict(deformable_hf_to_ours(hf.state_dict(), cfg), strict=True)
    return hf, ours


def _hf_layer_outputs(hf, inner) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder layer's logits and boxes `[L, B, Q, ...]`: layer l's head over its reference before layer l."""
    hidden = inner.intermediate_hidden_states.transpose(0, 1)
    refs = [inner.init_reference_points, *inner.intermediate_reference_points.transpose(0, 1)[:-1]]
    logits, boxes = [], []
    for l, (h, ref) in enumerate(zip(hidden, refs)):
        delta = hf.bbox_embed[l](h)
        delta = torch.cat((delta[..., :ref.shape[-1]] + inverse_sigmoid(ref), delta[..., ref.shape[-1]:]), -1)
        logits.append(hf.class_embed[l](h))
        boxes.append(delta.sigmoid())
    return torch.stack(logits), torch.stack(boxes)


@pytest.mark.parametrize("levels,box_refine,two_stage", [(4, False, False), (1, False, False), (4, True, False),
                                                         (4, True, True)])
def test_matches_hf_deformable_detr(levels: int, box_refine: bool, two_stage: bool) -> None:
    hf, ours = _build_pair(levels, box_refine, two_stage)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    images[1, :, 64:], images[1, :, :, 96:] = 0, 0
    mask[1, 64:], mask[1, :, 96:] = True, True

    with torch.no_grad():
        memory = ours.encode(ImageBatch(images, mask))
        out = ours(ImageBatch(images, mask))
        final = hf(pixel_values=images, pixel_mask=(~mask).long())
        inner = hf.model(pixel_values=images, pixel_mask=(~mask).long())
        hf_logits, hf_boxes = _hf_layer_outputs(hf, inner)

    assert out.logits.shape == (DECODER_LAYERS, 2, QUERIES, CLASSES) == hf_logits.shape
    errors = {"encoder": (memory.memory - inner.encoder_last_hidden_state).abs().max().item(),
              "final logits": (out.logits[-1] - final.logits).abs().max().item(),
              "final boxes": (out.boxes[-1] - final.pred_boxes).abs().max().item(),
              "layer logits": (out.logits - hf_logits).abs().max().item(),
              "layer boxes": (out.boxes - hf_boxes).abs().max().item()}
    if two_stage:
        errors["selected proposals"] = (memory.selected - inner.init_reference_points).abs().max().item()
    print(f"\nlevels={levels} box_refine={box_refine} two_stage={two_stage}: max abs error {errors}")
    assert out.logits.std(dim=2).mean() > 1e-3 and out.boxes.std(dim=2).mean() > 0.02  # queries differ
    assert max(errors.values()) < 1e-4, errors

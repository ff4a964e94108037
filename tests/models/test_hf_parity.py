"""Numerical parity of our DAB-DETR with HF transformers' `DabDetrForObjectDetection` on shared weights."""
from __future__ import annotations

import pytest
import torch

from kddetr.config import BackboneConfig, ModelConfig
from kddetr.interop.hf import hf_to_ours
from kddetr.interop.hf_dab_detr import DAB
from kddetr.models.dab_detr import DABDETR
from kddetr.models.protocol import ImageBatch
from tests.interop import randomise  # unit-scale weights, so that a wrong mapping shows

transformers = pytest.importorskip("transformers")
hf_dab = pytest.importorskip("transformers.models.dab_detr.modeling_dab_detr")

HIDDEN, HEADS, FFN, QUERIES, CLASSES = 32, 4, 64, 12, 5
BACKBONES = {  # our name -> HF ResNetConfig arguments
    "resnet10": dict(layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512]),
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]),
}


def _build_pair(backbone: str, num_stages: int, activation: str, normalize_before: bool):
    backbone_cfg = transformers.ResNetConfig(embedding_size=64, out_features=[f"stage{num_stages}"],
                                             **BACKBONES[backbone])
    hf_cfg = transformers.DabDetrConfig(
        backbone_config=backbone_cfg, hidden_size=HIDDEN, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        num_queries=QUERIES, num_labels=CLASSES, activation_function=activation,
        normalize_before=normalize_before, dropout=0.0)
    torch.manual_seed(0)
    hf = transformers.DabDetrForObjectDetection(hf_cfg).eval()
    randomise(hf)
    cfg = ModelConfig(backbone=BackboneConfig(name=backbone, num_stages=num_stages, frozen_bn=True),
                      hidden_dim=HIDDEN, num_heads=HEADS, encoder_layers=2, decoder_layers=3,
                      dim_feedforward=FFN, num_queries=QUERIES, activation=activation,
                      ).replace(normalize_before=normalize_before, temperature=hf_cfg.temperature_height)
    ours = DABDETR(cfg, CLASSES).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict(), num_stages, DAB), strict=True)
    return hf, ours


@pytest.mark.parametrize("backbone,num_stages,activation,normalize_before", [
    ("resnet10", 3, "prelu", False),
    ("resnet50", 4, "relu", True),
])
def test_matches_hf_dab_detr(backbone: str, num_stages: int, activation: str, normalize_before: bool) -> None:
    hf, ours = _build_pair(backbone, num_stages, activation, normalize_before)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    images[1, :, 64:], images[1, :, :, 80:] = 0, 0
    mask[1, 64:], mask[1, :, 80:] = True, True

    with torch.no_grad():
        out = ours(ImageBatch(images, mask))
        final = hf(pixel_values=images, pixel_mask=(~mask).long())
        inner = hf.model(pixel_values=images, pixel_mask=(~mask).long())
        hidden = inner.intermediate_hidden_states  # every layer's normalised output, HF heads applied below
        hf_logits = hf.class_embed(hidden)
        hf_boxes = (hf.bbox_predictor(hidden) + hf_dab.inverse_sigmoid(inner.reference_points)).sigmoid()

    assert out.logits.shape == (3, 2, QUERIES, CLASSES) and hf_logits.shape == out.logits.shape
    errors = {"final logits": (out.logits[-1] - final.logits).abs().max().item(),
              "final boxes": (out.boxes[-1] - final.pred_boxes).abs().max().item(),
              "layer logits": (out.logits - hf_logits).abs().max().item(),
              "layer boxes": (out.boxes - hf_boxes).abs().max().item()}
    print(f"\n{backbone}: max abs error {errors}")
    print(f"spread over queries: logits {out.logits.std(dim=2).mean():.4f}, boxes {out.boxes.std(dim=2).mean():.4f}")
    assert out.logits.std(dim=2).mean() > 1e-3 and out.boxes.std(dim=2).mean() > 0.05  # queries differ
    assert max(errors.values()) < 1e-4, errors

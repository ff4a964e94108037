"""Numerical parity of our DAB-DETR with HF transformers' `DabDetrForObjectDetection` on shared weights."""
from __future__ import annotations

import re

import pytest
import torch

from kddetr.config import BackboneConfig, ModelConfig
from kddetr.models.dab_detr import DABDETR
from kddetr.models.protocol import ImageBatch

transformers = pytest.importorskip("transformers")
hf_dab = pytest.importorskip("transformers.models.dab_detr.modeling_dab_detr")

HIDDEN, HEADS, FFN, QUERIES, CLASSES = 32, 4, 64, 12, 5
BACKBONES = {  # our name -> HF ResNetConfig arguments
    "resnet10": dict(layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512]),
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]),
}
# HF module names -> ours (parameter names keep their last component).
TOP = {"model.query_refpoint_embeddings": "refpoint_embed", "model.input_projection": "input_proj",
       "model.encoder.query_scale": "encoder.query_scale", "model.encoder.norm": "encoder.norm",
       "model.decoder.layernorm": "decoder.norm", "model.decoder.query_scale": "decoder.query_scale",
       "model.decoder.ref_point_head": "decoder.ref_point_head",
       "model.decoder.ref_anchor_head": "decoder.ref_anchor_head",
       "bbox_predictor": "bbox_embed", "class_embed": "class_embed"}
ENCODER_LAYER = {"self_attn.out_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm1",
                 "final_layer_norm": "norm2", "fc1": "ffn.linear1", "fc2": "ffn.linear2",
                 "activation_fn": "ffn.activation"}
DECODER_LAYER = {"self_attn.self_attn_query_content_proj": "sa_qcontent_proj",
                 "self_attn.self_attn_query_pos_proj": "sa_qpos_proj",
                 "self_attn.self_attn_key_content_proj": "sa_kcontent_proj",
                 "self_attn.self_attn_key_pos_proj": "sa_kpos_proj",
                 "self_attn.self_attn_value_proj": "sa_v_proj",
                 "self_attn.self_attn.output_proj": "self_attn.out_proj",
                 "self_attn.self_attn_layer_norm": "norm1",
                 "cross_attn.cross_attn_query_content_proj": "ca_qcontent_proj",
                 "cross_attn.cross_attn_query_pos_proj": "ca_qpos_proj",
                 "cross_attn.cross_attn_query_pos_sine_proj": "ca_qpos_sine_proj",
                 "cross_attn.cross_attn_key_content_proj": "ca_kcontent_proj",
                 "cross_attn.cross_attn_key_pos_proj": "ca_kpos_proj",
                 "cross_attn.cross_attn_value_proj": "ca_v_proj",
                 "cross_attn.cross_attn.output_proj": "cross_attn.out_proj",
                 "cross_attn.cross_attn_layer_norm": "norm2",
                 "mlp.final_layer_norm": "norm3", "mlp.fc1": "ffn.linear1", "mlp.fc2": "ffn.linear2",
                 "mlp.activation_fn": "ffn.activation"}


def _resnet_name(module: str, kind: str) -> str:
    """HF ResNet module + convolution|normalization -> torchvision ResNet name."""
    if module == "embedder.embedder":
        return "conv1" if kind == "convolution" else "bn1"
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d+))", module)
    block = f"layer{int(m[1]) + 1}.{m[2]}"
    if m[3] == "shortcut":
        return f"{block}.downsample.{0 if kind == 'convolution' else 1}"
    return f"{block}.{'conv' if kind == 'convolution' else 'bn'}{int(m[4]) + 1}"


def _rename(key: str) -> str:
    module, leaf = key.rsplit(".", 1)
    if m := re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", module):
        table = ENCODER_LAYER if m[1] == "encoder" else DECODER_LAYER
        return f"{m[1]}.layers.{m[2]}.{table[m[3]]}.{leaf}"
    if m := re.fullmatch(r"model\.backbone\.conv_encoder\.model\.(.+)\.(convolution|normalization)", module):
        return f"backbone.body.{_resnet_name(m[1], m[2])}.{leaf}"
    for prefix, ours in TOP.items():
        if key.startswith(prefix + "."):
            return ours + key[len(prefix):]
    raise KeyError(f"no mapping for HF parameter {key}")


def hf_to_ours(hf_state: dict[str, torch.Tensor], num_stages: int) -> dict[str, torch.Tensor]:
    """Rename an HF DAB-DETR state dict to ours; the encoder's q/k/v projections become one in_proj.

    HF builds (and runs) every ResNet stage whatever its `out_features`; ours stops at `num_stages`.
    """
    ours: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        stage = re.search(r"\.stages\.(\d+)\.", key)
        if key.startswith("model.decoder.bbox_embed.") or (stage and int(stage[1]) >= num_stages):
            continue  # the decoder's box head is tied to bbox_predictor
        if m := re.fullmatch(r"model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault(f"encoder.layers.{m[1]}.self_attn.in_proj_{m[3]}", {})[m[2]] = value
        else:
            ours[_rename(key)] = value
    for key, parts in qkv.items():
        ours[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return ours


def _randomise(model: torch.nn.Module) -> None:
    """Fresh weights at unit-gain scale and random norm statistics.

    HF's own init (std 0.02, identity norms, zero box head) makes every query give nearly the same
    output, which would hide a wrong mapping of the query-dependent parts.
    """
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            noise = torch.randn(t.shape, generator=gen)
            if "query_refpoint" in name:
                t.copy_(noise)
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif t.dim() == 2:
                t.copy_(noise / t.shape[1] ** 0.5)
            elif t.dim() > 2:
                t.add_(0.5 * t.std() * noise)
            else:
                t.add_(0.1 * noise)


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
    _randomise(hf)
    cfg = ModelConfig(backbone=BackboneConfig(name=backbone, num_stages=num_stages, frozen_bn=True),
                      hidden_dim=HIDDEN, num_heads=HEADS, encoder_layers=2, decoder_layers=3,
                      dim_feedforward=FFN, num_queries=QUERIES, activation=activation,
                      normalize_before=normalize_before, temperature=hf_cfg.temperature_height)
    ours = DABDETR(cfg, CLASSES).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict(), num_stages), strict=True)
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

"""HF transformers' DAB-DETR (`DabDetrForObjectDetection`) to and from ours."""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from kddetr.config import ModelConfig
from kddetr.errors import UserError
from kddetr.interop.hf import (FFN, HFConverter, Naming, backbone_from_hf, check_activation, check_same,
                               common_fields, hf_to_ours, refuse, rename_to_hf, resnet_config)
from kddetr.models.dab_detr import DABOptions

DAB = Naming(
    top={"model.query_refpoint_embeddings": "refpoint_embed", "model.input_projection": "input_proj",
         "model.patterns": "patterns",
         "model.encoder.query_scale": "encoder.query_scale", "model.encoder.norm": "encoder.norm",
         "model.decoder.layernorm": "decoder.norm", "model.decoder.query_scale": "decoder.query_scale",
         "model.decoder.ref_point_head": "decoder.ref_point_head",
         "model.decoder.ref_anchor_head": "decoder.ref_anchor_head",
         "bbox_predictor": "bbox_embed", "class_embed": "class_embed"},
    encoder={"self_attn.out_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
             **FFN},
    decoder={"self_attn.self_attn_query_content_proj": "sa_qcontent_proj",
             "self_attn.self_attn_query_pos_proj": "sa_qpos_proj",
             "self_attn.self_attn_key_content_proj": "sa_kcontent_proj",
             "self_attn.self_attn_key_pos_proj": "sa_kpos_proj", "self_attn.self_attn_value_proj": "sa_v_proj",
             "self_attn.self_attn.output_proj": "self_attn.out_proj", "self_attn.self_attn_layer_norm": "norm1",
             "cross_attn.cross_attn_query_content_proj": "ca_qcontent_proj",
             "cross_attn.cross_attn_query_pos_proj": "ca_qpos_proj",
             "cross_attn.cross_attn_query_pos_sine_proj": "ca_qpos_sine_proj",
             "cross_attn.cross_attn_key_content_proj": "ca_kcontent_proj",
             "cross_attn.cross_attn_key_pos_proj": "ca_kpos_proj", "cross_attn.cross_attn_value_proj": "ca_v_proj",
             "cross_attn.cross_attn.output_proj": "cross_attn.out_proj", "cross_attn.cross_attn_layer_norm": "norm2",
             "mlp.final_layer_norm": "norm3", **{f"mlp.{k}": v for k, v in FFN.items()}},
    layer_infix=".layers.", fused="encoder", tied=("model.decoder.bbox_embed.",))
# DabDetrConfig defaults, which older `save_pretrained` versions leave out of config.json.
DEFAULTS: dict[str, Any] = {
    "num_queries": 300, "encoder_layers": 6, "decoder_layers": 6, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048,
    "encoder_attention_heads": 8, "decoder_attention_heads": 8, "activation_function": "prelu",
    "hidden_size": 256, "dropout": 0.1, "temperature_height": 20, "temperature_width": 20, "query_dim": 4,
    "random_refpoints_xy": False, "keep_query_pos": False, "num_patterns": 0, "normalize_before": False,
    "dilation": False, "sine_position_embedding_scale": None, "use_timm_backbone": True, "backbone": "resnet50",
}

def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` from an HF DAB-DETR config dict; options we cannot reproduce raise `UserError`."""
    model_type = hf.get("model_type")
    if model_type != "dab-detr":
        raise UserError(f"{where}: model_type={model_type!r}: a DAB-DETR config ('dab-detr') expected here")
    hf = {**DEFAULTS, **hf}
    for key, only in (("keep_query_pos", False), ("query_dim", 4)):
        if hf[key] != only:
            raise UserError(f"{where}: {key}={hf[key]!r} is not supported (only {only!r})")
    scale = hf["sine_position_embedding_scale"]
    if scale is not None and not math.isclose(scale, 2 * math.pi):
        raise UserError(f"{where}: sine_position_embedding_scale={scale} is not supported (only 2π)")
    check_same(hf, (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"),
                     ("temperature_height", "temperature_width")), where)
    check_activation(hf, ("relu", "prelu", "gelu"), where)
    backbone, _ = backbone_from_hf(hf, where, timm_out=[4])
    return ModelConfig(
        arch="dab_detr", backbone=backbone, hidden_dim=hf["hidden_size"],
        num_heads=hf["encoder_attention_heads"], encoder_layers=hf["encoder_layers"],
        decoder_layers=hf["decoder_layers"], dim_feedforward=hf["encoder_ffn_dim"], dropout=float(hf["dropout"]),
        activation=hf["activation_function"], num_queries=hf["num_queries"],
        options=DABOptions(normalize_before=hf["normalize_before"], num_patterns=hf["num_patterns"],
                           random_refpoints_xy=hf["random_refpoints_xy"], temperature=float(hf["temperature_height"])))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    dab = cfg.options
    refuse({"dab_detr.pre_norm_layers": (dab.pre_norm_layers, dab.pre_norm_layers),
            "dab_detr.modulate_hw_attn": (dab.modulate_hw_attn, not dab.modulate_hw_attn),
            "dab_detr.unknown_class_content": (dab.unknown_class_content, dab.unknown_class_content),
            "backbone.dilation": (cfg.backbone.dilation, cfg.backbone.dilation),
            "dab_detr.temperature": (dab.temperature, not float(dab.temperature).is_integer())}, "DabDetrConfig")
    return {
        "model_type": "dab-detr", **common_fields(cfg, "DabDetrForObjectDetection"),
        "backbone_config": resnet_config(cfg.backbone, [cfg.backbone.num_stages]),
        "hidden_size": cfg.hidden_dim, "num_patterns": dab.num_patterns,
        "random_refpoints_xy": dab.random_refpoints_xy, "normalize_before": dab.normalize_before,
        "keep_query_pos": False, "query_dim": 4,
        "temperature_height": int(dab.temperature), "temperature_width": int(dab.temperature)}


def state_to_ours(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    return hf_to_ours(state, cfg.backbone.num_stages, DAB)


def state_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF names, with the box head's copy under `model.decoder.bbox_embed` that HF ties to it."""
    hf = rename_to_hf(state, DAB)
    for key in [k for k in hf if k.startswith("bbox_predictor.")]:
        hf["model.decoder.bbox_embed." + key[len("bbox_predictor."):]] = hf[key]
    return hf


CONVERTER = HFConverter("dab-detr", "DabDetrForObjectDetection", "ConditionalDetrImageProcessor",
                        "class_embed.weight", config_from_hf, config_to_hf, state_to_ours, state_to_hf)

"""HF transformers' Deformable DETR (`DeformableDetrForObjectDetection`) to and from ours."""
from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from kddetr.config import ModelConfig
from kddetr.errors import UserError
from kddetr.interop.hf import (HFConverter, Naming, backbone_from_hf, check_activation, check_same, common_fields,
                               hf_to_ours, refuse, rename_to_hf, resnet_config)
from kddetr.models.deformable_detr import DeformableOptions

MS_DEFORM_ATTN = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
# transformers 5 renames on loading: in-memory names first, the on-disk ones (older versions', what
# `save_pretrained` writes and what export writes) last, so that they win when the tables are inverted.
ON_DISK_FFN = {"mlp.fc1": "ffn.linear1", "mlp.fc2": "ffn.linear2", "fc1": "ffn.linear1", "fc2": "ffn.linear2"}
DEFORMABLE = Naming(
    top={**{f"model.{m}": m for m in ("level_embed", "input_proj", "reference_points", "enc_output",
                                       "enc_output_norm", "pos_trans", "pos_trans_norm")},
         "model.query_position_embeddings": "query_embed", "class_embed": "class_embed", "bbox_embed": "bbox_embed"},
    encoder={**{f"self_attn.{p}": f"self_attn.{p}" for p in MS_DEFORM_ATTN}, "self_attn_layer_norm": "norm1",
             "final_layer_norm": "norm2", **ON_DISK_FFN},
    decoder={"self_attn.o_proj": "self_attn.out_proj", "self_attn.out_proj": "self_attn.out_proj",
             "self_attn_layer_norm": "norm1", **{f"encoder_attn.{p}": f"cross_attn.{p}" for p in MS_DEFORM_ATTN},
             "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3", **ON_DISK_FFN},
    layer_infix=".", fused="decoder")
HEADS = ("class_embed", "bbox_embed")
# DeformableDetrConfig defaults, which older `save_pretrained` versions leave out of config.json.
DEFAULTS: dict[str, Any] = {
    "num_queries": 300, "encoder_layers": 6, "decoder_layers": 6, "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024,
    "encoder_attention_heads": 8, "decoder_attention_heads": 8, "activation_function": "relu", "d_model": 256,
    "dropout": 0.1, "position_embedding_type": "sine", "num_feature_levels": 4, "encoder_n_points": 4,
    "decoder_n_points": 4, "with_box_refine": False, "two_stage": False, "two_stage_num_proposals": 300,
    "dilation": False, "use_timm_backbone": True, "backbone": "resnet50",
}

def num_deformable_heads(cfg: ModelConfig) -> tuple[int, int]:
    """Class/box heads of a Deformable DETR: (ours, the reference's), which has one per prediction even if shared."""
    predictions = cfg.decoder_layers + cfg.options.two_stage
    return (predictions if cfg.options.box_refine else 1), predictions


def state_to_ours(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename an HF Deformable DETR state dict to ours, heads included.

    HF ties heads: `class_embed.i` may be saved only as `model.decoder.class_embed.i` (two-stage), or not at
    all when tied to `class_embed.0` (shared heads; class heads with box refinement alone); the same for
    `bbox_embed`. Ours keeps one shared head, or one per prediction with box refinement.
    """
    ours_heads, _ = num_deformable_heads(cfg)
    heads: dict[str, Tensor] = {}
    for kind, i in ((kind, i) for kind in HEADS for i in range(ours_heads)):
        for source in (f"{kind}.{i}.", f"model.decoder.{kind}.{i}.", f"{kind}.0."):
            found = {k[len(source):]: v for k, v in hf_state.items() if k.startswith(source)}
            if found:
                heads.update({f"{kind}.{i}.{leaf}": v for leaf, v in found.items()})
                break
    rest = {k: v for k, v in hf_state.items() if not re.match(r"(model\.decoder\.)?(class|bbox)_embed\.", k)}
    return {**hf_to_ours(rest, cfg.backbone.num_stages, DEFORMABLE), **heads}


def backbone_levels(levels: int, num_stages: int) -> list[int]:
    """The ResNet stages a Deformable DETR with `levels` feature levels takes features from (the last ones)."""
    return list(range(num_stages - min(levels, 3, num_stages) + 1, num_stages + 1))


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` from an HF Deformable DETR config dict; options we cannot reproduce raise `UserError`."""
    hf = {**DEFAULTS, **hf}
    if hf["position_embedding_type"] != "sine":
        raise UserError(f"{where}: position_embedding_type={hf['position_embedding_type']!r} is not supported "
                        "(only 'sine')")
    if hf["two_stage"] and not hf["with_box_refine"]:
        raise UserError(f"{where}: two_stage=true needs with_box_refine=true")
    check_same(hf, (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"),
                     ("encoder_n_points", "decoder_n_points")), where)
    check_activation(hf, ("relu", "gelu"), where)
    levels = hf["num_feature_levels"]
    backbone, stages = backbone_from_hf(hf, where, timm_out=[2, 3, 4] if levels > 1 else [4])
    if sorted(stages) != backbone_levels(levels, backbone.num_stages):
        raise UserError(f"{where}: backbone_config out_features/out_indices {stages} with num_feature_levels="
                        f"{levels}: kddetr takes stages {backbone_levels(levels, backbone.num_stages)}")
    return ModelConfig(
        arch="deformable_detr", backbone=backbone, hidden_dim=hf["d_model"],
        num_heads=hf["encoder_attention_heads"], encoder_layers=hf["encoder_layers"],
        decoder_layers=hf["decoder_layers"], dim_feedforward=hf["encoder_ffn_dim"], dropout=float(hf["dropout"]),
        activation=hf["activation_function"],
        num_queries=hf["two_stage_num_proposals"] if hf["two_stage"] else hf["num_queries"],
        num_feature_levels=levels,
        options=DeformableOptions(num_points=hf["encoder_n_points"], box_refine=hf["with_box_refine"],
                                  two_stage=hf["two_stage"]))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    refuse({"activation": (cfg.activation, cfg.activation not in ("relu", "gelu")),
            "backbone.dilation": (cfg.backbone.dilation, cfg.backbone.dilation)}, "DeformableDetrConfig")
    return {
        "model_type": "deformable_detr", **common_fields(cfg, "DeformableDetrForObjectDetection"),
        "backbone_config": resnet_config(cfg.backbone, backbone_levels(cfg.num_feature_levels,
                                                                        cfg.backbone.num_stages)),
        "d_model": cfg.hidden_dim, "position_embedding_type": "sine",
        "num_feature_levels": cfg.num_feature_levels, "encoder_n_points": cfg.options.num_points,
        "decoder_n_points": cfg.options.num_points, "with_box_refine": cfg.options.box_refine,
        "two_stage": cfg.options.two_stage, "two_stage_num_proposals": cfg.num_queries,
        "tie_word_embeddings": False}  # every head is written out (HF would tie box-refine class heads)


def state_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF names; heads written once per prediction, and again under `model.decoder` where HF ties them."""
    heads = {k: v for k, v in state.items() if k.startswith(tuple(f"{h}." for h in HEADS))}
    hf = rename_to_hf({k: v for k, v in state.items() if k not in heads}, DEFORMABLE)
    ours_heads, hf_heads = num_deformable_heads(cfg)
    copies = {"bbox_embed": cfg.options.box_refine, "class_embed": cfg.options.two_stage}
    for key, value in heads.items():
        kind, i, rest = key.split(".", 2)
        for j in (range(hf_heads) if ours_heads == 1 else [int(i)]):
            hf[f"{kind}.{j}.{rest}"] = value
            if copies[kind]:
                hf[f"model.decoder.{kind}.{j}.{rest}"] = value
    return hf


CONVERTER = HFConverter("deformable_detr", "DeformableDetrForObjectDetection", "DeformableDetrImageProcessor",
                        "class_embed.0.weight", config_from_hf, config_to_hf, state_to_ours, state_to_hf)

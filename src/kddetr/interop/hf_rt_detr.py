"""HF transformers' RT-DETR and RT-DETRv2 (`RTDetrForObjectDetection`, `...V2ForObjectDetection`) to and from ours."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from kddetr.config import BackboneConfig, DenoisingConfig, LossConfig, ModelConfig
from kddetr.errors import UserError
from kddetr.interop.hf import (HFConverter, _hf_resnet_to_tv, _tv_resnet_to_hf, backbone_from_hf, check_same,
                               refuse, resnet_config)
from kddetr.models.backbone import RESNETS
from kddetr.models.resnet_vd import VD_SHAPES, ResNetVd
from kddetr.models.rt_detr import RTDetrOptions

HF_BACKBONE = "model.backbone.model."
# HF (as in memory; `#` is a layer index) -> ours. `save_pretrained` writes the older names, `ON_DISK` below.
AIFI_LAYER = ("model.encoder.aifi.#.layers.#.", "encoder.aifi.#.#.")
DECODER_LAYER = ("model.decoder.layers.#.", "decoder.#.")
LAYER_PARTS = {"aifi": {"self_attn.o_proj.": "self_attn.out_proj.", "self_attn_layer_norm.": "norm1.",
                        "mlp.fc1.": "ffn.linear1.", "mlp.fc2.": "ffn.linear2.", "final_layer_norm.": "norm2."},
               "decoder": {"self_attn.o_proj.": "self_attn.out_proj.", "self_attn_layer_norm.": "norm1.",
                           "encoder_attn.": "cross_attn.", "encoder_attn_layer_norm.": "norm2.",
                           "mlp.fc1.": "ffn.linear1.", "mlp.fc2.": "ffn.linear2.", "final_layer_norm.": "norm3."}}
TABLE: list[tuple[str, str]] = [
    *[(AIFI_LAYER[0] + hf, AIFI_LAYER[1] + ours) for hf, ours in LAYER_PARTS["aifi"].items()],
    *[(DECODER_LAYER[0] + hf, DECODER_LAYER[1] + ours) for hf, ours in LAYER_PARTS["decoder"].items()],
    (HF_BACKBONE + "embedder.embedder.#.", "backbone.stem.#."),  # ResNet-vd
    (HF_BACKBONE + "encoder.stages.#.layers.#.", "backbone.stages.#.#."),
    *[(f"model.encoder.{part}.", f"encoder.{part}.")
      for part in ("lateral_convs", "fpn_blocks", "downsample_convs", "pan_blocks")],
    *[(f"model.{part}.", f"{part}.") for part in ("encoder_input_proj", "decoder_input_proj", "enc_output",
                                                   "enc_score_head", "enc_bbox_head")],
    ("model.decoder.query_pos_head.", "query_pos_head."), ("model.decoder.class_embed.", "class_embed."),
    ("model.decoder.bbox_embed.", "bbox_embed."), ("model.denoising_class_embed.", "denoising.label_embed."),
    ("model.weight_embedding.", "query_content."),
    AIFI_LAYER, DECODER_LAYER,  # the rest of a layer (q/k/v projections, fused in ours), after its parts above
]
ON_DISK = [(r"\.out_proj\.", ".o_proj."), (r"layers\.(\d+)\.fc([12])\.", r"layers.\1.mlp.fc\2."),
           (r"encoder\.encoder\.(\d+)\.layers\.", r"encoder.aifi.\1.layers.")]  # what transformers 5 renames
QKV = re.compile(r"(.+\.self_attn\.)([qkv])_proj\.(weight|bias)")
# RTDetrConfig's defaults, which `save_pretrained` may leave out of config.json
DEFAULTS: dict[str, Any] = {
    "layer_norm_eps": 1e-5, "batch_norm_eps": 1e-5, "backbone_config": None, "freeze_backbone_batch_norms": True,
    "encoder_hidden_dim": 256, "encoder_in_channels": [512, 1024, 2048], "encoder_layers": 1,
    "encoder_ffn_dim": 1024, "encoder_attention_heads": 8, "dropout": 0.0, "encode_proj_layers": [2],
    "positional_encoding_temperature": 10000, "encoder_activation_function": "gelu", "activation_function": "silu",
    "eval_size": None, "normalize_before": False, "hidden_expansion": 1.0, "d_model": 256, "num_queries": 300,
    "decoder_in_channels": [256, 256, 256], "decoder_ffn_dim": 1024, "num_feature_levels": 3, "decoder_n_points": 4,
    "decoder_layers": 6, "decoder_attention_heads": 8, "decoder_activation_function": "relu", "num_denoising": 100,
    "label_noise_ratio": 0.5, "box_noise_scale": 1.0, "learn_initial_query": False, "with_box_refine": True,
    "matcher_alpha": 0.25, "matcher_gamma": 2.0, "matcher_class_cost": 2.0, "matcher_bbox_cost": 5.0,
    "matcher_giou_cost": 2.0, "auxiliary_loss": True, "focal_loss_alpha": 0.75, "focal_loss_gamma": 2.0,
    "weight_loss_vfl": 1.0, "weight_loss_bbox": 5.0, "weight_loss_giou": 2.0, "decoder_n_levels": 3,
    "decoder_offset_scale": 0.5, "decoder_method": "default"}
VD_DEFAULTS: dict[str, Any] = {"embedding_size": 64, "hidden_act": "relu", "downsample_in_first_stage": False,
                               "downsample_in_bottleneck": False, "layer_type": "bottleneck", "depths": [3, 4, 6, 3],
                               "hidden_sizes": [256, 512, 1024, 2048], "out_indices": [2, 3, 4]}
ACTIVATIONS = ("relu", "gelu", "silu")


def _pattern(template: str) -> str:
    return re.escape(template).replace("\\#", r"(\d+)").replace("#", r"(\d+)")


def _fill(template: str, numbers: tuple[str, ...]) -> str:
    parts = template.split("#")
    return parts[0] + "".join(n + rest for n, rest in zip(numbers, parts[1:]))


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    """`key` through the first (source, target) template pair of `table` whose source prefixes it."""
    for source, target in table:
        if m := re.match(_pattern(source), key):
            return _fill(target, m.groups()) + key[m.end():]
    raise KeyError(key)


def _backbone_to_ours(key: str, cfg: ModelConfig) -> str:
    """An HF backbone parameter name -> ours (ResNet-vd names follow the table, torchvision's are re-laid out)."""
    if cfg.options.resnet_variant == "vd":
        return _rename(key, TABLE)
    module, kind, leaf = re.fullmatch(r"(.+)\.(convolution|normalization)\.(\w+)", key[len(HF_BACKBONE):]).groups()
    return f"backbone.body.{_hf_resnet_to_tv(module, kind)}.{leaf}"


def _stage(name: str) -> int:
    """The backbone stage (1..4) of one of our parameter names, 0 for the stem and everything else."""
    if m := re.match(r"backbone\.stages\.(\d+)\.", name):
        return int(m[1]) + 1
    m = re.match(r"backbone\.body\.layer(\d)\.", name)
    return 0 if m is None else int(m[1])


def state_to_ours(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename an HF RT-DETR(v2) state dict (on-disk or in-memory names) to ours: q/k/v projections fused, the
    decoder's heads (v2 keeps top-level copies too), the denoising padding row and unused stages dropped."""
    ours: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in hf_state.items():
        for pattern, repl in ON_DISK:
            key = re.sub(pattern, repl, key)
        if key.startswith(("class_embed.", "bbox_embed.")) or key.endswith("n_points_scale"):
            continue  # v2's copies of the decoder's heads; the sampling scale is computed
        if key.startswith(HF_BACKBONE) and key.endswith("num_batches_tracked") and cfg.backbone.frozen_bn:
            continue
        if m := QKV.fullmatch(key):
            qkv.setdefault(m[1], {})[f"{m[2]}.{m[3]}"] = value
            continue
        try:
            name = _backbone_to_ours(key, cfg) if key.startswith(HF_BACKBONE) else _rename(key, TABLE)
        except (KeyError, AttributeError):
            raise UserError(f"HF weights: no kddetr parameter for {key!r}") from None
        if _stage(name) <= cfg.backbone.num_stages:
            ours[name] = value
    for prefix, parts in qkv.items():
        name = _rename(prefix, TABLE)
        for leaf in ("weight", "bias"):
            ours[f"{name}in_proj_{leaf}"] = torch.cat([parts[f"{p}.{leaf}"] for p in "qkv"])
    if "denoising.label_embed.weight" in ours:  # HF's last row: padding queries' label (ours: zero content)
        ours["denoising.label_embed.weight"] = ours["denoising.label_embed.weight"][:-1]
    return ours


def state_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> HF's on-disk names, with what HF holds besides: v2's top-level head copies and sampling
    scales, the denoising padding row, and the backbone stages we do not use (initial weights)."""
    inverse = [(ours, hf) for hf, ours in TABLE]
    hf: dict[str, Tensor] = {}
    for key, value in {**state, **_unused_stages(cfg)}.items():
        if m := re.fullmatch(r"(.+\.self_attn\.)in_proj_(weight|bias)", key):
            prefix = _rename(m[1], inverse)
            for part, chunk in zip("qkv", value.chunk(3)):
                hf[f"{prefix}{part}_proj.{m[2]}"] = chunk
        elif key.startswith("backbone.body."):
            hf[HF_BACKBONE + _tv_resnet_to_hf(key[len("backbone.body."):])] = value
        else:
            try:
                hf[_rename(key, inverse)] = value
            except KeyError:
                raise UserError(f"{key}: this parameter has no place in HF's model") from None
    if "model.denoising_class_embed.weight" in hf:
        embed = hf["model.denoising_class_embed.weight"]
        hf["model.denoising_class_embed.weight"] = torch.cat((embed, embed.new_zeros(1, embed.shape[1])))
    if cfg.options.version == "v2":
        for key in [k for k in hf if k.startswith(("model.decoder.class_embed.", "model.decoder.bbox_embed."))]:
            hf[key[len("model.decoder."):]] = hf[key]
        points = cfg.options.num_points * (cfg.num_feature_levels // len(cfg.options.num_points))
        scale = torch.tensor([1 / n for n in points for _ in range(n)])
        for i in range(cfg.decoder_layers):
            hf[f"model.decoder.layers.{i}.encoder_attn.n_points_scale"] = scale
    return {_on_disk(k): v for k, v in hf.items()}


def _on_disk(key: str) -> str:
    """An in-memory HF name as `save_pretrained` writes it (and older transformers name it)."""
    key = re.sub(r"encoder\.aifi\.(\d+)\.layers\.", r"encoder.encoder.\1.layers.", key)
    key = re.sub(r"layers\.(\d+)\.mlp\.fc([12])\.", r"layers.\1.fc\2.", key)
    return key.replace(".o_proj.", ".out_proj.")


def _unused_stages(cfg: ModelConfig) -> dict[str, Tensor]:
    """Initial weights of the ResNet stages after `num_stages` (HF builds all four), under our names."""
    if cfg.options.resnet_variant == "vd":
        full = ResNetVd(cfg.backbone.name, 4, frozen_bn=True).state_dict()
        return {f"backbone.{k}": v for k, v in full.items() if _stage(f"backbone.{k}") > cfg.backbone.num_stages}
    full = RESNETS[cfg.backbone.name]().state_dict()
    return {f"backbone.body.{k}": v for k, v in full.items() if not k.startswith("fc.")
            and not k.endswith("num_batches_tracked") and _stage(f"backbone.body.{k}") > cfg.backbone.num_stages}


def _vd_backbone(sub: dict, where: str, frozen: bool) -> tuple[BackboneConfig, list[int]]:
    sub = {**VD_DEFAULTS, **{k: v for k, v in sub.items() if v is not None}}
    for key in ("embedding_size", "hidden_act", "downsample_in_first_stage", "downsample_in_bottleneck"):
        if sub[key] != VD_DEFAULTS[key]:
            raise UserError(f"{where}: backbone_config.{key}={sub[key]!r} is not supported "
                            f"(only {VD_DEFAULTS[key]!r}, as RT-DETR's ResNet-vd)")
    name = next((n for n, (t, d) in VD_SHAPES.items() if t == sub["layer_type"] and d == list(sub["depths"])), None)
    if name is None:
        raise UserError(f"{where}: backbone_config layer_type={sub['layer_type']!r} depths={sub['depths']} is not "
                        f"one of our ResNet-vd depths ({', '.join(VD_SHAPES)})")
    widths = [64 * 2 ** i * (4 if sub["layer_type"] == "bottleneck" else 1) for i in range(4)]
    if list(sub["hidden_sizes"]) != widths:
        raise UserError(f"{where}: backbone_config.hidden_sizes={sub['hidden_sizes']} differ from {name}'s {widths}")
    stages = [int(s.removeprefix("stage")) for s in sub.get("out_features") or []] or list(sub["out_indices"])
    return BackboneConfig(name=name, num_stages=max(stages), frozen_bn=frozen, freeze_stem=False), stages


def encoder_stages(levels: int, num_stages: int) -> list[int]:
    """The backbone stages RT-DETR with `levels` decoder levels encodes (the last min(levels, 3) ones)."""
    return list(range(num_stages - min(levels, 3, num_stages) + 1, num_stages + 1))


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` from an HF RT-DETR(v2) config dict; what we cannot reproduce raises `UserError`."""
    version = "v2" if hf.get("model_type") == "rt_detr_v2" else "v1"
    hf = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k == "eval_size"}}
    for key, ok in (("with_box_refine", hf["with_box_refine"]),
                    ("eval_size", hf["eval_size"] is None),  # HF drops AIFI's positions at evaluation then
                    ("positional_encoding_temperature", hf["positional_encoding_temperature"] == 10000),
                    ("layer_norm_eps", hf["layer_norm_eps"] == 1e-5), ("batch_norm_eps", hf["batch_norm_eps"] == 1e-5),
                    ("decoder_activation_function", hf["decoder_activation_function"] in ("relu", "gelu")),
                    ("activation_function", hf["activation_function"] in ACTIVATIONS),
                    ("encoder_activation_function", hf["encoder_activation_function"] in ACTIVATIONS)):
        if not ok:
            raise UserError(f"{where}: {key}={hf[key]!r} is not supported")
    check_same(hf, (("encoder_attention_heads", "decoder_attention_heads"),), where)
    sub = hf["backbone_config"] or {"model_type": "rt_detr_resnet"}
    frozen = bool(hf["freeze_backbone_batch_norms"])
    if sub.get("model_type") == "rt_detr_resnet":
        backbone, stages = _vd_backbone(sub, where, frozen)
        variant = "vd"
    else:
        backbone, stages = backbone_from_hf({**hf, "dilation": False, "use_timm_backbone": False}, where, [2, 3, 4])
        backbone.frozen_bn, backbone.freeze_stem, variant = frozen, False, "plain"
    levels, encoder_dim = hf["num_feature_levels"], hf["encoder_hidden_dim"]
    encoded = encoder_stages(levels, backbone.num_stages)
    if sorted(stages) != encoded or len(hf["encoder_in_channels"]) != len(stages):
        raise UserError(f"{where}: backbone stages {stages} with num_feature_levels={levels} and encoder_in_channels="
                        f"{hf['encoder_in_channels']}: kddetr encodes stages {encoded}")
    if list(hf["decoder_in_channels"]) != [encoder_dim] * len(stages) or levels > len(stages) + 1:
        raise UserError(f"{where}: decoder_in_channels={hf['decoder_in_channels']} with num_feature_levels={levels}: "
                        f"kddetr projects each encoder level ({encoder_dim} channels) and at most one more level")
    if version == "v2" and hf["decoder_n_levels"] != levels:
        raise UserError(f"{where}: decoder_n_levels={hf['decoder_n_levels']} differs from num_feature_levels={levels}")
    options = RTDetrOptions(
        version=version, resnet_variant=variant, encoder_dim=0 if encoder_dim == hf["d_model"] else encoder_dim,
        encoder_ffn_dim=0 if hf["encoder_ffn_dim"] == hf["decoder_ffn_dim"] else hf["encoder_ffn_dim"],
        aifi_levels=list(hf["encode_proj_layers"]), expansion=float(hf["hidden_expansion"]),
        activation=hf["activation_function"], encoder_activation=hf["encoder_activation_function"],
        pre_norm=bool(hf["normalize_before"]), num_points=[hf["decoder_n_points"]],
        decoder_method=hf["decoder_method"] if version == "v2" else "default",
        decoder_offset_scale=float(hf["decoder_offset_scale"]) if version == "v2" else 0.5,
        learn_query_content=bool(hf["learn_initial_query"]), varifocal_alpha=float(hf["focal_loss_alpha"]),
        varifocal_gamma=float(hf["focal_loss_gamma"]))
    loss = LossConfig(cls_weight=hf["weight_loss_vfl"], bbox_weight=hf["weight_loss_bbox"],
                      giou_weight=hf["weight_loss_giou"], focal_alpha=hf["matcher_alpha"],
                      focal_gamma=hf["matcher_gamma"], match_cls_cost=hf["matcher_class_cost"],
                      match_bbox_cost=hf["matcher_bbox_cost"], match_giou_cost=hf["matcher_giou_cost"],
                      aux_loss=bool(hf["auxiliary_loss"]))
    denoising = DenoisingConfig(enabled=hf["num_denoising"] > 0, contrastive=True,
                                query_budget=max(hf["num_denoising"], 0), label_noise=float(hf["label_noise_ratio"]),
                                box_noise=float(hf["box_noise_scale"]))
    return ModelConfig(arch="rt_detr", backbone=backbone, hidden_dim=hf["d_model"],
                       num_heads=hf["decoder_attention_heads"], encoder_layers=hf["encoder_layers"],
                       decoder_layers=hf["decoder_layers"], dim_feedforward=hf["decoder_ffn_dim"],
                       dropout=float(hf["dropout"]), activation=hf["decoder_activation_function"],
                       num_queries=hf["num_queries"], num_feature_levels=levels, loss=loss, denoising=denoising,
                       options=options)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    options, backbone = cfg.options, cfg.backbone
    encoder_levels = len(encoder_stages(cfg.num_feature_levels, backbone.num_stages))
    refuse({"activation": (cfg.activation, cfg.activation not in ("relu", "gelu")),
            "backbone.dilation": (backbone.dilation, backbone.dilation),
            "rt_detr.csp_blocks": (options.csp_blocks, options.csp_blocks != 3),  # HF: always 3
            "rt_detr.num_points": (options.num_points, len(set(options.num_points)) > 1),
            "num_feature_levels": (cfg.num_feature_levels, cfg.num_feature_levels > encoder_levels + 1),
            "rt_detr.anchor_size": (options.anchor_size, options.anchor_size != 0.05)},
           "RTDetrConfig")
    stages = encoder_stages(cfg.num_feature_levels, backbone.num_stages)
    if options.resnet_variant == "vd":
        layer_type, depths = VD_SHAPES[backbone.name]
        sub: dict[str, Any] = {"model_type": "rt_detr_resnet", **VD_DEFAULTS, "layer_type": layer_type,
                               "depths": depths, "hidden_sizes": [64 * 2 ** i * (4 if layer_type == "bottleneck" else 1)
                                                                  for i in range(4)],
                               "out_features": [f"stage{s}" for s in stages]}
        sub.pop("out_indices")
        channels = ResNetVd(backbone.name, backbone.num_stages).stage_channels
    else:
        sub = resnet_config(backbone, stages)
        channels = sub["hidden_sizes"]
    encoder_dim = options.encoder_dim or cfg.hidden_dim
    v2 = options.version == "v2"
    model_type = "rt_detr_v2" if v2 else "rt_detr"
    config = {
        "model_type": model_type, "architectures": ["RTDetrV2ForObjectDetection" if v2 else "RTDetrForObjectDetection"],
        "backbone_config": sub, "use_timm_backbone": False, "use_pretrained_backbone": False,
        "freeze_backbone_batch_norms": bool(backbone.frozen_bn), "encoder_hidden_dim": encoder_dim,
        "encoder_in_channels": [channels[s - 1] for s in stages], "feat_strides": [2 ** (s + 1) for s in stages],
        "encoder_layers": cfg.encoder_layers, "encoder_ffn_dim": options.encoder_ffn_dim or cfg.dim_feedforward,
        "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads, "dropout": cfg.dropout,
        "encode_proj_layers": [level % len(stages) for level in options.aifi_levels],
        "encoder_activation_function": options.encoder_activation, "activation_function": options.activation,
        "eval_size": None, "normalize_before": options.pre_norm, "hidden_expansion": options.expansion,
        "d_model": cfg.hidden_dim, "num_queries": cfg.num_queries, "decoder_in_channels": [encoder_dim] * len(stages),
        "decoder_ffn_dim": cfg.dim_feedforward, "num_feature_levels": cfg.num_feature_levels,
        "decoder_n_points": options.num_points[0], "decoder_layers": cfg.decoder_layers,
        "decoder_activation_function": cfg.activation, "num_denoising": _num_denoising(cfg.denoising),
        "label_noise_ratio": cfg.denoising.label_noise, "box_noise_scale": cfg.denoising.box_noise,
        "learn_initial_query": options.learn_query_content, "anchor_image_size": None, "with_box_refine": True,
        "matcher_alpha": cfg.loss.focal_alpha, "matcher_gamma": cfg.loss.focal_gamma,
        "matcher_class_cost": cfg.loss.match_cls_cost, "matcher_bbox_cost": cfg.loss.match_bbox_cost,
        "matcher_giou_cost": cfg.loss.match_giou_cost, "auxiliary_loss": cfg.loss.aux_loss,
        "focal_loss_alpha": options.varifocal_alpha, "focal_loss_gamma": options.varifocal_gamma,
        "weight_loss_vfl": cfg.loss.cls_weight, "weight_loss_bbox": cfg.loss.bbox_weight,
        "weight_loss_giou": cfg.loss.giou_weight, "tie_word_embeddings": False}
    if v2:
        config.update({"decoder_n_levels": cfg.num_feature_levels, "decoder_offset_scale": options.decoder_offset_scale,
                       "decoder_method": options.decoder_method})
    return config


def _num_denoising(dn: DenoisingConfig) -> int:
    """HF's num_denoising (queries per copy; groups = it // most targets of an image), 0 when off."""
    if not dn.enabled:
        return 0
    return dn.query_budget or 100


# One converter for both versions: config.json's model_type picks `rt_detr.version` on import, and it on export.
CONVERTER = HFConverter("rt_detr", "RTDetrForObjectDetection", "RTDetrImageProcessor", "class_embed.0.weight",
                        config_from_hf, config_to_hf, state_to_ours, state_to_hf, writes_unused_stages=True,
                        aliases=("rt_detr_v2",))

"""HF transformers `DabDetrForObjectDetection` directories to and from our DAB-DETR (config and weight names)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kddetr.config import BackboneConfig, ModelConfig
from kddetr.engine.checkpoint import DatasetInfo
from kddetr.errors import UserError
from kddetr.models.backbone import RESNETS

# HF module names -> ours (parameter names keep their last component).
TOP = {"model.query_refpoint_embeddings": "refpoint_embed", "model.input_projection": "input_proj",
       "model.patterns": "patterns",
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
HF_BACKBONE = "model.backbone.conv_encoder.model."
TIMM_BACKBONE = re.compile(r"model\.backbone\.conv_encoder\.model\.(?:_backbone\.)?((?:conv1|bn1|layer\d)\..+)")

# DabDetrConfig defaults, which older `save_pretrained` versions leave out of config.json.
HF_DEFAULTS: dict[str, Any] = {
    "num_queries": 300, "encoder_layers": 6, "decoder_layers": 6, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048,
    "encoder_attention_heads": 8, "decoder_attention_heads": 8, "activation_function": "prelu",
    "hidden_size": 256, "dropout": 0.1, "temperature_height": 20, "temperature_width": 20, "query_dim": 4,
    "random_refpoints_xy": False, "keep_query_pos": False, "num_patterns": 0, "normalize_before": False,
    "dilation": False, "sine_position_embedding_scale": None, "use_timm_backbone": True, "backbone": "resnet50",
}
RESNET_DEFAULTS: dict[str, Any] = {  # transformers.ResNetConfig
    "embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048], "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck", "hidden_act": "relu", "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}
RESNET_SHAPES = {  # our backbone name -> (HF layer_type, depths)
    "resnet10": ("basic", [1, 1, 1, 1]), "resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]), "resnet101": ("bottleneck", [3, 4, 23, 3]),
}
CATEGORY_IDS_KEY = "kddetr_category_ids"  # our extra config.json key: COCO ids of the labels, kept on round trips


def _hf_resnet_to_tv(module: str, kind: str) -> str:
    """HF ResNet module + convolution|normalization -> torchvision ResNet name."""
    if module == "embedder.embedder":
        return "conv1" if kind == "convolution" else "bn1"
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d+))", module)
    if m is None:
        raise KeyError(module)
    block = f"layer{int(m[1]) + 1}.{m[2]}"
    if m[3] == "shortcut":
        return f"{block}.downsample.{0 if kind == 'convolution' else 1}"
    return f"{block}.{'conv' if kind == 'convolution' else 'bn'}{int(m[4]) + 1}"


def _tv_resnet_to_hf(name: str) -> str:
    """torchvision ResNet parameter name -> HF ResNet parameter name (inverse of `_hf_resnet_to_tv`)."""
    module, leaf = name.rsplit(".", 1)
    if module in ("conv1", "bn1"):
        kind = "convolution" if module == "conv1" else "normalization"
        return f"embedder.embedder.{kind}.{leaf}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)", module)
    if m is None:
        raise KeyError(name)
    block = f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}"
    if m[3] == "downsample.":
        return f"{block}.shortcut.{'convolution' if m[4] == '0' else 'normalization'}.{leaf}"
    return f"{block}.layer.{int(m[4]) - 1}.{'convolution' if m[3] == 'conv' else 'normalization'}.{leaf}"


def _rename(key: str) -> str:
    module, leaf = key.rsplit(".", 1)
    if m := re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", module):
        table = ENCODER_LAYER if m[1] == "encoder" else DECODER_LAYER
        return f"{m[1]}.layers.{m[2]}.{table[m[3]]}.{leaf}"
    if m := TIMM_BACKBONE.fullmatch(key):
        return f"backbone.body.{m[1]}"
    if m := re.fullmatch(re.escape(HF_BACKBONE) + r"(.+)\.(convolution|normalization)", module):
        return f"backbone.body.{_hf_resnet_to_tv(m[1], m[2])}.{leaf}"
    for prefix, ours in TOP.items():
        if key.startswith(prefix + "."):
            return ours + key[len(prefix):]
    raise KeyError(key)


def hf_to_ours(hf_state: dict[str, Tensor], num_stages: int) -> dict[str, Tensor]:
    """Rename an HF DAB-DETR state dict to ours; the encoder's q/k/v projections become one in_proj.

    HF builds (and runs) every ResNet stage whatever its `out_features`; ours stops at `num_stages`.
    Backbones may be HF ResNets or timm ResNets (torchvision names under `conv_encoder.model.`).
    """
    ours: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in hf_state.items():
        if key.startswith("model.decoder.bbox_embed.") or key.endswith("num_batches_tracked"):
            continue  # the decoder's box head is tied to bbox_predictor
        if m := re.fullmatch(r"model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault(f"encoder.layers.{m[1]}.self_attn.in_proj_{m[3]}", {})[m[2]] = value
            continue
        try:
            name = _rename(key)
        except KeyError:
            raise UserError(f"HF weights: no kddetr parameter for {key!r}") from None
        stage = re.match(r"backbone\.body\.layer(\d)\.", name)
        if stage is None or int(stage[1]) <= num_stages:
            ours[name] = value
    for key, parts in qkv.items():
        ours[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return ours


def ours_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> HF names (inverse of `hf_to_ours`), with the ResNet stages we do not use filled in.

    HF always builds four ResNet stages; the unused ones get torchvision's initial weights (they never
    reach the outputs). The tied decoder box head is written beside `bbox_predictor`.
    """
    top = {ours: hf for hf, ours in TOP.items()}
    layer_tables = {"encoder": {o: h for h, o in ENCODER_LAYER.items()},
                    "decoder": {o: h for h, o in DECODER_LAYER.items()}}
    hf: dict[str, Tensor] = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if key.endswith("num_batches_tracked"):
            continue
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", key):
            for name, part in zip("qkv", value.chunk(3)):
                hf[f"model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
        elif m := re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", module):
            hf[f"model.{m[1]}.layers.{m[2]}.{layer_tables[m[1]][m[3]]}.{leaf}"] = value
        elif key.startswith("backbone.body."):
            hf[HF_BACKBONE + _tv_resnet_to_hf(key[len("backbone.body."):])] = value
        else:
            prefix = next((p for p in top if key.startswith(p + ".")), None)
            if prefix is None:
                raise UserError(f"{key}: this parameter has no place in HF's DabDetrForObjectDetection")
            hf[top[prefix] + key[len(prefix):]] = value
    unused = RESNETS[cfg.backbone.name]().state_dict()
    for key, value in unused.items():
        stage = re.match(r"layer(\d)\.", key)
        if stage and int(stage[1]) > cfg.backbone.num_stages and not key.endswith("num_batches_tracked"):
            hf[HF_BACKBONE + _tv_resnet_to_hf(key)] = value
    for key in [k for k in hf if k.startswith("bbox_predictor.")]:
        hf["model.decoder.bbox_embed." + key[len("bbox_predictor."):]] = hf[key]
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


def _backbone_from_hf(hf: dict, where: str) -> BackboneConfig:
    """Our backbone config from `backbone_config` (HF ResNet or timm ResNet) or the older top-level keys."""
    sub = hf.get("backbone_config")
    dilation = bool(hf.get("dilation", HF_DEFAULTS["dilation"]))
    if sub is None and hf.get("use_timm_backbone", HF_DEFAULTS["use_timm_backbone"]):
        sub = {"model_type": "timm_backbone", "backbone": hf.get("backbone") or HF_DEFAULTS["backbone"]}
    sub = sub if sub is not None else {"model_type": "resnet"}
    kind = sub.get("model_type")
    if kind == "timm_backbone":
        name = sub.get("backbone")
        if name not in RESNETS:
            raise UserError(f"{where}: backbone_config.backbone={name!r} is not supported "
                            f"(timm ResNets: {', '.join(RESNETS)})")
        num_stages = max(sub.get("out_indices") or [4])
        dilation = dilation or sub.get("output_stride") == 16
        return BackboneConfig(name=name, num_stages=num_stages, dilation=dilation, frozen_bn=True, freeze_stem=True)
    if kind != "resnet":
        raise UserError(f"{where}: backbone_config.model_type={kind!r} is not supported (resnet or timm_backbone)")
    if dilation:
        raise UserError(f"{where}: dilation=true needs a timm backbone; HF ResNets have no dilation")
    sub = {**RESNET_DEFAULTS, **{k: v for k, v in sub.items() if v is not None}}
    for key in ("embedding_size", "hidden_act", "downsample_in_first_stage", "downsample_in_bottleneck"):
        if sub[key] != RESNET_DEFAULTS[key]:
            raise UserError(f"{where}: backbone_config.{key}={sub[key]!r} is not supported "
                            f"(only {RESNET_DEFAULTS[key]!r}, as torchvision's ResNets)")
    name = next((n for n, (t, d) in RESNET_SHAPES.items() if t == sub["layer_type"] and d == list(sub["depths"])),
                None)
    if name is None:
        raise UserError(f"{where}: backbone_config layer_type={sub['layer_type']!r} depths={sub['depths']} "
                        f"is not one of our ResNets ({', '.join(RESNETS)})")
    widths = [64, 128, 256, 512] if sub["layer_type"] == "basic" else [256, 512, 1024, 2048]
    if list(sub["hidden_sizes"]) != widths:
        raise UserError(f"{where}: backbone_config.hidden_sizes={sub['hidden_sizes']} differ from {name}'s {widths}")
    stages = [int(s.removeprefix("stage")) for s in sub.get("out_features") or []] or sub.get("out_indices") or [4]
    return BackboneConfig(name=name, num_stages=max(stages), frozen_bn=True, freeze_stem=True)


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` from an HF DAB-DETR config dict; options we cannot reproduce raise `UserError`."""
    model_type = hf.get("model_type")
    if model_type != "dab-detr":
        raise UserError(f"{where}: model_type={model_type!r} is not supported; only 'dab-detr' for now "
                        "(Deformable DETR import comes with that detector)")
    hf = {**HF_DEFAULTS, **hf}
    for key, only in (("keep_query_pos", False), ("query_dim", 4)):
        if hf[key] != only:
            raise UserError(f"{where}: {key}={hf[key]!r} is not supported (only {only!r})")
    scale = hf["sine_position_embedding_scale"]
    if scale is not None and not math.isclose(scale, 2 * math.pi):
        raise UserError(f"{where}: sine_position_embedding_scale={scale} is not supported (only 2π)")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"),
                     ("temperature_height", "temperature_width")):
        if hf[enc] != hf[dec]:
            raise UserError(f"{where}: {dec}={hf[dec]} differs from {enc}={hf[enc]}; kddetr uses one value for both")
    if hf["activation_function"] not in ("relu", "prelu", "gelu"):
        raise UserError(f"{where}: activation_function={hf['activation_function']!r} is not supported "
                        "(relu, prelu, gelu)")
    return ModelConfig(
        arch="dab_detr", backbone=_backbone_from_hf(hf, where), hidden_dim=hf["hidden_size"],
        num_heads=hf["encoder_attention_heads"], encoder_layers=hf["encoder_layers"],
        decoder_layers=hf["decoder_layers"], dim_feedforward=hf["encoder_ffn_dim"], dropout=float(hf["dropout"]),
        activation=hf["activation_function"], normalize_before=hf["normalize_before"],
        num_queries=hf["num_queries"], num_patterns=hf["num_patterns"],
        random_refpoints_xy=hf["random_refpoints_xy"], temperature=float(hf["temperature_height"]))


def categories_from_hf(hf: dict, num_classes: int, where: str = "config.json") -> DatasetInfo:
    """Label i is HF label id i; category ids are ours when we wrote the file, else the HF label ids (or 1..C)."""
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    if not id2label:
        ids = list(range(1, num_classes + 1))
        return DatasetInfo(ids, [f"class_{i}" for i in ids])
    if sorted(id2label) != list(range(num_classes)):
        raise UserError(f"{where}: id2label has labels {sorted(id2label)[:5]}…, but the class head has "
                        f"{num_classes} outputs (labels 0..{num_classes - 1} expected)")
    names = [id2label[i] for i in range(num_classes)]
    ids = hf.get(CATEGORY_IDS_KEY) or list(range(num_classes))
    if len(ids) != num_classes:
        raise UserError(f"{where}: {CATEGORY_IDS_KEY} has {len(ids)} ids for {num_classes} classes")
    return DatasetInfo([int(i) for i in ids], names)


def _read_weights(hf_dir: Path) -> dict[str, Tensor]:
    try:
        if (hf_dir / "model.safetensors").is_file():
            return load_file(str(hf_dir / "model.safetensors"))
        if (hf_dir / "model.safetensors.index.json").is_file():
            index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
            return {k: v for shard in sorted(set(index["weight_map"].values()))
                    for k, v in load_file(str(hf_dir / shard)).items()}
        if (hf_dir / "pytorch_model.bin").is_file():
            return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable weights file is bad input
        raise UserError(f"{hf_dir}: cannot read the weights ({type(e).__name__}: {e})") from None
    raise UserError(f"{hf_dir}: no model.safetensors or pytorch_model.bin (a local HF model directory expected)")


def read_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, Tensor], DatasetInfo]:
    """A local HF `DabDetrForObjectDetection` directory -> our model config, our state dict, its categories."""
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{cfg_file}: not found (a local HF model directory with config.json expected)")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file}: invalid JSON: {e}") from None
    cfg = model_config_from_hf(hf, str(cfg_file))
    state = hf_to_ours(_read_weights(hf_dir), cfg.backbone.num_stages)
    if "class_embed.weight" not in state:
        raise UserError(f"{hf_dir}: no class_embed.weight (not a DabDetrForObjectDetection checkpoint)")
    return cfg, state, categories_from_hf(hf, state["class_embed.weight"].shape[0], str(cfg_file))


def hf_config(cfg: ModelConfig, dataset: DatasetInfo) -> dict[str, Any]:
    """The config.json of HF's `DabDetrForObjectDetection` for our model; what HF cannot express raises `UserError`."""
    unsupported = {"arch": (cfg.arch, cfg.arch != "dab_detr"),
                   "pre_norm_layers": (cfg.pre_norm_layers, cfg.pre_norm_layers),
                   "modulate_hw_attn": (cfg.modulate_hw_attn, not cfg.modulate_hw_attn),
                   "backbone.dilation": (cfg.backbone.dilation, cfg.backbone.dilation),
                   "temperature": (cfg.temperature, not float(cfg.temperature).is_integer())}
    for key, (value, bad) in unsupported.items():
        if bad:
            raise UserError(f"model.{key}: {value!r} has no equivalent in HF's DabDetrConfig")
    layer_type, depths = RESNET_SHAPES[cfg.backbone.name]
    widths = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    return {
        "model_type": "dab-detr", "architectures": ["DabDetrForObjectDetection"],
        "use_timm_backbone": False, "use_pretrained_backbone": False,
        "backbone_config": {"model_type": "resnet", **RESNET_DEFAULTS, "layer_type": layer_type, "depths": depths,
                            "hidden_sizes": widths, "out_features": [f"stage{cfg.backbone.num_stages}"]},
        "hidden_size": cfg.hidden_dim, "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.dim_feedforward, "decoder_ffn_dim": cfg.dim_feedforward,
        "activation_function": cfg.activation, "dropout": cfg.dropout, "num_queries": cfg.num_queries,
        "num_patterns": cfg.num_patterns, "random_refpoints_xy": cfg.random_refpoints_xy,
        "normalize_before": cfg.normalize_before, "keep_query_pos": False, "query_dim": 4,
        "temperature_height": int(cfg.temperature), "temperature_width": int(cfg.temperature),
        "id2label": {str(i): name for i, name in enumerate(dataset.category_names)},
        "label2id": {name: i for i, name in enumerate(dataset.category_names)},
        CATEGORY_IDS_KEY: list(dataset.category_ids),
    }


def write_hf(out: str | Path, cfg: ModelConfig, state: dict[str, Tensor], dataset: DatasetInfo) -> Path:
    """Write `config.json` + `model.safetensors` that `DabDetrForObjectDetection.from_pretrained(out)` loads."""
    config = hf_config(cfg, dataset)
    weights = ours_to_hf(state, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


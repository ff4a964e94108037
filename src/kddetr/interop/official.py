"""Checkpoints of the official DAB-DETR / KD-DETR / Deformable-DETR repos (`{"model": state_dict}`) to ours."""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from kddetr.config import Config, ModelConfig, flatten, from_dict, load_yaml
from kddetr.engine.checkpoint import DatasetInfo
from kddetr.errors import UserError
from kddetr.interop.hf import RESNET_SHAPES
from kddetr.registry import REGISTRY, load, spec

TOP_LEVEL = ("input_proj.", "refpoint_embed.", "class_embed.", "bbox_embed.")
DEFORMABLE_TOP_LEVEL = ("query_embed.", "input_proj.", "class_embed.", "bbox_embed.")
DEFORMABLE_TRANSFORMER = ("level_embed", "reference_points", "enc_output", "enc_output_norm", "pos_trans",
                          "pos_trans_norm")
DEFORMABLE_DECODER_NORMS = {"norm1": "norm2", "norm2": "norm1"}
# Options in the official `args` (saved in their checkpoints) that the weights' shapes do not tell.
DAB_ARGS = {"nheads": "num_heads", "pe_temperatureH": "dab_detr.temperature", "dilation": "backbone.dilation",
            "random_refpoints_xy": "dab_detr.random_refpoints_xy", "dropout": "dropout"}
DEFORMABLE_ARGS = {"nheads": "num_heads", "dilation": "backbone.dilation", "dropout": "dropout"}


def official_key_to_ours(key: str) -> str:
    """`backbone.0.body.*`, `transformer.{encoder,decoder,patterns}.*`, heads -> our parameter names."""
    if key.startswith("backbone.0.body."):
        return "backbone.body." + key[len("backbone.0.body."):]
    if m := re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(linear1|linear2|activation)\.(.+)", key):
        return f"{m[1]}.layers.{m[2]}.ffn.{m[3]}.{m[4]}"
    if key.startswith(("transformer.encoder.", "transformer.decoder.", "transformer.patterns.")):
        return key[len("transformer."):]
    if key.startswith(TOP_LEVEL):
        return key
    raise UserError(f"official checkpoint: no kddetr parameter for {key!r}")


def official_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official DAB-DETR state dict, dropping what our model does not hold.

    Dropped: the decoder's copy of the shared box head (`transformer.decoder.bbox_embed`), BN step
    counters, and `ca_qpos_proj` of decoder layers after the first (built, but only used with
    `keep_query_pos`, which the official DAB-DETR never turns on).
    """
    ours = {}
    for key, value in state.items():
        later_qpos = re.fullmatch(r"transformer\.decoder\.layers\.([1-9]\d*)\.ca_qpos_proj\..+", key)
        if key.startswith("transformer.decoder.bbox_embed.") or key.endswith("num_batches_tracked") or later_qpos:
            continue
        ours[official_key_to_ours(key)] = value
    return ours


def _count(state: dict[str, Tensor], pattern: str) -> int:
    return len({m[1] for key in state if (m := re.match(pattern, key))})


def _backbone_name(state: dict[str, Tensor], where: str) -> tuple[str, int]:
    """Our ResNet name and stage count from the official backbone's block structure."""
    depths = [_count(state, rf"backbone\.0\.body\.layer{s}\.(\d+)\.") for s in range(1, 5)]
    num_stages = sum(d > 0 for d in depths)
    if num_stages == 0 or "backbone.0.body.conv1.weight" not in state:
        raise UserError(f"{where}: no torchvision ResNet under backbone.0.body (only ResNet backbones are supported)")
    layer_type = "bottleneck" if any(".conv3." in k for k in state if k.startswith("backbone.0.body.")) else "basic"
    for name, (kind, full) in RESNET_SHAPES.items():
        if kind == layer_type and full[:num_stages] == depths[:num_stages]:
            return name, num_stages
    raise UserError(f"{where}: a {layer_type} ResNet with {depths[:num_stages]} blocks is not one of "
                    f"{', '.join(RESNET_SHAPES)}")


def infer_model_fields(state: dict[str, Tensor], where: str) -> dict[str, Any]:
    """Model config fields (dotted keys) that an official DAB-DETR state dict's names and shapes fix."""
    def shape(key: str) -> torch.Size:
        if key not in state:
            raise UserError(f"{where}: no {key!r}; is this an official DAB-DETR checkpoint?")
        return state[key].shape

    if any(k.startswith("bbox_embed.0.") for k in state):
        raise UserError(f"{where}: one box head per decoder layer (bbox_embed_diff_each_layer) is not supported")
    scale = "transformer.decoder.query_scale"
    if f"{scale}.weight" in state or shape(f"{scale}.layers.1.weight")[0] == 1:
        raise UserError(f"{where}: query_scale_type other than 'cond_elewise' is not supported")
    queries, query_dim = shape("refpoint_embed.weight")
    if query_dim != 4:
        raise UserError(f"{where}: refpoint_embed has {query_dim}-d anchors; DAB-DETR's are 4-d")
    encoder_layers = _count(state, r"transformer\.encoder\.layers\.(\d+)\.")
    part = "encoder" if encoder_layers else "decoder"
    name, num_stages = _backbone_name(state, where)
    fields = {
        "arch": "dab_detr", "backbone.name": name, "backbone.num_stages": num_stages,
        "hidden_dim": shape("input_proj.weight")[0], "num_queries": queries,
        "encoder_layers": encoder_layers, "decoder_layers": _count(state, r"transformer\.decoder\.layers\.(\d+)\."),
        "dim_feedforward": shape(f"transformer.{part}.layers.0.linear1.weight")[0],
        "dab_detr.num_patterns": state["transformer.patterns.weight"].shape[0]
        if "transformer.patterns.weight" in state else 0,
        "dab_detr.normalize_before": "transformer.encoder.norm.weight" in state,
        "dab_detr.modulate_hw_attn": any(k.startswith("transformer.decoder.ref_anchor_head.") for k in state),
    }
    if any(re.search(r"\.layers\.\d+\.activation\.weight$", k) for k in state):
        fields["activation"] = "prelu"  # the only activation with weights
    return fields


def deformable_key_to_ours(key: str) -> str:
    """Official Deformable-DETR names -> ours (its decoder's norm1 follows the cross-attention, ours self-attention)."""
    if key.startswith("backbone.0.body."):
        return official_key_to_ours(key)
    if m := re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.([^.]+)\.(.+)", key):
        part, index, module, rest = m.groups()
        if module in ("linear1", "linear2"):
            module = f"ffn.{module}"
        elif part == "decoder":
            module = DEFORMABLE_DECODER_NORMS.get(module, module)
        return f"{part}.{index}.{module}.{rest}"
    if key.split(".")[:2] in [["transformer", m] for m in DEFORMABLE_TRANSFORMER]:
        return key[len("transformer."):]
    if key.startswith(DEFORMABLE_TOP_LEVEL):
        return key
    raise UserError(f"official checkpoint: no kddetr parameter for {key!r}")


def deformable_official_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official Deformable-DETR state dict, dropping its copies.

    Dropped: the decoder's references to the heads (`transformer.decoder.{bbox,class}_embed`), BN step
    counters, and without box refinement the repeats of the one shared head (`class_embed.1...`).
    """
    shared = not any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    ours = {}
    for key, value in state.items():
        repeat = shared and re.match(r"(class|bbox)_embed\.[1-9]", key)
        copy = key.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed."))
        if copy or repeat or key.endswith("num_batches_tracked"):
            continue
        ours[deformable_key_to_ours(key)] = value
    return ours


def infer_deformable_fields(state: dict[str, Tensor], where: str, num_heads: int) -> dict[str, Any]:
    """Model config fields (dotted keys) that an official Deformable-DETR state dict fixes, given the head count."""
    def shape(key: str) -> torch.Size:
        if key not in state:
            raise UserError(f"{where}: no {key!r}; is this an official Deformable-DETR checkpoint?")
        return state[key].shape

    levels, dim = shape("transformer.level_embed")
    projections = _count(state, r"input_proj\.(\d+)\.")
    if projections != levels:
        raise UserError(f"{where}: {projections} input projections (input_proj) for {levels} level embeddings")
    encoder_layers = _count(state, r"transformer\.encoder\.layers\.(\d+)\.")
    samples = {shape(f"transformer.{part}.layers.0.{attn}.attention_weights.weight")[0]  # heads * levels * points
               for part, attn in (("encoder", "self_attn"), ("decoder", "cross_attn"))
               if part == "decoder" or encoder_layers}
    if len(samples) > 1:
        raise UserError(f"{where}: enc_n_points differs from dec_n_points; kddetr uses one num_points")
    points, rest = divmod(samples.pop(), num_heads * levels)
    if rest:
        raise UserError(f"{where}: its attention samples {points * num_heads * levels + rest} points per query, "
                        f"not a multiple of model.num_heads={num_heads} x {levels} levels; give the trained nheads")
    two_stage = "transformer.enc_output.weight" in state
    name, num_stages = _backbone_name(state, where)
    fields = {
        "arch": "deformable_detr", "backbone.name": name, "backbone.num_stages": num_stages, "hidden_dim": dim,
        "encoder_layers": encoder_layers, "decoder_layers": _count(state, r"transformer\.decoder\.layers\.(\d+)\."),
        "dim_feedforward": shape("transformer.decoder.layers.0.linear1.weight")[0], "num_feature_levels": levels,
        "deformable_detr.num_points": points, "deformable_detr.two_stage": two_stage, "activation": "relu",
        "deformable_detr.box_refine": any(k.startswith("transformer.decoder.bbox_embed.") for k in state),
    }
    if not two_stage:
        fields["num_queries"] = shape("query_embed.weight")[0]
    return fields


def _deformable_fields_from_args(args: dict[str, Any], where: str) -> dict[str, Any]:
    if args.get("position_embedding", "sine") != "sine":
        raise UserError(f"{where}: args.position_embedding={args['position_embedding']!r} is not supported (sine)")
    scale = args.get("position_embedding_scale")
    if scale is not None and not math.isclose(scale, 2 * math.pi):
        raise UserError(f"{where}: args.position_embedding_scale={scale} is not supported (only 2π)")
    if args.get("masks"):
        raise UserError(f"{where}: args.masks=True (segmentation) is not supported")
    fields = {ours: args[name] for name, ours in DEFORMABLE_ARGS.items() if args.get(name) is not None}
    if args.get("two_stage") and args.get("num_queries") is not None:
        fields["num_queries"] = args["num_queries"]  # two-stage keeps that many proposals; no weights tell
    return fields


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _fields_from_args(args: dict[str, Any], where: str) -> dict[str, Any]:
    if args.get("modelname", "dab_detr") != "dab_detr":
        raise UserError(f"{where}: args.modelname={args['modelname']!r}; only 'dab_detr' is supported for now")
    if args.get("pe_temperatureH") != args.get("pe_temperatureW"):
        raise UserError(f"{where}: args.pe_temperatureW={args.get('pe_temperatureW')} differs from "
                        f"pe_temperatureH={args.get('pe_temperatureH')}; kddetr uses one temperature")
    fields = {ours: args[name] for name, ours in DAB_ARGS.items() if args.get(name) is not None}
    if args.get("transformer_activation") in ("relu", "gelu"):
        fields["activation"] = args["transformer_activation"]
    return fields


def load_official_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model state dict (the `model` entry, or the whole file) and the saved `args` (empty if none)."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the official repos save their args
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever fails to unpickle safely is bad input
        reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))
        reason = reason[1] if reason else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise UserError(f"{path}: torch.load(weights_only=True) cannot read it ({reason}); if it is a trusted "
                        "checkpoint, re-save only the weights: torch.save({'model': ckpt['model']}, FILE)") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors, or a dict with one under 'model'")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    return state, args


@dataclass(frozen=True)
class OfficialArch:
    """How to read one official repo's checkpoints into our config and names."""

    from_args: Callable[[dict[str, Any], str], dict[str, Any]]  # model fields (dotted) from the saved `args`
    from_weights: Callable[[dict[str, Tensor], str, dict[str, Any]], dict[str, Any]]  # (state, where, known so far)
    to_ours: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    class_head: str  # whose rows are the labels


DAB_DETR = OfficialArch(_fields_from_args, lambda state, where, _: infer_model_fields(state, where),
                        official_to_ours, "class_embed.weight")
DEFORMABLE_DETR = OfficialArch(
    _deformable_fields_from_args,
    lambda state, where, known: infer_deformable_fields(state, where, known.get("num_heads", ModelConfig.num_heads)),
    deformable_official_to_ours, "class_embed.0.weight")


def official_archs() -> list[str]:
    """The architectures whose official checkpoints `kddetr import official --arch` reads (registry entries)."""
    return [arch for arch, entry in REGISTRY.items() if entry.official]


def read_official(path: str | Path, arch: str = "dab_detr", config: Optional[str | Path] = None,
                  num_classes: Optional[int] = None) -> tuple[Config, dict[str, Tensor], DatasetInfo]:
    """An official DAB-DETR (`arch="dab_detr"`) or Deformable-DETR (`"deformable_detr"`) checkpoint -> our
    config, our state dict, and categories 0..C-1.

    Sizes come from the tensors' names and shapes, the other options from the checkpoint's saved
    `args` and the `config` YAML (which also gives the train/data/kd sections); an explicit YAML value
    that contradicts the checkpoint raises `UserError`. Label i is category id i, the official repos'
    convention (num_classes = largest category id + 1).
    """
    path = Path(path)
    where = str(path)
    if arch not in official_archs():
        raise UserError(f"--arch {arch}: not supported (supported: {', '.join(official_archs())})")
    reader: OfficialArch = load(spec(arch).official)
    state, args = load_official_state(path)
    data = load_yaml(config) if config is not None else {}
    model = data.setdefault("model", {})
    if not isinstance(model, dict):
        raise UserError(f"{config}: 'model' must be a mapping")
    explicit = flatten(model)
    known = reader.from_args(args, where)
    known.update(reader.from_weights(state, where, {**known, **explicit}))
    for key, value in known.items():
        if key in explicit and explicit[key] != value:
            raise UserError(f"{config}: model.{key}={explicit[key]!r}, but {where} has {value!r}")
        _set(model, key, value)
    if "activation" not in known and explicit.get("activation", "relu") == "prelu":
        raise UserError(f"{config or where}: model.activation=prelu, but {where} has no PReLU weights "
                        "(set model.activation to relu or gelu)")
    model.setdefault("activation", "relu")
    _set(model, "backbone.weights", None)  # the checkpoint holds the backbone
    _set(model, "backbone.frozen_bn", True)  # as the official FrozenBatchNorm2d
    cfg = from_dict(Config, data, str(config) if config is not None else where)
    if reader.class_head not in state:
        raise UserError(f"{where}: no {reader.class_head!r}; is this an official {arch} checkpoint?")
    classes = state[reader.class_head].shape[0]
    if num_classes is not None and num_classes != classes:
        raise UserError(f"--num-classes {num_classes}: {where} has a {classes}-class head")
    ours = reader.to_ours(state)
    return cfg, ours, DatasetInfo(list(range(classes)), [f"class_{i}" for i in range(classes)])

"""HF transformers detector directories to and from ours: what every converter shares (ResNet backbones, weight
renaming, categories, files); each detector's own part is its `interop/hf_<arch>.py`."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kddetr.config import BackboneConfig, DataConfig, ModelConfig
from kddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from kddetr.engine.checkpoint import DatasetInfo
from kddetr.errors import UserError
from kddetr.models.backbone import RESNETS
from kddetr.registry import REGISTRY, load, spec


@dataclass(frozen=True)
class Naming:
    """How an HF detector's parameter names map to ours (parameter names keep their last component)."""

    top: dict[str, str]  # HF module (or parameter) outside the layers -> ours
    encoder: dict[str, str]  # HF module inside an encoder layer -> ours
    decoder: dict[str, str]
    layer_infix: str  # ours: layer i of the encoder is f"encoder{layer_infix}{i}"
    fused: str  # the part whose self-attention is one nn.MultiheadAttention in ours (q/k/v_proj in HF)
    tied: tuple[str, ...] = ()  # HF copies of other parameters: skipped on import


FFN = {"fc1": "ffn.linear1", "fc2": "ffn.linear2", "activation_fn": "ffn.activation"}
# The ResNet: HF ResNet names or timm's (= torchvision's); `conv_encoder.` on disk, not in memory (transformers 5).
HF_BACKBONE = "model.backbone.conv_encoder.model."
HF_BACKBONE_KEY = re.compile(r"model\.backbone\.(?:conv_encoder\.)?model\.(?:_backbone\.)?(.+)")

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


def _rename(key: str, naming: Naming) -> str:
    module, leaf = key.rsplit(".", 1)
    if m := re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", module):
        table = naming.encoder if m[1] == "encoder" else naming.decoder
        return f"{m[1]}{naming.layer_infix}{m[2]}.{table[m[3]]}.{leaf}"
    if m := HF_BACKBONE_KEY.fullmatch(key):
        if re.match(r"(conv1|bn1|layer\d)\.", m[1]):  # timm: torchvision's names
            return f"backbone.body.{m[1]}"
        if resnet := re.fullmatch(r"(.+)\.(convolution|normalization)\.(\w+)", m[1]):
            return f"backbone.body.{_hf_resnet_to_tv(resnet[1], resnet[2])}.{resnet[3]}"
    for prefix, ours in naming.top.items():
        if key == prefix or key.startswith(prefix + "."):
            return ours + key[len(prefix):]
    raise KeyError(key)


def hf_to_ours(hf_state: dict[str, Tensor], num_stages: int, naming: Naming) -> dict[str, Tensor]:
    """Rename an HF state dict to ours; q/k/v projections of the `naming.fused` self-attention become one in_proj.

    HF builds (and runs) every ResNet stage whatever its `out_features`; ours stops at `num_stages`.
    Backbones may be HF ResNets or timm ResNets (torchvision names under `conv_encoder.model.`).
    """
    ours: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    fused = re.compile(rf"model\.{naming.fused}\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
    for key, value in hf_state.items():
        if key.startswith(naming.tied) or key.endswith("num_batches_tracked"):
            continue
        if m := fused.fullmatch(key):
            qkv.setdefault(f"{naming.fused}{naming.layer_infix}{m[1]}.self_attn.in_proj_{m[3]}", {})[m[2]] = value
            continue
        try:
            name = _rename(key, naming)
        except KeyError:
            raise UserError(f"HF weights: no kddetr parameter for {key!r}") from None
        stage = re.match(r"backbone\.body\.layer(\d)\.", name)
        if stage is None or int(stage[1]) <= num_stages:
            ours[name] = value
    for key, parts in qkv.items():
        ours[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return ours


def rename_to_hf(state: dict[str, Tensor], naming: Naming) -> dict[str, Tensor]:
    """Our state dict -> HF names (inverse of `hf_to_ours`), copies of tied parameters left out."""
    top = {ours: hf for hf, ours in naming.top.items()}
    tables = {part: {o: h for h, o in getattr(naming, part).items()} for part in ("encoder", "decoder")}
    infix = re.escape(naming.layer_infix)
    hf: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if key.endswith("num_batches_tracked"):
            continue
        if m := re.fullmatch(rf"{naming.fused}{infix}(\d+)\.self_attn\.in_proj_(weight|bias)", key):
            for name, part in zip("qkv", value.chunk(3)):
                hf[f"model.{naming.fused}.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
        elif m := re.fullmatch(rf"(encoder|decoder){infix}(\d+)\.(.+)", module):
            hf[f"model.{m[1]}.layers.{m[2]}.{tables[m[1]][m[3]]}.{leaf}"] = value
        elif key.startswith("backbone.body."):
            hf[HF_BACKBONE + _tv_resnet_to_hf(key[len("backbone.body."):])] = value
        else:
            prefix = next((p for p in top if key == p or key.startswith(p + ".")), None)
            if prefix is None:
                raise UserError(f"{key}: this parameter has no place in HF's model")
            hf[top[prefix] + key[len(prefix):]] = value
    return hf


def ours_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> HF names, with what HF holds besides: every tied copy (the converter's), and the ResNet
    stages we do not use (torchvision's initial weights; HF always builds four, they never reach the outputs).
    """
    converter = converter_for(cfg.arch)
    hf = converter.state_to_hf(state, cfg)
    if converter.writes_unused_stages:
        return {k: v.detach().clone().contiguous() for k, v in hf.items()}
    unused = RESNETS[cfg.backbone.name]().state_dict()
    for key, value in unused.items():
        stage = re.match(r"layer(\d)\.", key)
        if stage and int(stage[1]) > cfg.backbone.num_stages and not key.endswith("num_batches_tracked"):
            hf[HF_BACKBONE + _tv_resnet_to_hf(key)] = value
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


def backbone_from_hf(hf: dict, where: str, timm_out: list[int]) -> tuple[BackboneConfig, list[int]]:
    """Our backbone config and the stages HF takes features from, from `backbone_config` (HF ResNet or timm
    ResNet) or the older top-level keys (`timm_out`: that model's default stages of a timm backbone).
    """
    sub = hf.get("backbone_config")
    dilation = bool(hf["dilation"])
    if sub is None and hf["use_timm_backbone"]:
        sub = {"model_type": "timm_backbone", "backbone": hf.get("backbone") or "resnet50", "out_indices": timm_out}
    sub = sub if sub is not None else {"model_type": "resnet"}
    kind = sub.get("model_type")
    if kind == "timm_backbone":
        name = sub.get("backbone")
        if name not in RESNETS:
            raise UserError(f"{where}: backbone_config.backbone={name!r} is not supported "
                            f"(timm ResNets: {', '.join(RESNETS)})")
        stages = list(sub.get("out_indices") or [4])
        dilation = dilation or sub.get("output_stride") == 16
        return BackboneConfig(name=name, num_stages=max(stages), dilation=dilation, frozen_bn=True,
                              freeze_stem=True), stages
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
    return BackboneConfig(name=name, num_stages=max(stages), frozen_bn=True, freeze_stem=True), list(stages)


def check_same(hf: dict, pairs: tuple[tuple[str, str], ...], where: str) -> None:
    for first, second in pairs:
        if hf[first] != hf[second]:
            raise UserError(f"{where}: {second}={hf[second]} differs from {first}={hf[first]}; "
                            "kddetr uses one value for both")


def check_activation(hf: dict, supported: tuple[str, ...], where: str) -> None:
    if hf["activation_function"] not in supported:
        raise UserError(f"{where}: activation_function={hf['activation_function']!r} is not supported "
                        f"({', '.join(supported)})")


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


@dataclass(frozen=True)
class HFConverter:
    """One HF detector class and ours: config.json and weight names both ways (`interop/hf_<arch>.py`, named
    in the detector's registry entry)."""

    model_type: str  # config.json's
    architecture: str  # the transformers class
    processor: str  # an image processor whose post-processing scores sigmoid (focal) class heads: top-k
    class_head: str  # our class head's weight, whose rows are the labels
    config_from_hf: Callable[[dict, str], ModelConfig]  # (config.json, where) -> ours; UserError if impossible
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]  # the model's config.json fields (labels added here)
    state_to_ours: Callable[[dict[str, Tensor], ModelConfig], dict[str, Tensor]]
    state_to_hf: Callable[[dict[str, Tensor], ModelConfig], dict[str, Tensor]]  # tied copies included
    # state_to_hf also writes the backbone stages we do not use (else `ours_to_hf` adds torchvision's initial
    # weights under the DETR-family backbone prefix)
    writes_unused_stages: bool = False
    aliases: tuple[str, ...] = ()  # other config.json model_types it reads (e.g. a version 2 of the same class)


def converters() -> dict[str, HFConverter]:
    """config.json model_type -> converter, for every registered detector that has an HF counterpart."""
    found = [load(entry.hf) for entry in REGISTRY.values() if entry.hf]
    return {model_type: c for c in found for model_type in (c.model_type, *c.aliases)}


def converter_for(arch: str) -> HFConverter:
    if not spec(arch).hf:
        raise UserError(f"model.arch: {arch} has no HF transformers counterpart to export to")
    return load(spec(arch).hf)


def read_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, Tensor], DatasetInfo]:
    """A local HF detector directory (any registered model_type) -> our model config, state dict, categories."""
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{cfg_file}: not found (a local HF model directory with config.json expected)")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file}: invalid JSON: {e}") from None
    known = converters()
    converter = known.get(hf.get("model_type"))
    if converter is None:
        raise UserError(f"{cfg_file}: model_type={hf.get('model_type')!r} is not supported "
                        f"({', '.join(map(repr, known))})")
    cfg = converter.config_from_hf(hf, str(cfg_file))
    state = converter.state_to_ours(_read_weights(hf_dir), cfg)
    if converter.class_head not in state:
        raise UserError(f"{hf_dir}: no {converter.class_head} (not a {converter.architecture} checkpoint)")
    return cfg, state, categories_from_hf(hf, state[converter.class_head].shape[0], str(cfg_file))


def hf_config(cfg: ModelConfig, dataset: DatasetInfo) -> dict[str, Any]:
    """The config.json of the HF counterpart of our model; what HF cannot express raises `UserError`."""
    return {**converter_for(cfg.arch).config_to_hf(cfg), **label_fields(dataset)}


def refuse(unsupported: dict[str, tuple[Any, bool]], hf_config_class: str) -> None:
    """One error for the first of our `unsupported` settings (key -> (value, whether HF lacks it))."""
    for key, (value, bad) in unsupported.items():
        if bad:
            raise UserError(f"model.{key}: {value!r} has no equivalent in HF's {hf_config_class}")


def resnet_config(backbone: BackboneConfig, stages: list[int]) -> dict[str, Any]:
    layer_type, depths = RESNET_SHAPES[backbone.name]
    widths = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    return {"model_type": "resnet", **RESNET_DEFAULTS, "layer_type": layer_type, "depths": depths,
            "hidden_sizes": widths, "out_features": [f"stage{s}" for s in stages]}


def label_fields(dataset: DatasetInfo) -> dict[str, Any]:
    return {"id2label": {str(i): name for i, name in enumerate(dataset.category_names)},
            "label2id": {name: i for i, name in enumerate(dataset.category_names)},
            CATEGORY_IDS_KEY: list(dataset.category_ids)}


def common_fields(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    return {"architectures": [architecture], "use_timm_backbone": False, "use_pretrained_backbone": False,
            "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
            "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads,
            "encoder_ffn_dim": cfg.dim_feedforward, "decoder_ffn_dim": cfg.dim_feedforward,
            "activation_function": cfg.activation, "dropout": cfg.dropout, "num_queries": cfg.num_queries}


def processor_config(cfg: ModelConfig, data: DataConfig) -> dict[str, Any]:
    """`preprocessor_config.json`: the resize, normalisation and padding of `kddetr eval`, and a processor whose
    `post_process_object_detection` scores sigmoid heads (DETR's own processor would apply a softmax)."""
    return {"image_processor_type": converter_for(cfg.arch).processor, "format": "coco_detection",
            "do_resize": True, "size": {"shortest_edge": data.eval_size, "longest_edge": data.max_size},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_convert_annotations": True,
            "do_pad": True}


def write_hf(out: str | Path, cfg: ModelConfig, state: dict[str, Tensor], dataset: DatasetInfo,
             data: Optional[DataConfig] = None) -> Path:
    """Write `config.json` + `model.safetensors` that HF's `...ForObjectDetection.from_pretrained(out)` loads, and
    `preprocessor_config.json` (when `data` is given) that `AutoImageProcessor` and `pipeline(...)` use."""
    config = hf_config(cfg, dataset)
    weights = ours_to_hf(state, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if data is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(processor_config(cfg, data), indent=2) + "\n")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out

"""Typed configuration: dataclasses, strict YAML loading, `--set key=value` overrides."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from kddetr.errors import UserError
from kddetr.registry import REGISTRY, load, spec


def positive(default: Any) -> Any:
    """A field that must be > 0 (checked on load)."""
    return field(default=default, metadata={"positive": True})


def options_class(arch: str) -> type:
    """The dataclass of `arch`'s own config section."""
    return load(spec(arch).options)


@dataclass
class BackboneConfig:
    name: Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    weights: Optional[str] = None  # local .pth/.safetensors file (ImageNet or `kddetr pretrain-backbone`)
    frozen_bn: Optional[bool] = None  # None: frozen when weights are loaded, trainable over random init
    freeze_stem: Optional[bool] = None  # stem + stage 1 frozen; None: frozen when weights are loaded (as DETR)
    num_stages: int = 4  # use stages 1..N (4 -> stride 32, 3 -> stride 16); 1..4
    dilation: bool = False
    train: bool = True  # False freezes every backbone parameter


@dataclass
class LossConfig:
    cls_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    match_cls_cost: float = 2.0
    match_bbox_cost: float = 5.0
    match_giou_cost: float = 2.0
    aux_loss: bool = True


@dataclass
class DenoisingConfig:
    enabled: bool = False
    num_groups: int = 5
    label_noise: float = 0.2
    box_noise: float = 0.4
    loss_weight: float = 1.0
    # DINO's contrastive denoising, as its reference: each group adds a negative per target; box corners noised
    # (negatives between 1x and 2x box_noise), half of `label_noise` flipped, padding queries scored as "no object"
    contrastive: bool = False
    # DINO's dn_number: > 0 sets the groups of each batch to max(1, query_budget // most targets of an image)
    # instead of num_groups (the reference's 100 over 2 copies per target: ~2 x 100 denoising queries)
    query_budget: int = 0


@dataclass
class ModelConfig:
    """What every detector reads, plus `options`: the architecture's own section, written `model.<arch>:` in
    YAML and typed by the detector registry (e.g. `model.deformable_detr: {two_stage: true}`)."""

    arch: str = "dab_detr"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    hidden_dim: int = positive(256)
    num_heads: int = positive(8)
    encoder_layers: int = 6
    decoder_layers: int = positive(6)
    dim_feedforward: int = positive(2048)
    dropout: float = 0.0
    activation: Literal["relu", "prelu", "gelu"] = "prelu"
    num_queries: int = positive(300)
    num_classes: int = 0  # 0: taken from the dataset's categories
    # multi-scale detectors (Deformable DETR, DINO, Faster R-CNN's FPN): the backbone stages they read (the last
    # min(n, 3) stages, then stride-2 levels for the deformable ones)
    num_feature_levels: int = 4
    # extra query groups: separate (one decoder pass each) | batch (groups stacked along the batch axis, memory
    # repeated; `kddetr bench speed` compares them)
    group_isolation: Literal["separate", "batch"] = "batch"
    channels_last: bool = True  # backbone convolutions on channels-last images: ~20% faster on CPU, same results
    # (query, class) pairs scored per image at evaluation and prediction; 0: the architecture's default
    # (300 for DAB-DETR and DINO, 100 for Deformable DETR and Faster R-CNN, as their reference code)
    num_select: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    options: Any = None  # the architecture's section (its registry entry's `options` class); None: its defaults

    def __post_init__(self) -> None:
        if self.options is None:
            self.options = options_class(self.arch)()

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes`, common fields and the architecture's options alike (by field name)."""
        names = {f.name for f in dataclasses.fields(self)}
        common = {k: v for k, v in changes.items() if k in names}
        own = {k: v for k, v in changes.items() if k not in names}
        if "arch" in common and common["arch"] != self.arch and "options" not in common:
            common["options"] = None  # another architecture: its own defaults
        cfg = dataclasses.replace(self, **common)
        return dataclasses.replace(cfg, options=dataclasses.replace(cfg.options, **own)) if own else cfg


@dataclass
class DataConfig:
    train_split: str = "train"
    val_split: str = "val"
    train_sizes: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640])
    eval_size: int = 640  # shorter side at evaluation
    max_size: int = 1024
    hflip: bool = True
    random_crop: bool = True
    num_workers: int = 0


@dataclass
class TrainConfig:
    epochs: int = positive(50)
    batch_size: int = positive(8)
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop_epochs: list[int] = field(default_factory=lambda: [40])
    lr_drop_factor: float = 0.1
    warmup_steps: int = 0
    clip_max_norm: float = 0.1
    amp: bool = False
    seed: int = 42
    deterministic: bool = True
    eval_every: int = 1  # epochs between evaluations (0: only at the end)
    max_steps: int = 0  # >0 stops after this many steps (for smoke tests and time-boxed runs)
    max_minutes: float = 0.0  # >0 stops after this many minutes of training
    log_every: int = 10
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # steps between checks for a non-finite loss when stopping (0: every step on the CPU, every log_every on GPUs;
    # skipping a batch checks every step); fewer checks mean fewer host-device syncs
    nonfinite_check_every: int = 0
    compile: bool = False  # torch.compile the training forward (see `kddetr bench speed --compile`)
    # distillation only: `joint` takes one clipped AdamW step on the sum of all losses (the paper); `separate` clips
    # and Adam-normalises the detection and the KD gradients each on its own and applies both (engine/update.py)
    kd_update: Literal["joint", "separate"] = "joint"


@dataclass
class KDConfig:
    method: Literal["kd_detr", "hungarian", "none"] = "kd_detr"  # hungarian: inconsistent points; none: no KD
    general_points: int = 300
    general_distribution: Literal["uniform", "logit_normal", "near_teacher"] = "logit_normal"
    general_box_noise: float = 1.0  # near_teacher: each corner of a teacher anchor moved by up to this x (w/2, h/2)
    specific_points: bool = True
    specific_source: Literal["anchors", "final_boxes"] = "anchors"  # the teacher's anchors, or its boxes from them
    student_proposals: bool = False  # also distil at the student's own queries of the step (Faster R-CNN: its proposals)
    cls_loss: Literal["kl", "bce"] = "kl"  # kl (softmax KL, released code) | bce (per-class sigmoid)
    temperature: float = 10.0
    cls_normalize: bool = False  # False: sum over points (released code); True: FRW-weighted mean
    foreground_reweight: bool = True
    layer_mode: Literal["last", "layerwise"] = "last"  # last: every student layer vs the teacher's last
    cls_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    general_weight: float = 1.0  # the general group's KD losses x this (the specific group's x 1)
    seed: int = 1234
    # class KD with an explicit background: a zero logit is appended to both models' per-class logits before the
    # softmax KL (for students whose logits are log-odds against background, e.g. Faster R-CNN; see faster_rcnn.py)
    cls_background: bool = False
    # also weight each point by the IoU of its anchor with the teacher's final box there: trust the teacher only
    # where its answer is about the given box (students that predict inside the box only, e.g. an RoI head)
    locality_reweight: bool = False
    # `bce` only: the teacher's probabilities times the IoU of the student's box with the teacher's at each point,
    # the way varifocal loss scores a match by its IoU (for students whose scores rank their own boxes, e.g. RT-DETR)
    cls_iou_target: bool = False
    # training steps over which every KD loss weight falls from 1 to 0 (a half cosine), after which the teacher is
    # no longer run and the student trains alone; 0: constant weights (the paper)
    fade_steps: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML scalars where unambiguous."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{where}: '{value}' is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    raise UserError(f"{where}: unsupported type {_type_name(tp)}")


def _unknown_key(cls: type, key: str, where: str) -> UserError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"{where}: unknown key '{key}'.{hint} Valid keys: {', '.join(valid)}")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise `UserError`."""
    if cls is ModelConfig:
        return _model_from_dict(data, where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, key, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    obj = cls(**kwargs)
    validate(obj, where)
    return obj


def _model_from_dict(data: dict, where: str) -> ModelConfig:
    """The common fields, then the section named after the architecture (`model.<arch>`) with its options.

    Configs written before the sections existed (checkpoints' config.yaml included) kept every option at the
    top of `model`: the architecture's own are moved into its section; another architecture's are dropped
    when they hold that architecture's default (they never did anything), else refused."""
    data = dict(data)
    arch = data.get("arch", ModelConfig.arch)
    if arch not in REGISTRY:
        raise UserError(f"{where}.arch: '{arch}' is not one of {', '.join(REGISTRY)}")
    own = options_class(arch)
    section = data.pop(arch, None) or {}
    if not isinstance(section, dict):
        raise UserError(f"{where}.{arch}: expected a mapping of {sorted(f.name for f in dataclasses.fields(own))}, "
                        f"got {section!r}")
    for other in REGISTRY:
        if other != arch and other in data:
            raise UserError(f"{where}.{other}: options of {other}, but {where}.arch is {arch}")
    common = {f.name for f in dataclasses.fields(ModelConfig)} - {"options"}
    for key in [k for k in data if k not in common]:
        if key in _flat_names(own):
            target = _flat_names(own)[key]
            value = data.pop(key)
            if target is not None:
                section.setdefault(target, value)
        elif (owner := _other_owner(key, arch)) is not None:
            value = data.pop(key)
            default = getattr(options_class(owner)(), _flat_names(options_class(owner))[key] or key, value)
            if value != default:
                raise UserError(f"{where}.{key}: an option of {owner} ({where}.{owner}.{key}), not of {arch}")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig) if f.name != "options"}
    hints = typing.get_type_hints(ModelConfig)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(ModelConfig, key, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    model = ModelConfig(**kwargs, options=from_dict(own, section, f"{where}.{arch}"))
    validate(model, where)
    return model


def _flat_names(options: type) -> dict[str, Optional[str]]:
    """Top-level `model` keys of configs from before the sections -> the option they became (None: dropped)."""
    return {f.name: f.name for f in dataclasses.fields(options)} | getattr(options, "LEGACY_KEYS", {})


def _other_owner(key: str, arch: str) -> Optional[str]:
    return next((other for other in REGISTRY if other != arch and key in _flat_names(options_class(other))), None)


def validate(obj: Any, where: str = "config") -> None:
    """Value checks that types alone cannot express."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("positive") and value <= 0:
            raise UserError(f"{where}.{f.name}: must be > 0, got {value}")
    if isinstance(obj, ModelConfig) and obj.hidden_dim % obj.num_heads:
        raise UserError(f"{where}.hidden_dim: {obj.hidden_dim} is not divisible by num_heads={obj.num_heads}")
    if isinstance(obj, ModelConfig) and obj.num_select < 0:
        raise UserError(f"{where}.num_select: must be >= 0 (0: the architecture's default), got {obj.num_select}")
    if isinstance(obj, KDConfig) and obj.cls_iou_target and obj.cls_loss != "bce":
        raise UserError(f"{where}.cls_iou_target: needs cls_loss: bce, got cls_loss: {obj.cls_loss}")
    if isinstance(obj, KDConfig) and obj.fade_steps < 0:
        raise UserError(f"{where}.fade_steps: must be >= 0 (0: no fade), got {obj.fade_steps}")
    if isinstance(obj, BackboneConfig) and not 1 <= obj.num_stages <= 4:
        raise UserError(f"{where}.num_stages: must be 1..4, got {obj.num_stages}")


def migrate_saved_config(data: dict) -> dict:
    """A config saved by an earlier kddetr (a checkpoint's) as this one reads it: options removed since then,
    which never changed results, are dropped (`kd.teacher_inference_mode`) or mapped (`model.group_isolation:
    mask` -> `batch`); flat model options move into their section when the model config is read."""
    kd, model = data.get("kd"), data.get("model")
    if isinstance(kd, dict):
        kd.pop("teacher_inference_mode", None)
    if isinstance(model, dict) and model.get("group_isolation") == "mask":
        model["group_isolation"] = "batch"
    return data


def to_dict(cfg: Any) -> dict:
    """Plain data, as YAML holds it: a model's options under its architecture's name."""
    data = dataclasses.asdict(cfg)
    for model in [data] if isinstance(cfg, ModelConfig) else [data.get("model")] if isinstance(cfg, Config) else []:
        model[model["arch"]] = model.pop("options")
    return data


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: where and what."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. train.lr=2e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys (`train.lr`), the form `apply_overrides` takes."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def load_config(path: str | Path | None = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or defaults when `path` is None), apply overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    where = str(path) if path is not None else "config"
    return from_dict(Config, data, where)


def save_config(cfg: Config, path: str | Path, extra: Optional[dict] = None) -> None:
    data = to_dict(cfg)
    if extra:
        data.update(extra)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

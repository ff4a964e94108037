"""Checkpoint directories: `model.safetensors` + `config.yaml` (+ `trainer_state.pt`), written atomically."""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kddetr import __version__
from kddetr.config import Config, apply_overrides, from_dict, load_yaml, migrate_saved_config, to_dict
from kddetr.errors import UserError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.pt"


@dataclass
class DatasetInfo:
    """What a checkpoint must know about the data it was trained on."""

    category_ids: list[int] = field(default_factory=list)
    category_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def check_matches(self, source: str, category_ids: list[int]) -> None:
        """One clear error when a dataset's categories are not the ones `source` was trained on."""
        if self.category_ids != category_ids:
            only_ckpt = sorted(set(self.category_ids) - set(category_ids))
            only_data = sorted(set(category_ids) - set(self.category_ids))
            raise UserError(f"{source}: category ids differ from the dataset's "
                            f"(only in checkpoint: {only_ckpt or 'none'}; only in data: {only_data or 'none'})")


@dataclass
class Checkpoint:
    model: nn.Module
    config: Config
    dataset: DatasetInfo
    path: Path


def _old(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def recover_checkpoint(path: str | Path) -> Path:
    """Undo a save killed between its two renames (`path` gone, `path.old` whole): move `path.old` back.

    Only the process that writes `path` may call this (a save in flight looks the same from outside).
    """
    path = Path(path)
    if not path.exists() and _old(path).is_dir():
        os.replace(_old(path), path)
    return path


def _fsync(path: Path) -> None:
    if os.name != "posix" and path.is_dir():  # only POSIX opens directories
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished temp dir into place: at any moment `final` or `final.old` is a whole checkpoint."""
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    recover_checkpoint(final)
    old = _old(final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)  # a kill between the two renames leaves `old` for `recover_checkpoint`
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(path: str | Path, model: nn.Module, cfg: Config, dataset: DatasetInfo,
                    trainer_state: Optional[dict[str, Any]] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per checkpoint: a leftover is from a killed save
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        meta = to_dict(cfg)
        meta["dataset"] = {"category_ids": dataset.category_ids, "category_names": dataset.category_names}
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "kddetr": __version__})
        os.chmod(tmp / MODEL_FILE, (tmp / CONFIG_FILE).stat().st_mode)  # safetensors writes 0600; follow the umask
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        _replace_dir(tmp, path)
    except OSError as e:  # e.g. no space left on device: the previous checkpoint at `path` is still whole
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous checkpoint there is kept" if recover_checkpoint(path).exists() else "nothing was saved"
        raise UserError(f"{path}: cannot write the checkpoint ({e.strerror or e}); {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, DatasetInfo]:
    """The checkpoint's config (with `a.b=value` `overrides` applied) and the dataset it was trained on."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir() or not cfg_file.is_file():
        inside = [path / d for d in ("best", "last") if (path / d / CONFIG_FILE).is_file()]
        hint = f"; did you mean {inside[0]}?" if inside else ""
        raise UserError(f"{path}: not a checkpoint directory (expected {MODEL_FILE} and {CONFIG_FILE}){hint}")
    data = load_yaml(cfg_file)
    info = data.pop("dataset", None)
    if not isinstance(info, dict) or not info.get("category_ids"):
        raise UserError(f"{cfg_file}: missing 'dataset.category_ids' (which categories the model predicts)")
    dataset = from_dict(DatasetInfo, info, f"{cfg_file}:dataset")
    if len(dataset.category_names) != len(dataset.category_ids):
        raise UserError(f"{cfg_file}: dataset.category_names and category_ids differ in length")
    return from_dict(Config, apply_overrides(migrate_saved_config(data), list(overrides)), str(cfg_file)), dataset


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: missing model weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: cannot read safetensors weights ({e}); the file may be truncated") from None


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one clear message listing every missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f" … (+{len(items) - 8})" if len(items) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise UserError(f"{source}: weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", overrides: Sequence[str] = ()) -> Checkpoint:
    """Build the model that `path/config.yaml` (with `overrides`) describes and load `path/model.safetensors`."""
    from kddetr.models.build import build_detector

    path = Path(path)
    cfg, dataset = read_checkpoint_config(path, overrides)
    backbone = cfg.model.backbone
    if backbone.weights is not None:  # the checkpoint holds the trained backbone: don't need the init file
        loaded = dataclasses.replace(backbone, weights=None,
                                     frozen_bn=True if backbone.frozen_bn is None else backbone.frozen_bn,
                                     freeze_stem=True if backbone.freeze_stem is None else backbone.freeze_stem)
        cfg.model = dataclasses.replace(cfg.model, backbone=loaded)
    model = build_detector(cfg.model, dataset.num_classes)
    load_weights_into(model, load_state_dict_file(path / MODEL_FILE), str(path / MODEL_FILE))
    return Checkpoint(model=model.to(device).eval(), config=cfg, dataset=dataset, path=path)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no detail")


def _load_problem(e: Exception) -> str:
    """A torch.load failure in one line (a `weights_only` refusal runs over many, its reason after a marker)."""
    text = str(e)
    if "Weights only load failed" in text:
        text = text.rpartition("WeightsUnpickler error:")[2].split(". ")[0] or "not a file of tensors"
    return f"{type(e).__name__}: {_first_line(text)}"


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """`path/trainer_state.pt`, unpickled with `weights_only=True`: a file that would run code is refused."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise UserError(f"{file}: no trainer state to resume from")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure is a bad file for the user
        if "Unsupported global" in str(e):  # it names a class or function: loading it in full could run code
            raise UserError(f"{file}: refused: it holds more than tensors and plain data, and unpickling it could "
                            f"run code ({_load_problem(e)})") from None
        raise UserError(f"{file}: cannot load trainer state, the file is damaged or truncated "
                        f"({_load_problem(e)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{file}: expected a dict of trainer state, got {type(state).__name__}")
    return state

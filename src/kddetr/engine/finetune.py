"""`--init CKPT`: start a model from a checkpoint's weights, its class rows mapped onto the dataset's classes by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from kddetr.engine.checkpoint import MODEL_FILE, load_state_dict_file, read_checkpoint_config
from kddetr.errors import UserError
from kddetr.models.protocol import ClassSlots


@dataclass(frozen=True)
class InitRequest:
    """`--init CKPT [--class-map NEW=OLD ...] [--init-partial]`."""

    checkpoint: Path
    renames: dict[str, str] = field(default_factory=dict)
    partial: bool = False


@dataclass
class InitSummary:
    """What `init_from_checkpoint` did, tensor by tensor and class by class."""

    source: Path
    loaded: list[str] = field(default_factory=list)  # copied as they are
    class_mapped: list[str] = field(default_factory=list)  # per-class rows copied by category name
    reinitialised: list[str] = field(default_factory=list)  # kept as the model built them
    left_out: list[str] = field(default_factory=list)  # in the checkpoint only
    classes: dict[str, Optional[str]] = field(default_factory=dict)  # dataset class -> checkpoint class or None

    def describe(self) -> str:
        mapped = [f"{new}<-{old}" if new != old else new for new, old in self.classes.items() if old is not None]
        fresh = [new for new, old in self.classes.items() if old is None]
        text = (f"--init {self.source}: {len(self.loaded)} tensors loaded, {len(self.class_mapped)} class tensors "
                f"mapped, {len(self.reinitialised)} re-initialised, {len(self.left_out)} left out; classes: "
                f"{len(mapped)} of {len(self.classes)} from the checkpoint")
        text += f" ({_shorten(mapped)})" if mapped else ""
        return text + (f", new: {_shorten(fresh)}" if fresh else "")


def _shorten(names: Sequence[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" … (+{len(names) - limit})" if len(names) > limit else "")


def parse_class_map(items: Sequence[str]) -> dict[str, str]:
    """`--class-map NEW=OLD` items -> {dataset class: checkpoint class}."""
    renames = {}
    for item in items:
        new, sep, old = item.partition("=")
        if not sep or not new.strip() or not old.strip():
            raise UserError(f"--class-map {item!r}: expected DATASET_CLASS=CHECKPOINT_CLASS, e.g. tree=potted plant")
        renames[new.strip()] = old.strip()
    return renames


def class_mapping(names: Sequence[str], old_names: Sequence[str], renames: dict[str, str],
                  source: str) -> dict[str, Optional[str]]:
    """Each dataset class -> the checkpoint class that starts it: renamed explicitly, else the same name, else None."""
    for new, old in renames.items():
        if new not in names:
            raise UserError(f"--class-map {new}={old}: '{new}' is not a class of the dataset ({_shorten(names)})")
        if old not in old_names:
            raise UserError(f"--class-map {new}={old}: '{old}' is not a class of {source} ({_shorten(old_names)})")
    return {n: renames.get(n, n if n in old_names else None) for n in names}


def _map_rows(own: Tensor, old: Tensor, slots: ClassSlots, pairs: list[tuple[int, int]]) -> Tensor:
    """`own` with the rows of each mapped class (and any rows before the first class) taken from `old`."""
    out = own.clone()
    out[:slots.first] = old[:slots.first]
    for new, prev in pairs:
        rows = slice(slots.first + new * slots.width, slots.first + (new + 1) * slots.width)
        out[rows] = old[slots.first + prev * slots.width:slots.first + (prev + 1) * slots.width]
    return out


def init_from_checkpoint(model: nn.Module, arch: str, checkpoint: Path, category_names: Sequence[str],
                         renames: Optional[dict[str, str]] = None, partial: bool = False) -> InitSummary:
    """Load every tensor of `checkpoint` that fits `model`; per-class rows follow the category names.

    A tensor that does not fit outside the class tensors (another shape, missing from either side) is one
    `UserError` naming it, unless `partial`: then the model keeps its own initialisation there.
    """
    checkpoint = Path(checkpoint)
    cfg, info = read_checkpoint_config(checkpoint)
    if cfg.model.arch != arch:
        raise UserError(f"{checkpoint}: a {cfg.model.arch} checkpoint cannot start a {arch} model (--init needs the "
                        f"same architecture)")
    state = load_state_dict_file(checkpoint / MODEL_FILE)
    summary = InitSummary(checkpoint)
    summary.classes = class_mapping(category_names, info.category_names, renames or {}, str(checkpoint))
    old_index = {n: i for i, n in enumerate(info.category_names)}
    pairs = [(i, old_index[old]) for i, old in enumerate(summary.classes.values()) if old is not None]
    slots = model.class_slots()  # type: ignore[operator]
    own = model.state_dict()
    merged, problems = {}, []
    for name, tensor in own.items():
        old = state.get(name)
        if name in slots and old is not None and _class_shape_fits(old, tensor, slots[name], len(old_index)):
            merged[name] = _map_rows(tensor, old.to(tensor.dtype), slots[name], pairs)
            summary.class_mapped.append(name)
        elif old is not None and old.shape == tensor.shape and name not in slots:
            merged[name] = old.to(tensor.dtype)
            summary.loaded.append(name)
        else:
            merged[name] = tensor
            summary.reinitialised.append(name)
            if name not in slots or old is not None:
                problems.append(f"{name}: " + (f"checkpoint {tuple(old.shape)} vs model {tuple(tensor.shape)}"
                                               if old is not None else "not in the checkpoint"))
    summary.left_out = sorted(set(state) - set(own))
    problems += [f"{name}: not in the model" for name in summary.left_out]
    if problems and not partial:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{checkpoint}: does not fit the model at {problems[0]}{more}; pass --init-partial to load "
                        f"only the tensors that fit")
    with torch.no_grad():
        model.load_state_dict(merged)
    return summary


def _class_shape_fits(old: Tensor, own: Tensor, slots: ClassSlots, old_classes: int) -> bool:
    return old.shape[1:] == own.shape[1:] and old.shape[0] == slots.first + old_classes * slots.width

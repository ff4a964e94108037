"""The optimiser and learning-rate schedule of a run."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kddetr.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, weight_decay: Optional[float] = None) -> torch.optim.Optimizer:
    """AdamW with the rest at `lr`, the backbone at `lr_backbone`, and then one group per learning-rate multiplier
    the detector asks for (`lr_multipliers()`: parameter-name fragment -> multiplier of `lr`); weight decay
    `cfg.weight_decay` unless `weight_decay` is given."""
    multipliers = model.lr_multipliers()  # type: ignore[operator]
    groups: dict[str, dict] = {"rest": {"params": [], "lr": cfg.lr}, "backbone": {"params": [], "lr": cfg.lr_backbone}}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        fragment = next((f for f in multipliers if f in name), None)
        key = "backbone" if name.startswith("backbone.") else "rest" if fragment is None else fragment
        groups.setdefault(key, {"params": [], "lr": cfg.lr * multipliers.get(key, 1.0)})["params"].append(p)
    kept = [g for g in groups.values() if g["params"] or g is groups["rest"]]
    return torch.optim.AdamW(kept, lr=cfg.lr, weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
                             fused=fused_adamw_ok(model))


def fused_adamw_ok(model: nn.Module) -> bool:
    """The fused AdamW kernel (3.4x faster than `foreach` for a 1.5 M-parameter student on one CPU thread) takes
    floating-point parameters on CPU or CUDA."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then × `lr_drop_factor` at each epoch in `lr_drop_epochs`."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    epoch = step // max(1, steps_per_epoch)
    drops = sum(epoch >= e for e in cfg.lr_drop_epochs)
    return warm * cfg.lr_drop_factor**drops

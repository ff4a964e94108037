"""Build detectors and their criteria from the model config, through the detector registry."""
from __future__ import annotations

from torch import nn

from kddetr.config import ModelConfig
from kddetr.registry import load, spec


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return load(spec(cfg.arch).model)(cfg, num_classes)


def build_criterion(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The detector's training loss: weighted terms from its outputs and the targets."""
    return load(spec(cfg.arch).criterion)(cfg, num_classes)


def num_select(cfg: ModelConfig) -> int:
    """Detections kept per image at evaluation: `cfg.num_select`, or the architecture's default when 0."""
    return cfg.num_select or spec(cfg.arch).num_select


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, shared tensors once; `trainable_only`: those that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

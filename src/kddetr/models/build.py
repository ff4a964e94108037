"""Build detectors and their criteria from the model config."""
from __future__ import annotations

from torch import nn

from kddetr.config import ModelConfig
from kddetr.errors import UserError


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.arch == "dab_detr":
        from kddetr.models.dab_detr import DABDETR

        return DABDETR(cfg, num_classes)
    if cfg.arch == "deformable_detr":
        from kddetr.models.deformable_detr import DeformableDETR

        return DeformableDETR(cfg, num_classes)
    if cfg.arch == "dino":
        from kddetr.models.dino import DINO

        return DINO(cfg, num_classes)
    if cfg.arch == "faster_rcnn":
        from kddetr.models.faster_rcnn import FasterRCNN

        return FasterRCNN(cfg, num_classes)
    raise UserError(f"model.arch: unknown architecture {cfg.arch!r}")


# (query, class) pairs each reference implementation scores per image at evaluation (`num_select` / top-k)
DEFAULT_NUM_SELECT = {"dab_detr": 300, "dino": 300, "deformable_detr": 100, "faster_rcnn": 100}


def num_select(cfg: ModelConfig) -> int:
    """Detections kept per image at evaluation: `cfg.num_select`, or the architecture's default when 0."""
    return cfg.num_select or DEFAULT_NUM_SELECT[cfg.arch]


def build_criterion(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.arch == "faster_rcnn":  # torchvision's losses, computed in the detector's forward
        from kddetr.models.faster_rcnn import RCNNCriterion

        return RCNNCriterion()
    from kddetr.models.criterion import build_criterion as build

    return build(cfg, num_classes)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, shared tensors once; `trainable_only`: those that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

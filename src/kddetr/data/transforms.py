"""DETR-style training and evaluation transforms (torchvision v2), ending in the model's target format."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from kddetr.config import DataConfig
from kddetr.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DETR's crop branch on COCO, as fractions of its largest training size (800 px): shorter side
# to 400/500/600 px, then a random 384..600 px window, then the usual multi-scale resize.
CROP_PRE_RESIZE = (0.5, 0.625, 0.75)
CROP_RANGE = (0.48, 0.75)


def _randint(low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, ()).item())


class RandomSizeCrop(v2.Transform):
    """Crop a window anywhere in the image with width and height drawn from [min_size, max_size]."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        h = _randint(min(self.min_size, height), min(self.max_size, height))
        w = _randint(min(self.min_size, width), min(self.max_size, width))
        return {"top": _randint(0, height - h), "left": _randint(0, width - w), "height": h, "width": w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def to_model_target(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain image tensor; boxes as cxcywh normalised by the transformed size; `size` (h, w) added."""
    h, w = image.shape[-2:]
    boxes = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return image.as_subclass(Tensor), {
        **target,
        "boxes": boxes.as_subclass(Tensor).float() / scale,
        "size": torch.tensor([h, w], dtype=torch.int64),
    }


def _check(cfg: DataConfig, train: bool) -> None:
    sizes, key = (cfg.train_sizes, "data.train_sizes") if train else ([cfg.eval_size], "data.eval_size")
    if not sizes or min(sizes) <= 0:
        raise UserError(f"{key}: need positive sizes, got {sizes}")
    if cfg.max_size <= max(sizes):
        raise UserError(f"data.max_size: {cfg.max_size} must be larger than {key} ({max(sizes)})")


def _train_resize(cfg: DataConfig) -> v2.Transform:
    resize = v2.RandomShortestSize(cfg.train_sizes, max_size=cfg.max_size)
    if not cfg.random_crop:
        return resize
    top = max(cfg.train_sizes)
    crop = v2.Compose([
        v2.RandomShortestSize([round(top * f) for f in CROP_PRE_RESIZE]),
        RandomSizeCrop(round(top * CROP_RANGE[0]), round(top * CROP_RANGE[1])),
        resize,  # the crop is always resized back to a training size, so crops never make small images
    ])
    return v2.RandomChoice([resize, crop])


def build_transforms(data_cfg: DataConfig, train: bool) -> v2.Compose:
    """`(PIL image, dataset target) -> (normalised image [3,H,W], model target)` for training or evaluation."""
    _check(data_cfg, train)
    steps: list[Any] = [v2.ToImage()]
    if train:
        if data_cfg.hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps.append(_train_resize(data_cfg))
    else:
        steps.append(v2.Resize(data_cfg.eval_size, max_size=data_cfg.max_size))
    steps += [
        v2.ClampBoundingBoxes(),  # float error after a resize can put an edge box a hair outside
        v2.SanitizeBoundingBoxes(),  # drops boxes that crops or down-scaling left under 1 px
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        to_model_target,
    ]
    return v2.Compose(steps)

"""ResNet backbones (torchvision) cut after the last stage used, returning one feature map and its padding mask."""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import FrozenBatchNorm2d

from kddetr.config import BackboneConfig
from kddetr.errors import UserError

RESNETS = {
    "resnet10": partial(ResNet, BasicBlock, [1, 1, 1, 1]),
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
}
STEM = ("conv1", "bn1", "relu", "maxpool")


class Backbone(nn.Module):
    """Stages 1..`num_stages` of a torchvision ResNet (stride 2 ** (num_stages + 1); DC5 halves it).

    Norm layers are `FrozenBatchNorm2d` when `frozen_bn` (default: iff `weights` are loaded; over random
    weights a frozen BN is a fixed identity, so it stays trainable). `train=False` freezes every
    parameter and keeps BN statistics fixed; `freeze_stem` (default: iff `weights` are loaded, as in
    DETR) keeps the stem and stage 1 frozen. Parameter names are torchvision's, under `body.`.
    """

    def __init__(self, name: str = "resnet50", num_stages: int = 4, weights: Optional[str] = None,
                 frozen_bn: Optional[bool] = None, dilation: bool = False, train: bool = True,
                 freeze_stem: Optional[bool] = None) -> None:
        super().__init__()
        if name not in RESNETS:
            raise UserError(f"model.backbone.name: unknown backbone {name!r}; expected one of {', '.join(RESNETS)}")
        if not 1 <= num_stages <= 4:
            raise UserError(f"model.backbone.num_stages: must be 1..4, got {num_stages}")
        frozen = weights is not None if frozen_bn is None else frozen_bn
        dilate = [False, False, False]
        if dilation:
            if num_stages < 2:
                raise UserError("model.backbone.dilation: needs num_stages >= 2")
            dilate[num_stages - 2] = True
        try:
            resnet = RESNETS[name](norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d,
                                   replace_stride_with_dilation=dilate)
        except NotImplementedError as e:  # torchvision's BasicBlock has no dilation
            raise UserError(f"model.backbone.dilation: {name} does not support it ({e})") from None
        stages = [f"layer{i}" for i in range(1, num_stages + 1)]
        self.body = nn.Sequential(OrderedDict((key, getattr(resnet, key)) for key in STEM + tuple(stages)))
        self.stage_channels = [64 * 2 ** i * resnet.layer1[0].expansion for i in range(num_stages)]
        self.num_channels = self.stage_channels[-1]
        if weights is not None:
            load_resnet_weights(self.body, weights)
        self.trainable = train
        freeze_stem = weights is not None if freeze_stem is None else freeze_stem
        for key, param in self.body.named_parameters():
            if not train or (freeze_stem and not key.startswith(("layer2", "layer3", "layer4"))):
                param.requires_grad_(False)
        self.train()

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> "Backbone":
        return cls(cfg.name, cfg.num_stages, cfg.weights, cfg.frozen_bn, cfg.dilation, cfg.train, cfg.freeze_stem)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if not self.trainable:
            self.body.eval()
        return self

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """`images [B, 3, H, W]`, `mask [B, H, W]` (True = padding) -> features `[B, C, h, w]`, mask `[B, h, w]`."""
        features = self.body(images)
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:])[0].bool()
        return features, mask

    def forward_levels(self, images: Tensor, mask: Tensor, num_levels: int) -> list[tuple[Tensor, Tensor]]:
        """The last `num_levels` stages' features `[B, C_i, h_i, w_i]` and masks `[B, h_i, w_i]`, finest first."""
        if not 1 <= num_levels <= len(self.stage_channels):
            raise ValueError(f"num_levels must be 1..{len(self.stage_channels)}, got {num_levels}")
        stages, x = [], images
        for name, module in self.body.named_children():
            x = module(x)
            if name.startswith("layer"):
                stages.append(x)
        return [(f, F.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool()) for f in stages[-num_levels:]]


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        if "Unsupported global" in str(e):  # weights_only=True met a class or function: it could run code
            raise UserError(f"{path}: refused: not a plain state dict of tensors, and unpickling it could run code; "
                            "save `model.state_dict()` with torch.save or as .safetensors") from None
        detail = str(e).rpartition("WeightsUnpickler error:")[2].strip() or type(e).__name__  # torch's run long
        detail = next((line for line in detail.splitlines() if line.strip()), "no detail")
        raise UserError(f"{path}: cannot read backbone weights ({type(e).__name__}: {detail})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a flat state dict of tensors with torchvision ResNet key names")
    return state


def _shown(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f" … (+{len(items) - limit} more)" if len(items) > limit else "")


def load_resnet_weights(body: nn.Module, path: str | Path) -> None:
    """Load a torchvision-named ResNet state dict (`.pth` or `.safetensors`) into `body`.

    `fc.*` and the stages that `body` does not use are skipped; anything else that does not fit raises
    a `UserError` that names the file and lists the tensors.
    """
    path = Path(path)
    state = _read_state_dict(path)
    used = {name for name, _ in body.named_children()}
    skipped = {"fc", "layer1", "layer2", "layer3", "layer4"} - used
    state = {k: v for k, v in state.items() if k.split(".")[0] not in skipped}
    own = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{title}: {_shown(items)}" for title, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if items]
        raise UserError(f"{path}: backbone weights do not fit this ResNet "
                        f"(torchvision key names expected); {'; '.join(parts)}")
    body.load_state_dict(state, strict=False)

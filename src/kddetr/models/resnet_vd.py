"""ResNet-vd (ResNet-D, arXiv 1812.01187): RT-DETR's backbone, with a three-convolution stem and pooled shortcuts."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from kddetr.config import BackboneConfig
from kddetr.errors import UserError
from kddetr.models.backbone import Backbone

# our backbone name -> (block, blocks per stage): the layer counts of torchvision's ResNets (and a tiny ResNet-10)
VD_SHAPES = {"resnet10": ("basic", [1, 1, 1, 1]), "resnet18": ("basic", [2, 2, 2, 2]),
             "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3]),
             "resnet101": ("bottleneck", [3, 4, 23, 3])}
STEM_WIDTH = 64


class ConvNorm(nn.Module):
    """A bias-free convolution, its batch norm and optionally a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, relu: bool,
                 norm: type[nn.Module]) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.normalization = norm(out_channels)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalization(self.convolution(x))
        return F.relu(x) if self.relu else x


class Block(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 to 4x) residual block. The first block of a
    stage projects its shortcut (a 1x1 convolution), after a 2x2 average pooling where the stage downsamples: the
    "d" variant, which no cell of the input skips."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, stride: int, first: bool,
                 norm: type[nn.Module]) -> None:
        super().__init__()
        if kind == "basic":
            self.layer = nn.Sequential(ConvNorm(in_channels, out_channels, 3, stride, True, norm),
                                       ConvNorm(out_channels, out_channels, 3, 1, False, norm))
        else:
            width = out_channels // 4
            self.layer = nn.Sequential(ConvNorm(in_channels, width, 1, 1, True, norm),
                                       ConvNorm(width, width, 3, stride, True, norm),
                                       ConvNorm(width, out_channels, 1, 1, False, norm))
        projection = first and (kind == "basic" or in_channels != out_channels or stride != 1)
        shortcut = ConvNorm(in_channels, out_channels, 1, 1, False, norm) if projection else nn.Identity()
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2, 0, ceil_mode=True), shortcut) if stride == 2 else shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.layer(x) + self.shortcut(x))


class ResNetVd(nn.Module):
    """Stem (3x3 convolutions 3 -> 32 (stride 2) -> 32 -> 64, then a max pool) and stages 1..`num_stages` of
    ResNet-vd with the depth of `name`; stage i has stride 2 ** (i + 1). The layout follows HF transformers'
    `RTDetrResNetBackbone` (`stem.i` = `embedder.embedder.i`, `stages.i.j` = `encoder.stages.i.layers.j`), so
    that its weights map one to one. Offers `forward_levels` and `stage_channels` as `backbone.Backbone`.

    Norms are `FrozenBatchNorm2d` when `frozen_bn` (as RT-DETR's `freeze_norm`); `train=False` freezes every
    parameter (`freeze_stem` is not applied). Weights come through `kddetr import hf` (no ImageNet file of this
    layout is committed).
    """

    def __init__(self, name: str = "resnet50", num_stages: int = 4, frozen_bn: bool = False,
                 train: bool = True) -> None:
        super().__init__()
        if name not in VD_SHAPES:
            raise UserError(f"model.backbone.name: no ResNet-vd of {name!r}; expected one of {', '.join(VD_SHAPES)}")
        if not 1 <= num_stages <= 4:
            raise UserError(f"model.backbone.num_stages: must be 1..4, got {num_stages}")
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        kind, depths = VD_SHAPES[name]
        self.stem = nn.Sequential(ConvNorm(3, STEM_WIDTH // 2, 3, 2, True, norm),
                                  ConvNorm(STEM_WIDTH // 2, STEM_WIDTH // 2, 3, 1, True, norm),
                                  ConvNorm(STEM_WIDTH // 2, STEM_WIDTH, 3, 1, True, norm))
        widths = [64 * 2 ** i * (4 if kind == "bottleneck" else 1) for i in range(4)]
        self.stages = nn.ModuleList()
        in_channels = STEM_WIDTH
        for i in range(num_stages):
            self.stages.append(nn.Sequential(*(
                Block(kind, in_channels if j == 0 else widths[i], widths[i], 2 if i > 0 and j == 0 else 1, j == 0,
                      norm) for j in range(depths[i]))))
            in_channels = widths[i]
        self.stage_channels = widths[:num_stages]
        self.num_channels = self.stage_channels[-1]
        self.trainable = train
        if not train:
            self.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> "ResNetVd":
        if cfg.weights is not None:
            raise UserError("model.backbone.weights: a ResNet-vd takes its weights from `kddetr import hf` (an HF "
                            "RT-DETR), not from a torchvision ResNet file; use model.rt_detr.resnet_variant: plain")
        if cfg.dilation:
            raise UserError("model.backbone.dilation: not supported by the ResNet-vd backbone")
        return cls(cfg.name, cfg.num_stages, bool(cfg.frozen_bn), cfg.train)

    def train(self, mode: bool = True) -> "ResNetVd":
        super().train(mode and self.trainable)
        return self

    def forward_levels(self, images: Tensor, mask: Tensor, num_levels: int) -> list[tuple[Tensor, Tensor]]:
        """The last `num_levels` stages' features `[B, C_i, h_i, w_i]` and masks `[B, h_i, w_i]`, finest first."""
        if not 1 <= num_levels <= len(self.stages):
            raise ValueError(f"num_levels must be 1..{len(self.stages)}, got {num_levels}")
        x = F.max_pool2d(self.stem(images), 3, 2, 1)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return [(f, F.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool()) for f in features[-num_levels:]]


def build_backbone(cfg: BackboneConfig, variant: str) -> nn.Module:
    """The backbone of `variant`: "vd" (`ResNetVd`) or "plain" (torchvision's layout, `backbone.Backbone`)."""
    return ResNetVd.from_config(cfg) if variant == "vd" else Backbone.from_config(cfg)


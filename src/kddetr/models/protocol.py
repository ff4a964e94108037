"""The detector protocol: the only things `kd/` and `engine/` may rely on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@dataclass
class ImageBatch:
    """Padded images `[B, 3, H, W]` and their padding mask `[B, H, W]` (True = padding)."""

    tensors: Tensor
    mask: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ImageBatch":
        return ImageBatch(self.tensors.to(device, non_blocking=non_blocking),
                          self.mask.to(device, non_blocking=non_blocking))

    @property
    def batch_size(self) -> int:
        return self.tensors.shape[0]


@dataclass
class Queries:
    """A group of decoder queries: anchors `[B, K, 4]` (cx, cy, w, h in [0, 1]), optional content `[B, K, D]`."""

    anchors: Tensor
    content: Optional[Tensor] = None

    @property
    def num_queries(self) -> int:
        return self.anchors.shape[1]


@dataclass
class DecoderOutput:
    """Per-layer predictions of one query group: `logits [L, B, Q, C]`, `boxes [L, B, Q, 4]` (cxcywh in [0, 1])."""

    logits: Tensor
    boxes: Tensor

    @property
    def pred_logits(self) -> Tensor:
        return self.logits[-1]

    @property
    def pred_boxes(self) -> Tensor:
        return self.boxes[-1]


@dataclass
class DetectorOutput(DecoderOutput):
    """Detection-query predictions plus, when asked for, isolated extra groups and denoising outputs."""

    extra: list[DecoderOutput] = field(default_factory=list)
    denoising: Optional[DecoderOutput] = None
    denoising_meta: Optional[dict[str, Any]] = None
    encoder_memory: Optional[Tensor] = None  # [B, S, D], for diagnostics only
    # Query-selecting detectors (two-stage Deformable DETR, DINO): the encoder's proposals `[1, B, N, C]` and
    # `[1, B, N, 4]` that the criterion trains with `enc_` terms; class-agnostic ones (two-stage Deformable DETR)
    # are trained as the reference does: every target counts as class 0, the other columns as negatives.
    encoder_proposals: Optional[DecoderOutput] = None
    encoder_class_agnostic: bool = False
    # Detectors that compute their own training losses (Faster R-CNN): already weighted terms for the criterion
    losses: Optional[dict[str, Tensor]] = None
    # Detectors with their own post-processing (Faster R-CNN's NMS), at inference: one dict per image of
    # `boxes` xyxy normalised to [0, 1], `scores`, `labels` (0..C-1); evaluation and predict use these as they are
    detections: Optional[list[dict[str, Tensor]]] = None


@dataclass(frozen=True)
class ClassSlots:
    """Where a tensor keeps its per-class rows: class c owns rows `first + c * width` .. `+ width - 1` of dim 0
    (rows before `first`, e.g. a background class, belong to no class). Fine-tuning onto other classes maps
    these rows by category name."""

    first: int = 0
    width: int = 1


def class_slots_by_prefix(module: torch.nn.Module, prefixes: tuple[str, ...],
                          slots: ClassSlots = ClassSlots()) -> dict[str, ClassSlots]:
    """`slots` for every state-dict tensor of `module` whose name starts with one of `prefixes`."""
    return {name: slots for name in module.state_dict() if name.startswith(prefixes)}


@runtime_checkable
class Detector(Protocol):
    """What a detector offers to the distiller, the trainer and the tools (docs/adding-a-detector.md)."""

    num_classes: int
    num_decoder_layers: int

    def encode(self, images: ImageBatch) -> Any:
        """The image encoding every decoding of the step reads (backbone and encoder run once)."""
        ...

    def decode(self, memory: Any, queries: Optional[Queries] = None) -> DecoderOutput:
        """Per-layer predictions at `queries` (`None`: the detector's own detection queries)."""
        ...

    def decode_groups(self, memory: Any, groups: Sequence[Optional[Queries]]) -> list[DecoderOutput]:
        """`decode` of every group, each isolated from the others (none sees another in self-attention)."""
        ...

    def learned_queries(self, batch_size: int, memory: Any = None) -> Queries:
        """The detector's own detection queries; query-selecting detectors choose them from `memory`."""
        ...

    def lr_multipliers(self) -> dict[str, float]:
        """Parameter-name fragments -> learning-rate multiplier (parameters matching none train at the base rate)."""
        ...

    def class_slots(self) -> dict[str, ClassSlots]:
        """The state-dict tensors with per-class rows (class heads, denoising label embeddings) and their layout."""
        ...

    def __call__(self, images: ImageBatch, targets: Optional[list[dict[str, Tensor]]] = None,
                 extra_queries: Optional[list[Queries]] = None) -> DetectorOutput:
        """Detection outputs, plus one isolated output per extra query group (in `DetectorOutput.extra`)."""
        ...

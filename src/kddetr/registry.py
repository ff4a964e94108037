"""The detector registry: one entry per architecture, its detector, loss and options loaded by name when used."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kddetr.errors import UserError


@dataclass(frozen=True)
class DetectorSpec:
    """An architecture: where its detector and training loss are built, and how the tools treat it.

    `model` and `criterion` name a callable as "module:attribute", imported only when first built, each called
    with `(model config, number of classes)`; `options` names the dataclass of its config section."""

    arch: str
    name: str  # for tables and messages
    model: str
    criterion: str
    num_select: int  # (query, class) pairs scored per image at evaluation, as its reference implementation
    options: str  # "module:Class" of its config section, `model.<arch>:` in YAML (a dataclass)
    set_prediction: bool = True  # one-to-one predictions matched to the ground truth (Hungarian KD applies)
    student_config: Optional[Path] = None  # a student that learns on the embedded data (CPU checks, benches)
    teacher_config: Optional[Path] = None  # its teacher there; with it `kddetr bench kd --arch` runs the pair
    shipped_teacher: Optional[Path] = None  # a committed trained teacher (else the bench trains one first)
    hf: Optional[str] = None  # "module:CONVERTER" to and from its HF transformers counterpart, if any
    official: Optional[str] = None  # "module:READER" of its official repository's checkpoints, if any


SPECS = (
    DetectorSpec("dab_detr", "DAB-DETR", "kddetr.models.dab_detr:DABDETR", "kddetr.models.criterion:build_criterion",
                 300, "kddetr.models.dab_detr:DABOptions", student_config=Path("configs/embedded_student.yaml"),
                 teacher_config=Path("configs/embedded_teacher.yaml"), shipped_teacher=Path("assets/teacher"),
                 hf="kddetr.interop.hf_dab_detr:CONVERTER", official="kddetr.interop.official:DAB_DETR"),
    DetectorSpec("deformable_detr", "Deformable DETR", "kddetr.models.deformable_detr:DeformableDETR",
                 "kddetr.models.criterion:build_criterion", 100, "kddetr.models.deformable_detr:DeformableOptions",
                 student_config=Path("configs/embedded_deformable_student.yaml"),
                 teacher_config=Path("configs/embedded_deformable_teacher.yaml"),
                 shipped_teacher=Path("assets/teacher_deformable_detr"),
                 hf="kddetr.interop.hf_deformable_detr:CONVERTER", official="kddetr.interop.official:DEFORMABLE_DETR"),
    DetectorSpec("dino", "DINO", "kddetr.models.dino:DINO", "kddetr.models.criterion:build_criterion", 300,
                 "kddetr.models.dino:DINOOptions",
                 student_config=Path("configs/embedded_dino_student.yaml"),
                 teacher_config=Path("configs/embedded_dino_teacher.yaml"), shipped_teacher=Path("assets/teacher_dino")),
    DetectorSpec("rt_detr", "RT-DETR", "kddetr.models.rt_detr:RTDETR", "kddetr.models.rt_detr:build_criterion", 300,
                 "kddetr.models.rt_detr:RTDetrOptions",
                 student_config=Path("configs/embedded_rt_detr_student.yaml"),
                 teacher_config=Path("configs/embedded_rt_detr_teacher.yaml"),
                 shipped_teacher=Path("assets/teacher_rt_detr"), hf="kddetr.interop.hf_rt_detr:CONVERTER"),
    DetectorSpec("faster_rcnn", "Faster R-CNN", "kddetr.models.faster_rcnn:FasterRCNN",
                 "kddetr.models.faster_rcnn:build_criterion", 100, "kddetr.models.faster_rcnn:RCNNOptions",
                 set_prediction=False,
                 student_config=Path("configs/embedded_frcnn_student.yaml")),
)
REGISTRY: dict[str, DetectorSpec] = {spec.arch: spec for spec in SPECS}


def spec(arch: str) -> DetectorSpec:
    if arch not in REGISTRY:
        raise UserError(f"model.arch: unknown architecture {arch!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[arch]


def load(target: str) -> Any:
    """The attribute named by "module:attribute"."""
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)

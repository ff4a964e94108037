"""The distiller: a frozen teacher, a student, shared distillation points, detection + KD losses."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from kddetr.config import KDConfig
from kddetr.errors import UserError
from kddetr.kd.baselines import HungarianKD, Matcher
from kddetr.kd.losses import DistillationLoss
from kddetr.kd.points import PointSampler, build_samplers, load_sampler_states, sampler_states
from kddetr.models.protocol import DecoderOutput, Detector, DetectorOutput, ImageBatch, Queries

LossDict = dict[str, Tensor]


@dataclass
class KDTerms:
    """The loss terms a KD method adds to each training step, resolved once from `kd.method`."""

    samplers: list[PointSampler] = field(default_factory=list)  # KD-DETR's point groups, distilled by `point_loss`
    point_loss: Optional[DistillationLoss] = None
    hungarian: Optional[HungarianKD] = None  # the inconsistent-points baseline, on the detection queries
    group_weights: dict[str, float] = field(default_factory=dict)  # a point group's KD losses x this (default 1)
    fade_steps: int = 0  # training steps over which every KD weight falls to 0 (0: constant)

    @classmethod
    def from_config(cls, cfg: KDConfig, matcher: Optional[Matcher] = None) -> "KDTerms":
        """`kd_detr`: the point groups of `cfg`; `hungarian`: predictions paired by `matcher` (a set-prediction
        student's); `none`: nothing to distil."""
        if cfg.method == "kd_detr":
            return cls(samplers=build_samplers(cfg), point_loss=DistillationLoss(cfg),
                       group_weights={"general": cfg.general_weight}, fade_steps=cfg.fade_steps)
        if cfg.method == "hungarian":
            if matcher is None:
                raise UserError("kd.method: hungarian pairs set predictions through their matches to the ground "
                                "truth; this student makes none (use kd_detr)")
            return cls(hungarian=HungarianKD(matcher, cfg.temperature), fade_steps=cfg.fade_steps)
        return cls()

    def fade(self, step: int) -> float:
        """The factor on every KD loss at training step `step`: a half cosine from 1 to 0 over `fade_steps`."""
        if not self.fade_steps:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.fade_steps) / self.fade_steps))

    @property
    def needs_teacher(self) -> bool:
        return bool(self.samplers) or self.hungarian is not None


class Distiller(nn.Module):
    """Runs one KD training step's forward: returns the student's outputs and named, weighted losses.

    KD-DETR, per step: sample the distillation points (one set per batch), decode them with the teacher (eval
    mode, no grad), decode them with the student beside its detection queries (isolated groups), then the
    detection loss on the detection queries and the KD loss on every group. Only the detector protocol is used;
    `student` is the module to optimise and save. Autocast, if any, is the caller's (the trainer's). Training-mode
    calls are counted as steps (checkpointed) for `kd.fade_steps`; once faded out, the student trains alone.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, criterion: Callable[..., LossDict],
                 kd: Union[KDTerms, KDConfig]) -> None:
        super().__init__()
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, Detector):
                raise TypeError(f"{name} {type(model).__name__} does not implement the detector protocol")
        if student.num_classes != teacher.num_classes:
            raise ValueError(f"teacher has {teacher.num_classes} classes, student {student.num_classes}")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.criterion = criterion
        self.terms = kd if isinstance(kd, KDTerms) else KDTerms.from_config(kd)
        self.steps_taken = 0

    @property
    def samplers(self) -> list[PointSampler]:
        return self.terms.samplers

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images: ImageBatch, targets: list[dict[str, Tensor]]) -> tuple[DetectorOutput, LossDict]:
        fade = self.terms.fade(self.steps_taken)
        if self.training:
            self.steps_taken += 1
        if fade == 0.0:
            outputs = self.student(images, targets)
            return outputs, dict(self.criterion(outputs, targets))
        groups, teacher_groups, teacher_detections = self._teacher_side(images)
        outputs = self.student(images, targets, extra_queries=groups or None)
        losses = dict(self.criterion(outputs, targets))
        for sampler, group, student_out, teacher_out in zip(self.samplers, groups, outputs.extra, teacher_groups):
            weight = fade * self.terms.group_weights.get(sampler.name, 1.0)
            for key, value in self.terms.point_loss(student_out, teacher_out, anchors=group.anchors).items():
                losses[f"{sampler.name}/{key}"] = weight * value
        if self.terms.hungarian is not None:
            for key, value in self.terms.hungarian(outputs, teacher_detections, targets).items():
                losses[f"hungarian/{key}"] = fade * value
        return outputs, losses

    @torch.no_grad()
    def _teacher_side(self, images: ImageBatch) -> tuple[list[Queries], list[DecoderOutput], Optional[DecoderOutput]]:
        """The step's point groups, the teacher's predictions at them and (Hungarian KD) at its own queries."""
        if not self.terms.needs_teacher:
            return [], [], None
        student_memory = None
        if any(sampler.needs_student for sampler in self.samplers):  # points from the student's own queries
            student_memory = self.student.encode(images)
        memory = self.teacher.encode(images)
        groups = [sampler(images.batch_size, images.tensors.device, self.teacher, memory, self.student,
                          student_memory) for sampler in self.samplers]
        teacher_groups = [_as_float(out) for out in self.teacher.decode_groups(memory, groups)] if groups else []
        detections = _as_float(self.teacher.decode(memory, None)) if self.terms.hungarian is not None else None
        return groups, teacher_groups, detections

    def extra_state(self) -> dict[str, Any]:
        return {"samplers": sampler_states(self.samplers), "steps_taken": self.steps_taken}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        load_sampler_states(self.samplers, state.get("samplers"))
        self.steps_taken = state.get("steps_taken", 0)


def _as_float(out: DecoderOutput) -> DecoderOutput:
    """fp32 outputs (the teacher may run under autocast)."""
    return DecoderOutput(logits=out.logits.float(), boxes=out.boxes.float())

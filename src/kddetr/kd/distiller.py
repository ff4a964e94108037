"""The distiller: a frozen teacher, a student, shared distillation points, detection + KD losses."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from kddetr.config import KDConfig
from kddetr.kd.losses import DistillationLoss
from kddetr.kd.points import PointSampler, build_samplers, load_sampler_states, sampler_states
from kddetr.models.protocol import DecoderOutput, Detector, DetectorOutput, ImageBatch, Queries

LossDict = dict[str, Tensor]


class Distiller(nn.Module):
    """Runs one KD-DETR training step's forward: returns the student's outputs and named losses.

    Per step: sample the distillation points (one set per batch), decode them with the teacher
    (eval mode, no grad), decode them with the student beside its detection queries (isolated
    groups), then detection loss on the detection queries and KD loss on every group.
    Only the detector protocol is used; `student` is the module to optimise and save.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, criterion: Callable[..., LossDict],
                 cfg: KDConfig, teacher_autocast: Optional[torch.dtype] = None,
                 baseline: Optional[Callable[[DecoderOutput, DecoderOutput, list], LossDict]] = None) -> None:
        super().__init__()
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, Detector):
                raise TypeError(f"{name} {type(model).__name__} does not implement the detector protocol")
        if student.num_classes != teacher.num_classes:
            raise ValueError(f"teacher has {teacher.num_classes} classes, student {student.num_classes}")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.criterion = criterion
        self.cfg = cfg
        self.teacher_autocast = teacher_autocast
        self.teacher_inference_mode = cfg.teacher_inference_mode
        if hasattr(teacher, "group_isolation") and hasattr(student, "group_isolation"):
            teacher.group_isolation = student.group_isolation  # same results whichever; the student's is the tuned one
        self.samplers: list[PointSampler] = build_samplers(cfg) if cfg.method == "kd_detr" else []
        self.kd_loss = DistillationLoss(cfg)
        self.baseline = baseline

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def _teacher_context(self, device: torch.device) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode() if self.teacher_inference_mode else torch.no_grad())
        if self.teacher_autocast is not None:
            stack.enter_context(torch.autocast(device.type, dtype=self.teacher_autocast))
        return stack

    def teacher_decode(self, memory: Any, groups: list[Queries]) -> list[DecoderOutput]:
        if hasattr(self.teacher, "decode_groups"):  # one (stacked or masked) pass where the teacher offers it
            return self.teacher.decode_groups(memory, groups)
        return [self.teacher.decode(memory, q) for q in groups]

    def forward(self, images: ImageBatch, targets: list[dict[str, Tensor]]) -> tuple[DetectorOutput, LossDict]:
        device = images.tensors.device
        batch_size = images.batch_size
        groups, teacher_groups, teacher_detections = [], [], None
        student, student_memory = getattr(self.student, "module", self.student), None  # the bare model under DDP
        if any(sampler.needs_student for sampler in self.samplers):  # points from the student's own queries
            with torch.no_grad():
                student_memory = student.encode(images)
        if self.samplers or self.cfg.method == "hungarian":  # else the teacher has nothing to do
            with self._teacher_context(device):
                memory = self.teacher.encode(images)
                groups = [sampler(batch_size, device, self.teacher, memory, student, student_memory)
                          for sampler in self.samplers]
                teacher_groups = self.teacher_decode(memory, groups) if groups else []
                teacher_detections = self.teacher.decode(memory, None) if self.cfg.method == "hungarian" else None
        # inference-mode tensors cannot be saved for the student's backward: normal copies (small) leave the block
        copy = self.teacher_inference_mode
        groups = [Queries(_normal(q.anchors, copy), None if q.content is None else _normal(q.content, copy))
                  for q in groups]
        teacher_groups = [_as_float(out, copy) for out in teacher_groups]
        teacher_detections = None if teacher_detections is None else _as_float(teacher_detections, copy)
        outputs = self.student(images, targets, extra_queries=groups or None)
        losses = dict(self.criterion(outputs, targets))
        for sampler, group, student_out, teacher_out in zip(self.samplers, groups, outputs.extra, teacher_groups):
            for key, value in self.kd_loss(student_out, teacher_out, anchors=group.anchors).items():
                losses[f"{sampler.name}/{key}"] = value
        if teacher_detections is not None:
            if self.baseline is None:
                raise ValueError("kd.method=hungarian needs a baseline loss")
            for key, value in self.baseline(outputs, teacher_detections, targets).items():
                losses[f"hungarian/{key}"] = value
        return outputs, losses

    def extra_state(self) -> dict[str, Any]:
        return {"samplers": sampler_states(self.samplers)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        load_sampler_states(self.samplers, state.get("samplers"))


def _normal(t: Tensor, copy: bool) -> Tensor:
    return t.clone() if copy else t


def _as_float(out: DecoderOutput, copy: bool = False) -> DecoderOutput:
    """fp32 outputs (the teacher may run under autocast), copied out of inference mode if `copy`."""
    logits, boxes = out.logits.float(), out.boxes.float()
    if copy and logits.dtype == out.logits.dtype:  # `.float()` of fp32 is the same (inference) tensor
        logits, boxes = logits.clone(), boxes.clone()
    return DecoderOutput(logits=logits, boxes=boxes)

"""The distiller: a frozen teacher, a student, shared distillation points, detection + KD losses."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from kddetr.config import KDConfig
from kddetr.kd.losses import DistillationLoss
from kddetr.kd.points import PointSampler, build_samplers, load_sampler_states, sampler_states
from kddetr.models.protocol import DecoderOutput, Detector, DetectorOutput, ImageBatch

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
        self.samplers: list[PointSampler] = build_samplers(cfg) if cfg.method == "kd_detr" else []
        self.kd_loss = DistillationLoss(cfg)
        self.baseline = baseline

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def _teacher_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.teacher_autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.teacher_autocast)

    def forward(self, images: ImageBatch, targets: list[dict[str, Tensor]]) -> tuple[DetectorOutput, LossDict]:
        device = images.tensors.device
        batch_size = images.batch_size
        with torch.no_grad(), self._teacher_context(device):
            memory = self.teacher.encode(images)
            groups = [sampler(batch_size, device, self.teacher, memory) for sampler in self.samplers]
            teacher_groups = [_as_float(self.teacher.decode(memory, q)) for q in groups]
            teacher_detections = (_as_float(self.teacher.decode(memory, None))
                                  if self.cfg.method == "hungarian" else None)
        outputs = self.student(images, targets, extra_queries=groups or None)
        losses = dict(self.criterion(outputs, targets))
        for sampler, student_out, teacher_out in zip(self.samplers, outputs.extra, teacher_groups):
            for key, value in self.kd_loss(student_out, teacher_out).items():
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


def _as_float(out: DecoderOutput) -> DecoderOutput:
    return DecoderOutput(logits=out.logits.float(), boxes=out.boxes.float())

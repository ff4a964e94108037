"""The training objective: what the trainer calls each step, and how one is built from a config."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from kddetr.config import Config
from kddetr.models.protocol import DetectorOutput, ImageBatch

LossDict = dict[str, Tensor]


class Objective(Protocol):
    """What the trainer may rely on. Calling it with a batch gives the student's outputs and its named losses,
    already weighted (the trainer sums them), the distillation terms named `group/term` (`is_distillation_loss`),
    the student's own without a group; `student` is the module to optimise, evaluate and save; the extra
    state (e.g. the distillation points' generator) is checkpointed beside it. The trainer wraps the whole
    objective for DDP, so an objective uses its modules as they are."""

    student: nn.Module

    def __call__(self, images: ImageBatch, targets: list[dict[str, Tensor]]) -> tuple[DetectorOutput, LossDict]: ...

    def extra_state(self) -> dict[str, Any]: ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...


def is_distillation_loss(name: str) -> bool:
    """Whether an objective's loss term is a distillation term (`general/kd_cls`, `hungarian/kd_cls`) rather than
    one of the student's own (`loss_ce`, `dn_loss_bbox_0`)."""
    return "/" in name


def is_objective(candidate: object) -> bool:
    """Whether `candidate` offers what `Objective` names. Checked by attribute: from Python 3.12 a runtime
    protocol check reads attributes statically and misses a `student` held as an `nn.Module` submodule."""
    methods = ("extra_state", "load_extra_state")
    return (callable(candidate) and isinstance(getattr(candidate, "student", None), nn.Module)
            and all(callable(getattr(candidate, name, None)) for name in methods))


class DetectionObjective(nn.Module):
    """Plain detector training: the criterion on the detection queries."""

    def __init__(self, student: nn.Module, criterion: Callable[..., LossDict]) -> None:
        super().__init__()
        self.student = student
        self.criterion = criterion

    def forward(self, images: ImageBatch, targets: list[dict[str, Tensor]]) -> tuple[DetectorOutput, LossDict]:
        outputs = self.student(images, targets)
        return outputs, dict(self.criterion(outputs, targets))

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def build_objective(cfg: Config, num_classes: int, category_ids: list[int], teacher: Optional[Path],
                    device: torch.device, teacher_overrides: Sequence[str] = ()) -> nn.Module:
    """The student with its criterion; with a `teacher` checkpoint (its config overridden by `teacher_overrides`)
    and a KD method, the distiller around them. `kd.method` is resolved here, once, into the loss terms it adds."""
    from kddetr.engine.checkpoint import load_checkpoint
    from kddetr.kd.distiller import Distiller, KDTerms
    from kddetr.models.build import build_criterion, build_detector
    from kddetr.models.criterion import build_matcher
    from kddetr.registry import spec

    student = build_detector(cfg.model, num_classes)
    criterion = build_criterion(cfg.model, num_classes)
    if teacher is None:
        return DetectionObjective(student, criterion)
    matcher = build_matcher(cfg.model) if spec(cfg.model.arch).set_prediction else None
    terms = KDTerms.from_config(cfg.kd, matcher)
    if not terms.needs_teacher:
        return DetectionObjective(student, criterion)
    ckpt = load_checkpoint(teacher, device, teacher_overrides)
    ckpt.dataset.check_matches(str(teacher), category_ids)
    return Distiller(student, ckpt.model, criterion, terms)

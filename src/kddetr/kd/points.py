"""Distillation-point sampling: general (random anchors), specific (the teacher's own queries), the student's own."""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from kddetr.config import KDConfig
from kddetr.errors import UserError
from kddetr.models.denoising import noise_corners
from kddetr.models.protocol import Queries


class PointSampler(Protocol):
    """Builds one group of distillation queries for a batch; shared by teacher and student."""

    name: str
    needs_student: bool  # the caller must pass the student and its no-grad encoding of the batch

    def __call__(self, batch_size: int, device: torch.device, teacher: Any, teacher_memory: Any,
                 student: Any = None, student_memory: Any = None) -> Queries: ...


class _Seeded:
    """Samplers that own a generator, so that runs are reproducible and resumable: its state is saved and restored."""

    generator: torch.Generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


class GeneralPoints(_Seeded):
    """K random anchors over the whole image, resampled every step, one set for the whole batch.

    `uniform`: centres and sizes uniform in (0, 1) (the paper). `logit_normal`: sigmoid(N(0, 1))
    per coordinate (the released code; boxes cluster at the centre, median w, h = 0.5).
    """

    name = "general"
    needs_student = False

    def __init__(self, num_points: int, distribution: str = "uniform", seed: int = 0) -> None:
        if distribution not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown point distribution {distribution!r}")
        self.num_points = num_points
        self.distribution = distribution
        self.generator = torch.Generator().manual_seed(seed)

    def sample_anchors(self) -> torch.Tensor:
        shape = (self.num_points, 4)
        if self.distribution == "uniform":
            anchors = torch.rand(shape, generator=self.generator)
        else:
            anchors = torch.randn(shape, generator=self.generator).sigmoid()
        return anchors.clamp(1e-4, 1 - 1e-4)

    def __call__(self, batch_size: int, device: torch.device, teacher: Any = None, teacher_memory: Any = None,
                 student: Any = None, student_memory: Any = None) -> Queries:
        anchors = self.sample_anchors().to(device)
        return Queries(anchors=anchors.unsqueeze(0).expand(batch_size, -1, -1))


class NearTeacherPoints(_Seeded):
    """K points per image around the teacher's own queries: a random query's anchor (drawn with replacement),
    each corner moved by up to `box_noise` x (w/2, h/2) as in DINO's box noise (`general_distribution:
    near_teacher`).

    For detectors whose queries are encoder proposals (RT-DETR), a box drawn anywhere in the image is a query the
    teacher never decodes; a box near one of its proposals stays close to what it was trained to answer.
    """

    name = "general"
    needs_student = False

    def __init__(self, num_points: int, box_noise: float = 1.0, seed: int = 0) -> None:
        if box_noise < 0:
            raise UserError(f"kd.general_box_noise: must be >= 0, got {box_noise}")
        self.num_points = num_points
        self.box_noise = box_noise
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch_size: int, device: torch.device, teacher: Any = None, teacher_memory: Any = None,
                 student: Any = None, student_memory: Any = None) -> Queries:
        if teacher is None:
            raise ValueError("kd.general_distribution=near_teacher: the caller must pass the teacher")
        anchors = teacher.learned_queries(batch_size, memory=teacher_memory).anchors.detach().float().cpu()
        picks = torch.randint(anchors.shape[1], (batch_size, self.num_points), generator=self.generator)
        centres = torch.gather(anchors, 1, picks[..., None].expand(-1, -1, 4))
        noised = noise_corners(centres, self.box_noise, self.generator)
        return Queries(anchors=noised.clamp(1e-4, 1 - 1e-4).to(device))


class _Stateless:
    """Samplers without random state: nothing to save or restore on resume."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SpecificPoints(_Stateless):
    """The teacher's own detection queries: their anchors (per image for query-selecting detectors), or with
    `source="final_boxes"` the boxes its last decoder layer predicts from them for each image.

    The content part is left empty (zeros), as in the released code: teacher and student widths may differ.
    The final boxes suit students that read a point locally (an RoI head, deformable sampling): a DAB-DETR
    teacher's anchors are the same for every image and its answer at one may lie far from it.
    """

    name = "specific"
    needs_student = False

    def __init__(self, source: str = "anchors") -> None:
        if source not in ("anchors", "final_boxes"):
            raise ValueError(f"unknown specific-point source {source!r}")
        self.source = source

    def __call__(self, batch_size: int, device: torch.device, teacher: Any, teacher_memory: Any = None,
                 student: Any = None, student_memory: Any = None) -> Queries:
        if self.source == "anchors":
            anchors = teacher.learned_queries(batch_size, memory=teacher_memory).anchors
        else:  # a predicted box may touch the image border; anchors stay strictly inside (0, 1)
            anchors = teacher.decode(teacher_memory, None).boxes[-1].float().clamp(1e-4, 1 - 1e-4)
        return Queries(anchors=anchors.detach().to(device))


class StudentProposals(_Stateless):
    """The student's own queries of the step, e.g. a two-stage student's RPN proposals (heterogeneous KD).

    `student.learned_queries(batch_size, memory=student_memory)` from the student's encoding of the same
    images (the caller encodes without grad; `needs_student` tells it to). Anchors only, like `SpecificPoints`.
    """

    name = "proposals"
    needs_student = True

    def __call__(self, batch_size: int, device: torch.device, teacher: Any = None, teacher_memory: Any = None,
                 student: Any = None, student_memory: Any = None) -> Queries:
        if student is None or student_memory is None:
            raise ValueError("kd.student_proposals: the caller must pass `student` and `student_memory`")
        queries = student.learned_queries(batch_size, memory=student_memory)
        return Queries(anchors=queries.anchors.detach().to(device))


def build_samplers(cfg: KDConfig) -> list[PointSampler]:
    """The groups of distillation points that `cfg` asks for: general, specific, then the student's proposals."""
    samplers: list[PointSampler] = []
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if cfg.general_points > 0 and cfg.general_distribution == "near_teacher":
        samplers.append(NearTeacherPoints(cfg.general_points, cfg.general_box_noise, cfg.seed + rank))
    elif cfg.general_points > 0:  # each rank draws its own points, as in the released code
        samplers.append(GeneralPoints(cfg.general_points, cfg.general_distribution, cfg.seed + rank))
    if cfg.specific_points:
        samplers.append(SpecificPoints(cfg.specific_source))
    if cfg.student_proposals:
        samplers.append(StudentProposals())
    return samplers


def sampler_states(samplers: list[PointSampler]) -> dict[str, Any]:
    return {s.name: s.state_dict() for s in samplers}


def load_sampler_states(samplers: list[PointSampler], states: Optional[dict[str, Any]]) -> None:
    for s in samplers:
        if states and s.name in states:
            s.load_state_dict(states[s.name])

"""Shared helpers for the distillation tests."""
import torch

from kddetr.kd.distiller import Distiller
from kddetr.kd.points import GeneralPoints


def kd_on_fresh_points_ratio(distiller: Distiller, images, targets, steps: int, lr: float = 2e-3) -> float:
    """Train `steps` KD steps on one batch; return the KD loss on held-out random points after / before."""
    student, teacher = distiller.student, distiller.teacher
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    held_out = GeneralPoints(64, "uniform", seed=12345)(images.batch_size, torch.device("cpu"))
    measure = distiller.terms.point_loss

    def fresh_kd() -> float:
        student.eval()
        with torch.no_grad():
            s_mem, t_mem = student.encode(images), teacher.encode(images)
            value = sum(measure(student.decode(s_mem, held_out), teacher.decode(t_mem, held_out)).values())
        student.train()
        return float(value)

    start = fresh_kd()
    for _ in range(steps):
        _, losses = distiller(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return fresh_kd() / start

"""Speed benchmark: KD step cost against its parts, and the three ways to isolate query groups."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from kddetr.config import load_config
from kddetr.data.coco import build_dataset
from kddetr.data.collate import collate
from kddetr.engine.checkpoint import load_checkpoint
from kddetr.kd.distiller import Distiller
from kddetr.models.build import build_criterion, build_detector


def _median_times(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Interleaved timing (one call of each per round) so that machine noise hits every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def kd_overhead(config: Path, teacher: Path, data: Path, batch_size: int = 8, repeats: int = 10,
                overrides: Sequence[str] = ()) -> str:
    cfg = load_config(config, list(overrides))
    dataset = build_dataset(data, cfg.data.train_split, cfg.data, train=True)
    images, targets = collate([dataset[i] for i in range(batch_size)])
    teacher_model = load_checkpoint(teacher).model
    torch.manual_seed(0)
    student = build_detector(cfg.model, dataset.num_classes)
    criterion = build_criterion(cfg.model, dataset.num_classes)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def step(forward: Callable[[], dict]) -> Callable[[], None]:
        def run() -> None:
            losses = forward()
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
        return run

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher_model(images)

    fns = {"student step": step(lambda: criterion(student(images, targets), targets)),
           "teacher forward": teacher_forward}
    distiller = Distiller(student, teacher_model, criterion, cfg.kd).train()
    kd_step = step(lambda: distiller(images, targets)[1])

    def kd_with(isolation: str) -> Callable[[], None]:
        def run() -> None:
            student.group_isolation = isolation
            kd_step()
        return run

    for isolation in ("separate", "mask"):
        fns[f"KD step ({isolation})"] = kd_with(isolation)
    t = _median_times(fns, repeats)
    base = t["student step"] + t["teacher forward"]
    points = f"{cfg.kd.general_points} general + {'specific' if cfg.kd.specific_points else 'no specific'}"
    lines = [f"KD overhead, batch {batch_size}, {points} points, {torch.get_num_threads()} threads, "
             f"median of {repeats}", "", "| step | s | ratio to student step + teacher forward |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {v / base:.2f} |" for k, v in t.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="kddetr bench speed", description=__doc__)
    p.add_argument("--config", type=Path, default=Path("configs/embedded_student.yaml"))
    p.add_argument("--teacher", type=Path, default=Path("assets/teacher"))
    p.add_argument("--data", type=Path, default=Path("data/embedded"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    print(kd_overhead(args.config, args.teacher, args.data, args.batch_size, args.repeats, args.overrides))
    return 0

"""KD against detection gradients: how large the distillation gradient is beside the detector's own, per part."""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from kddetr.bench.records import print_and_record
from kddetr.engine.objective import is_distillation_loss
from kddetr.errors import UserError


def part_gradients(student: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    """d `loss` / d parameters, flattened per top-level part of `student` (`backbone`, `encoder`, ...) and `all`."""
    named = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for (name, p), grad in zip(named, grads):
        flat = (grad if grad is not None else torch.zeros_like(p)).flatten()
        parts[name.split(".")[0]].append(flat)
    parts["all"] = [flat for flats in list(parts.values()) for flat in flats]
    return {part: torch.cat(flats) for part, flats in parts.items()}


def gradient_table(objective: nn.Module, batches: Sequence[tuple]) -> list[tuple[str, float, float, float]]:
    """Per part: mean over `batches` of |g_detection|, |g_KD| and their cosine (one training step's forward
    each, no update)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    objective.train()
    for images, targets in batches:
        _, losses = objective(images, targets)
        kd = [v for k, v in losses.items() if is_distillation_loss(k)]
        if not kd:
            raise UserError("no KD loss in this configuration (kd.method: none, or a teacher it does not need)")
        detection = part_gradients(objective.student, sum(v for k, v in losses.items() if not is_distillation_loss(k)))
        distillation = part_gradients(objective.student, sum(kd))
        for part, g_det in detection.items():
            g_kd = distillation[part]
            cosine = torch.nn.functional.cosine_similarity(g_det, g_kd, dim=0).item()
            for i, value in enumerate((g_det.norm().item(), g_kd.norm().item(), cosine)):
                sums[part][i] += value / len(batches)
    return [(part, *values) for part, values in sums.items()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kddetr bench kd-gradients", description=__doc__ + (
        " Both gradients are taken on the same training batches (no update), per top-level part of the student. "
        "A KD gradient many times the detection one takes most of each clipped or Adam-normalised step: the "
        "student learns from its labels more slowly."))
    p.add_argument("config", type=Path, help="the student's config (as for `kddetr distill`)")
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--teacher-set", dest="teacher_overrides", action="append", default=[])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. kd.cls_weight=0.5")
    p.add_argument("--student", type=Path, help="a checkpoint whose weights the student starts from (default: "
                                                 "its initialisation), to measure later in training")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", type=Path, help="save the command and its table here, for `kddetr bench report`")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from kddetr.config import load_config
    from kddetr.data.loader import load_datasets, make_loader
    from kddetr.engine.checkpoint import load_checkpoint
    from kddetr.engine.objective import build_objective
    from kddetr.engine.seeding import seed_everything

    args = parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    train_set, _ = load_datasets(cfg, args.data)
    seed_everything(args.seed)
    device = torch.device("cpu")
    objective = build_objective(cfg, len(train_set.category_ids), train_set.category_ids, args.teacher, device,
                                args.teacher_overrides)
    if args.student is not None:
        ckpt = load_checkpoint(args.student, device)
        ckpt.dataset.check_matches(str(args.student), train_set.category_ids)
        objective.student.load_state_dict(ckpt.model.state_dict())
    loader = iter(make_loader(train_set, cfg.train.batch_size, True, 0, None, device))
    batches = [next(loader) for _ in range(args.batches)]
    lines = [f"student `{args.config}`{f' with the weights of `{args.student}`' if args.student else ''}, teacher "
             f"`{args.teacher}`; overrides: {', '.join(args.overrides) or 'none'}; mean of {args.batches} training "
             "batches", "", "| part | detection gradient | KD gradient | KD / detection | cosine |",
             "|---|---:|---:|---:|---:|"]
    for part, det, kd, cosine in gradient_table(objective, batches):
        lines.append(f"| {part} | {det:.4g} | {kd:.4g} | {kd / det if det else float('inf'):.2f} | {cosine:+.2f} |")
    print_and_record("kd-gradients", argv, "\n".join(lines), args.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

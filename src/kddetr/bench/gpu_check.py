"""`make gpu-check`: one run that says whether the CUDA path can be trusted.

Checks, each a row of one table: CPU vs GPU fp32 parity of every detector; bf16 and fp16 AMP train and distill
steps whose loss falls; peak GPU memory of a teacher forward + student KD step with the COCO configs (batch 8
at 800 px, the paper's per-GPU setting); `kddetr bench speed --device cuda --amp`; NCCL DDP with two processes
when two GPUs are visible. Exits 1 when any check fails; without a GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from kddetr.config import Config, load_config
from kddetr.models.protocol import ImageBatch, Queries
from kddetr.registry import REGISTRY, spec

PARITY_TOLERANCE = 1e-3


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0
    printed: str = ""  # what a command check printed (e.g. the GPU speed tables), kept for the records


def _random_images(batch: int, size: int, device: torch.device, seed: int = 0) -> ImageBatch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    return ImageBatch(images, torch.zeros(batch, size, size, dtype=torch.bool)).to(device)


def _random_targets(batch: int, num_classes: int, device: torch.device, seed: int = 0) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        n = 4
        centres, sizes = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.2 + 0.1
        targets.append({"labels": torch.randint(num_classes, (n,), generator=g).to(device),
                        "boxes": torch.cat([centres, sizes], -1).to(device)})
    return targets


def _model_config(path: str, overrides: Sequence[str] = ()) -> Config:
    return load_config(path, ["model.backbone.weights=null", *overrides])


def parity(arch: str, device: torch.device, size: int = 128) -> Check:
    """fp32 outputs of the same weights on the CPU and on `device`: the full forward (DETRs) and the decoding of
    fixed anchors (every detector, through the protocol's encode/decode)."""
    from kddetr.models.build import build_detector

    torch.manual_seed(0)
    model = build_detector(_model_config(spec(arch).student_config).model, 10).eval()  # random weights suffice
    images = _random_images(2, size, torch.device("cpu"))
    anchors = Queries(torch.rand(2, 20, 4, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25)

    def outputs(m: nn.Module, imgs: ImageBatch, queries: Queries) -> list[Tensor]:
        with torch.no_grad():
            decoded = m.decode(m.encode(imgs), queries)
            full = [m(imgs).pred_logits, m(imgs).pred_boxes] if spec(arch).set_prediction else []
        return [decoded.logits, decoded.boxes, *full]

    reference = outputs(model, images, anchors)
    model.to(device)
    moved = Queries(anchors.anchors.to(device))
    error = max((a - b.cpu()).abs().max().item() for a, b in zip(reference, outputs(model, images.to(device), moved)))
    return Check(f"parity {arch} (fp32, CPU vs {device.type})", error <= PARITY_TOLERANCE,
                 f"max abs error {error:.1e} (≤ {PARITY_TOLERANCE:g})")


def amp_steps(kind: str, dtype: torch.dtype, device: torch.device, data: Path, teacher: Path,
              steps: int = 100) -> Check:
    """`steps` optimiser steps of the embedded student (`train`) or its KD-DETR distillation (`distill`) under
    autocast `dtype` (fp16 with gradient scaling): the loss must fall and stay finite."""
    from kddetr.data.coco import build_dataset
    from kddetr.data.collate import collate
    from kddetr.engine.objective import build_objective

    cfg = load_config("configs/embedded_student.yaml")
    dataset = build_dataset(data, "train", cfg.data, train=False)
    torch.manual_seed(0)
    objective = build_objective(cfg, dataset.num_classes, dataset.category_ids,
                                teacher if kind == "distill" else None, device).to(device)
    objective.train()
    optimizer = torch.optim.AdamW(objective.student.parameters(), lr=2e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch = 8
    batches = [collate([dataset[(i * batch + j) % len(dataset)] for j in range(batch)])
               for i in range(max(1, len(dataset) // batch))]
    losses = []
    for step in range(steps):
        images, targets = batches[step % len(batches)]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=dtype):
            _, terms = objective(images.to(device), targets)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(objective.student.parameters(), 0.1)
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss))
    window = max(1, steps // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    name = f"{kind} {steps} steps, {str(dtype).removeprefix('torch.')} autocast"
    return Check(name, finite and last < first, f"loss {first:.2f} → {last:.2f}" + ("" if finite else ", non-finite"))


def coco_memory(device: torch.device, batch: int = 8, size: int = 800, num_classes: int = 80) -> Check:
    """Peak memory of one KD-DETR step with the COCO configs (R50 teacher forward + R18 student step, bf16)."""
    from kddetr.kd.distiller import Distiller
    from kddetr.models.build import build_criterion, build_detector

    student_cfg = _model_config("configs/coco_dab_detr_r18_student.yaml")
    teacher_cfg = _model_config("configs/coco_dab_detr_r50_teacher.yaml")
    student = build_detector(student_cfg.model, num_classes).to(device)
    teacher = build_detector(teacher_cfg.model, num_classes).to(device)
    distiller = Distiller(student, teacher, build_criterion(student_cfg.model, num_classes),
                          student_cfg.kd).to(device).train()
    images, targets = _random_images(batch, size, device), _random_targets(batch, num_classes, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        _, terms = distiller(images, targets)
    sum(terms.values()).backward()
    if device.type != "cuda":
        return Check(f"COCO KD step, batch {batch} at {size} px", True, "ran (memory is measured on GPUs only)")
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return Check(f"COCO KD step, batch {batch} at {size} px (bf16)", peak < total,
                 f"peak {peak:.1f} GiB of {total:.0f} GiB")


def command(name: str, args: Sequence[str], timeout: float = 600) -> Check:
    """A kddetr command as a subprocess: passes when it exits 0; its last output line is the detail."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    printed = proc.stdout.strip() if proc.returncode == 0 else ""
    if printed:
        print(printed, flush=True)
    return Check(name, proc.returncode == 0, (lines[-1] if lines else "")[:120], printed=printed)


def checks(device: torch.device, data: Path, teacher: Path, steps: int, size: int, run_dir: Path
           ) -> list[tuple[str, Callable[[], Check]]]:
    """(name, check) pairs: the name stands in the table when the check raises."""
    kddetr = [sys.executable, "-m", "kddetr"]
    plan: list[tuple[str, Callable[[], Check]]] = [
        (f"parity {arch}", lambda a=arch: parity(a, device))
        for arch, entry in REGISTRY.items() if entry.student_config]
    plan += [(f"{kind} {dtype}", lambda k=kind, d=dtype: amp_steps(k, d, device, data, teacher, steps))
             for kind in ("train", "distill") for dtype in (torch.bfloat16, torch.float16)]
    plan.append(("COCO KD step memory", lambda: coco_memory(device, size=size)))
    if device.type == "cuda":
        plan.append(("bench speed", lambda: command("bench speed --device cuda --amp", [
            *kddetr, "bench", "speed", "--device", "cuda", "--amp", "--data", str(data), "--only", "kd",
            "--only", "inference", "--repeats", "5"])))
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        plan.append(("NCCL DDP", lambda: command("NCCL DDP, 2 processes", [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kddetr",
            "distill", "configs/embedded_student.yaml", "--teacher", str(teacher), "--data", str(data), "--out",
            str(run_dir / "ddp"), "--device", "cuda", "--no-progress", "--set", "train.max_steps=20"])))
    return plan


def table(results: Sequence[Check], device_name: str) -> str:
    lines = [f"gpu-check on {device_name}", "", "| check | result | detail | s |", "|---|---|---|---:|"]
    cells = [(c.name, "ok" if c.ok else "FAILED", c.detail.replace("|", "\\|"), f"{c.seconds:.0f}") for c in results]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="kddetr bench gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same checks on the CPU")
    p.add_argument("--teacher", type=Path, default=Path("assets/teacher"))
    p.add_argument("--steps", type=int, default=100, help="optimiser steps of the AMP checks")
    p.add_argument("--coco-size", type=int, default=800, help="image side of the COCO memory check")
    p.add_argument("--records", type=Path, help="also save the command, the table and the printed speed tables "
                                                "here (output.json), for `kddetr bench report`")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible on this machine; nothing to check")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # parity is checked in true fp32
        torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        from kddetr.data.synth import generate

        data = Path(tmp) / "data"
        generate(data, num_train=64, num_val=8, size=128, seed=0)
        for check_name, check in checks(device, data, args.teacher, args.steps, args.coco_size, Path(tmp)):
            start = time.time()
            try:
                result = check()
            except Exception as e:  # noqa: BLE001 - a failed check is a row, not the end of the run
                result = Check(check_name, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160])
            result.seconds = time.time() - start
            results.append(result)
            print(f"{'ok' if result.ok else 'FAILED'}: {result.name}: {result.detail}", flush=True)
    report = "\n\n".join([table(results, name), *(r.printed for r in results if r.printed)])
    print("\n" + report)
    if args.records:
        from kddetr.bench.records import save_output

        save_output(args.records, "kddetr bench gpu-check " + shlex.join(argv if argv is not None else sys.argv[1:]),
                    report)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

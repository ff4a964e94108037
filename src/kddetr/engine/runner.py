"""Wiring for the CLI: build data, models and objective from a config, then train or evaluate."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DistributedSampler

from kddetr.config import Config
from kddetr.data.loader import load_datasets, make_loader
from kddetr.engine import distributed as dist
from kddetr.engine.checkpoint import load_checkpoint
from kddetr.engine.evaluate import evaluate, print_metrics_table
from kddetr.engine.finetune import InitRequest, init_from_checkpoint
from kddetr.engine.objective import build_objective
from kddetr.engine.seeding import seed_everything
from kddetr.engine.train import Trainer
from kddetr.errors import UserError
from kddetr.models.build import count_parameters, num_select
from kddetr.registry import spec


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")


def run_training(cfg: Config, data_dir: Path, out_dir: Path, device: str = "cpu", resume: bool = False,
                 teacher: Optional[Path] = None, progress: bool = True,
                 init: Optional[InitRequest] = None, teacher_overrides: Sequence[str] = ()) -> dict[str, float]:
    """Validate everything, then train (`teacher` given: distil, its config with `teacher_overrides` applied).
    Nothing is written before validation.

    Under torchrun each process joins the process group from the environment and trains its share.
    """
    check_device(device)
    with dist.process_group(device) as torch_device:
        return _train(cfg, data_dir, out_dir, torch_device, resume, teacher, progress, init, teacher_overrides)


def _train(cfg: Config, data_dir: Path, out_dir: Path, torch_device: torch.device, resume: bool,
           teacher: Optional[Path], progress: bool, init: Optional[InitRequest],
           teacher_overrides: Sequence[str] = ()) -> dict[str, float]:
    train_set, val_set = load_datasets(cfg, Path(data_dir))
    num_classes = len(train_set.category_ids)
    if cfg.model.num_classes not in (0, num_classes):
        raise UserError(f"model.num_classes={cfg.model.num_classes} but {train_set.ann_file} "
                        f"has {num_classes} categories")
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic and torch_device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    objective = build_objective(cfg, num_classes, train_set.category_ids, teacher, torch_device, teacher_overrides)
    if dist.is_main_process():
        print(f"{spec(cfg.model.arch).name} with {count_parameters(objective.student) / 1e6:.2f} M parameters "
              f"({count_parameters(objective.student, trainable_only=True) / 1e6:.2f} M trained), "
              f"{num_classes} class{'' if num_classes == 1 else 'es'}, {len(train_set)} training images", flush=True)
    if init is not None:
        _init_student(objective.student, cfg, init, train_set.category_names, Path(out_dir), resume)
    trainer = Trainer(cfg, objective, train_set, val_set, Path(out_dir), torch_device, progress)
    return trainer.fit(resume=resume)


def _init_student(student: torch.nn.Module, cfg: Config, init: InitRequest, category_names: list[str],
                  out_dir: Path, resume: bool) -> None:
    if resume:
        if dist.is_main_process():
            print(f"--resume: continuing {out_dir / 'last'}; --init {init.checkpoint} is not applied")
        return
    summary = init_from_checkpoint(student, cfg.model.arch, init.checkpoint, category_names, init.renames,
                                   init.partial)
    if dist.is_main_process():
        print(summary.describe())


def evaluate_checkpoint(checkpoint: Path, data_dir: Path, split: str, out: Optional[Path], batch_size: int = 8,
                        device: str = "cpu", progress: bool = True) -> dict[str, float]:
    from kddetr.data.coco import build_dataset

    check_device(device)
    with dist.process_group(device) as torch_device:
        ckpt = load_checkpoint(checkpoint, torch_device)
        dataset = build_dataset(Path(data_dir), split, ckpt.config.data, train=False)
        ckpt.dataset.check_matches(str(checkpoint), dataset.category_ids)
        sampler = DistributedSampler(dataset, shuffle=False) if dist.world_size() > 1 else None
        loader = make_loader(dataset, batch_size, False, ckpt.config.data.num_workers, sampler, torch_device)
        metrics, results = evaluate(ckpt.model, loader, dataset, torch_device, top_k=num_select(ckpt.config.model),
                                    progress=progress and dist.is_main_process())
        if not dist.is_main_process():
            return metrics
    print(print_metrics_table(metrics, title=f"{checkpoint} on {split}"))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=1))
        (out.parent / "results.json").write_text(json.dumps(results))
    return metrics

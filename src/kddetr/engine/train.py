"""The training loop shared by `kddetr train` and `kddetr distill`: steps, evaluation, logging, checkpoints."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from kddetr.config import Config, save_config
from kddetr.data.coco import CocoDetection
from kddetr.data.loader import make_loader
from kddetr.engine import distributed as dist
from kddetr.engine.checkpoint import (DatasetInfo, load_state_dict_file, load_trainer_state, load_weights_into,
                                      save_checkpoint, MODEL_FILE, STATE_FILE)
from kddetr.engine.diagnostics import collapse_stats
from kddetr.engine.evaluate import evaluate
from kddetr.engine.nonfinite import NonFiniteLossError, NonFiniteWatch
from kddetr.engine.objective import Objective, is_objective
from kddetr.engine.precision import autocast, grad_scaler
from kddetr.engine.seeding import rng_state, seed_everything, set_rng_state
from kddetr.engine.update import Update
from kddetr.errors import UserError
from kddetr.models.build import num_select
from kddetr.models.protocol import DetectorOutput, ImageBatch

LossDict = dict[str, Tensor]


@dataclass
class RunPaths:
    root: Path

    @property
    def last(self) -> Path:
        return self.root / "last"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"


class Trainer:
    """Trains `objective.student` with `objective`'s losses; writes a run directory.

    Under torch.distributed (torchrun) the objective is called through its DistributedDataParallel wrapper, so
    the student's gradients are averaged over processes; `self.student` is the bare module (optimiser,
    checkpoints, evaluation). Each process loads `batch_size` images per step; losses and metrics are averaged
    over processes and only process 0 writes files.
    """

    def __init__(self, cfg: Config, objective: Objective, train_set: CocoDetection,
                 val_set: Optional[CocoDetection], out_dir: Path, device: torch.device, progress: bool = True) -> None:
        if not is_objective(objective):
            raise TypeError(f"{type(objective).__name__} does not implement the objective protocol")
        self.cfg, self.objective, self.device = cfg, objective.to(device), device
        self.student: nn.Module = objective.student
        self.train_set, self.val_set = train_set, val_set
        self.paths = RunPaths(Path(out_dir))
        self.progress = progress and dist.is_main_process()
        self.dataset_info = DatasetInfo(train_set.category_ids, train_set.category_names)
        tc = cfg.train
        self.sampler = DistributedSampler(train_set, num_replicas=dist.world_size(), rank=dist.rank(),
                                          shuffle=True, seed=tc.seed, drop_last=True)
        self.loader = make_loader(train_set, tc.batch_size, True, cfg.data.num_workers, self.sampler, device)
        if len(self.loader) == 0:
            raise UserError(f"{train_set.ann_file}: {len(train_set)} training images are fewer than one "
                            f"batch of {tc.batch_size} per process; lower train.batch_size")
        self.update = Update(self.student, tc, len(self.loader), grad_scaler(device, tc.amp))
        self.epoch = self.step = 0
        self.best_ap = -1.0
        self.time_s = 0.0  # training wall time so far, summed over resumed invocations
        self.writer = None
        # Non-finite losses: checked every step on the CPU (free) and to skip batches (needs a per-step decision);
        # on GPUs that stop, recorded on the device and checked every `log_every` steps and at each epoch's end.
        lazy = tc.on_nonfinite == "stop" and (device.type != "cpu" or tc.nonfinite_check_every > 1)
        self.check_every = (tc.nonfinite_check_every or tc.log_every) if lazy else 1
        self.watch = NonFiniteWatch()
        wrapped = dist.wrap_ddp(objective, device)
        self.forward = torch.compile(wrapped) if tc.compile else wrapped

    # ---- state -------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best_ap": self.best_ap, "time_s": self.time_s,
                **self.update.state_dict(), "rng": rng_state(), "objective": self.objective.extra_state()}

    def resume(self) -> None:
        last = self.paths.last
        state = load_trainer_state(last)
        load_weights_into(self.student, load_state_dict_file(last / MODEL_FILE), str(last / MODEL_FILE))
        try:
            self.update.load_state_dict(state)
            set_rng_state(state["rng"])
            self.objective.load_extra_state(state["objective"])
            self.epoch, self.step, self.best_ap = state["epoch"], state["step"], state["best_ap"]
            self.time_s = float(state.get("time_s", 0.0))  # absent in checkpoints written before it was kept
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # another layout, or a changed config
            raise UserError(f"{last / STATE_FILE}: does not fit this run ({type(e).__name__}: {e})") from None
        if dist.is_main_process():
            _keep_records(self.paths.metrics, self.epoch)

    def save(self, path: Path, with_state: bool) -> None:
        if dist.is_main_process():
            save_checkpoint(path, self.student, self.cfg, self.dataset_info,
                            self.trainer_state() if with_state else None)

    # ---- loop --------------------------------------------------------------------------------------
    def _log(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def train_step(self, images: ImageBatch, targets: list[dict[str, Tensor]]) -> Optional[tuple[LossDict, DetectorOutput]]:
        tc = self.cfg.train
        images = images.to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast(self.device, tc.amp):
            outputs, losses = self.forward(images, targets)
        total = sum(losses.values())
        if self.check_every > 1:
            self.watch.update(losses, total, self.step)
            if (self.step + 1) % self.check_every == 0:
                self.raise_if_nonfinite()
        elif not dist.all_ranks(torch.isfinite(total), self.device):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            where = ", ".join(bad) or ("total" if not torch.isfinite(total) else "on another process")
            msg = f"non-finite loss at step {self.step} (epoch {self.epoch}): {where}"
            if tc.on_nonfinite == "skip":
                if dist.is_main_process():
                    tqdm.write(f"warning: {msg}; batch skipped")
                self.update.zero_grad()
                return None
            raise NonFiniteLossError(msg + f"; the last good checkpoint is in {self.paths.last}")
        self.update.step(losses, total)
        losses["loss"] = total.detach()
        return losses, outputs

    def raise_if_nonfinite(self) -> None:
        """Stop if a step since the last check had a non-finite loss (`check_every` > 1; else checked in the step)."""
        found = self.watch.first(self.device)
        if found is not None:
            step, terms = found
            where = f"at step {step} (epoch {self.epoch}): {', '.join(terms)}" if terms else "on another process"
            raise NonFiniteLossError(f"non-finite loss {where}; the last good checkpoint is in {self.paths.last}")

    def evaluate(self) -> dict[str, float]:
        if self.val_set is None:
            return {}
        sampler = DistributedSampler(self.val_set, shuffle=False) if dist.world_size() > 1 else None
        loader = make_loader(self.val_set, self.cfg.train.batch_size, False, self.cfg.data.num_workers, sampler,
                             self.device)
        metrics, _ = evaluate(self.student, loader, self.val_set, self.device, top_k=num_select(self.cfg.model),
                              progress=self.progress)
        return metrics

    def fit(self, resume: bool = False) -> dict[str, Any]:
        fresh = not resume and not self.paths.root.exists()
        try:
            return self._fit(resume)
        except BaseException:
            if self.writer is not None:
                self.writer.close()
            if fresh and dist.is_main_process() and not self.paths.last.exists():
                shutil.rmtree(self.paths.root, ignore_errors=True)  # failed before its first checkpoint: leave nothing
            raise

    def _fit(self, resume: bool) -> dict[str, Any]:
        tc = self.cfg.train
        if resume:
            self.resume()
        elif dist.is_main_process():
            self.paths.root.mkdir(parents=True, exist_ok=True)
            self.paths.metrics.write_text("")
        if dist.is_main_process():
            save_config(self.cfg, self.paths.root / "config.yaml")
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.paths.root / "tb"), purge_step=self.step or None)
        start, last_metrics, time_before = time.time(), {}, self.time_s
        stop = False
        while self.epoch < tc.epochs and not stop:
            epoch_start = time.time()
            sums, count, stop = self._train_epoch(start)
            if self.check_every > 1:
                self.raise_if_nonfinite()  # before this epoch's checkpoint is written
            self.epoch += 1
            self.time_s = time_before + time.time() - start
            record = {"epoch": self.epoch, "step": self.step, "time_s": round(self.time_s, 2),
                      "s_per_step": round((time.time() - epoch_start) / max(1, count), 4),
                      "lr": self.update.lr}
            record |= {f"train/{k}": v for k, v in _epoch_means(sums, count).items()}
            if (tc.eval_every and self.epoch % tc.eval_every == 0) or self.epoch >= tc.epochs or stop:
                last_metrics = self.evaluate()
                record |= last_metrics
                self._log({f"val/{k}": v for k, v in last_metrics.items()}, self.step)
            self._finish_epoch(record, last_metrics)
        if self.writer is not None:
            self.writer.close()
        return last_metrics

    def _train_epoch(self, start: float) -> tuple[dict[str, Tensor], int, bool]:
        """One pass over the loader: (summed losses, steps taken, whether `max_steps`/`max_minutes` stopped it)."""
        tc = self.cfg.train
        self.sampler.set_epoch(self.epoch)
        seed_everything(tc.seed * 1000 + self.epoch * 7919 + dist.rank())
        self.objective.train()
        sums: dict[str, Tensor] = {}
        count = 0
        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{tc.epochs}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        for images, targets in bar:
            try:
                result = self.train_step(images, targets)
            except Exception:
                if self.check_every > 1:  # weights made NaN by an unchecked step fail elsewhere (the matcher)
                    self.raise_if_nonfinite()
                raise
            self.step += 1
            if result is not None:
                losses, outputs = result
                for k, v in losses.items():  # kept on the device: no host sync in the step
                    sums[k] = sums.get(k, 0.0) + v.detach()
                count += 1
                if self.writer is not None and (self.step % tc.log_every == 0 or count == 1):
                    values = {k: float(v.detach()) for k, v in losses.items()}
                    diag = collapse_stats(outputs)
                    self._log({f"train/{k}": v for k, v in values.items()} | diag
                              | {"lr": self.update.lr}, self.step)
                    bar.set_postfix(_postfix(values, diag))
            # the clocks of several processes disagree: stop when any of them runs out of time
            if (tc.max_steps and self.step >= tc.max_steps) or \
                    (tc.max_minutes and dist.any_rank(time.time() - start > tc.max_minutes * 60, self.device)):
                return sums, count, True
        return sums, count, False

    def _finish_epoch(self, record: dict[str, Any], metrics: dict[str, float]) -> None:
        improved = bool(metrics) and metrics.get("AP", -1.0) > self.best_ap  # metrics agree on every process
        if improved:
            self.best_ap = metrics["AP"]
        if dist.is_main_process():
            # `last` is written last: a run killed before it redoes this epoch, and `resume` drops its record
            if improved:
                self.save(self.paths.best, with_state=False)
            with self.paths.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.save(self.paths.last, with_state=True)
            summary = " ".join(f"{k}={v:.3f}" for k, v in record.items() if k in ("train/loss", "AP", "AP50"))
            tqdm.write(f"epoch {record['epoch']}: {summary} ({record['s_per_step']:.3f} s/step)")
        dist.barrier()  # the checkpoint is complete before any process goes on (or exits)


def _keep_records(metrics: Path, epochs: int) -> None:
    """Keep the records of the first `epochs` epochs: later ones (and a line cut by a kill) belong to a redone epoch."""
    kept = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            if json.loads(line)["epoch"] <= epochs:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    partial = metrics.with_name(metrics.name + ".tmp")
    partial.write_text("".join(kept))
    os.replace(partial, metrics)  # a kill now loses no record


def _epoch_means(sums: dict[str, Tensor], count: int) -> dict[str, float]:
    """Per-step means of the summed losses, averaged over processes (every process has the same keys)."""
    if not sums:
        return {}
    keys = sorted(sums)
    means = dist.all_reduce_mean(torch.stack([sums[k].float() for k in keys])) / max(1, count)
    return dict(zip(keys, means.tolist()))


def _postfix(values: dict[str, float], diag: dict[str, float]) -> dict[str, str]:
    det = sum(v for k, v in values.items() if k.startswith(("loss_", "dn_")))
    kd = sum(v for k, v in values.items() if "kd_" in k)
    out = {"loss": f"{values['loss']:.3f}", "det": f"{det:.3f}"}
    if kd:
        out["kd"] = f"{kd:.3f}"
    if "spread/encoder" in diag:
        out["enc_spread"] = f"{diag['spread/encoder']:.3f}"
    out["box_spread"] = f"{diag['spread/boxes']:.3f}"
    return out



"""How one step's weighted losses become a parameter update: one AdamW step on their sum (the paper), or the
detection and the distillation gradients each clipped and Adam-normalised on its own (`train.kd_update`)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from kddetr.config import TrainConfig
from kddetr.engine import distributed as dist
from kddetr.engine.objective import LossDict, is_distillation_loss
from kddetr.engine.optim import build_optimizer, lr_factor


class Update:
    """The optimiser(s), schedule(s) and loss scaling of a run.

    `joint`: the summed losses' gradient is clipped to `clip_max_norm` and taken by one AdamW. `separate`: the
    detection losses' gradient goes through that AdamW and its own clip, the distillation losses' through a second
    AdamW (same groups and learning rates, no weight decay) and a clip of its own, and both updates are applied.
    The detection optimiser then sees the gradient the student alone would have (the distiller keeps the
    detection queries apart from the points), whatever the size of the KD gradient beside it. A step without
    distillation losses (faded out) leaves the second optimiser untouched.
    """

    def __init__(self, student: nn.Module, cfg: TrainConfig, steps_per_epoch: int,
                 scaler: torch.amp.GradScaler) -> None:
        self.student, self.cfg, self.scaler = student, cfg, scaler
        self.optimizer = build_optimizer(student, cfg)
        self.kd_optimizer = build_optimizer(student, cfg, weight_decay=0.0) if cfg.kd_update == "separate" else None
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, cfg))
                           for opt in self.optimizers]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.kd_optimizer] if self.kd_optimizer is not None else [])

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, losses: LossDict, total: Tensor) -> None:
        """Back-propagate this step's losses (their sum is `total`) and update the student."""
        self.zero_grad()
        if self.kd_optimizer is None:
            self.scaler.scale(total).backward()
            self._clip_and_step(self.optimizer)
        else:
            self._separate_step(losses)
        self.scaler.update()
        for scheduler in self.schedulers:
            scheduler.step()

    def _separate_step(self, losses: LossDict) -> None:
        assert self.kd_optimizer is not None
        params = [p for p in self.student.parameters() if p.requires_grad]
        kd = [v for k, v in losses.items() if is_distillation_loss(k)]
        kd_grads: Optional[tuple[Optional[Tensor], ...]] = None
        if kd:  # autograd.grad leaves DDP's hooks alone: the detection backward below is the one it averages
            kd_grads = torch.autograd.grad(self.scaler.scale(sum(kd)), params, retain_graph=True, allow_unused=True)
        self.scaler.scale(sum(v for k, v in losses.items() if not is_distillation_loss(k))).backward()
        self._clip_and_step(self.optimizer)
        if kd_grads is None:
            return
        for p, grad in zip(params, kd_grads):  # a part the KD does not reach (grad None) is left out of its step
            p.grad = dist.all_reduce_mean(grad) if grad is not None else None
        self._clip_and_step(self.kd_optimizer)

    def _clip_and_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.clip_max_norm > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.clip_max_norm)
        self.scaler.step(optimizer)

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.schedulers[0].state_dict(),
                 "scaler": self.scaler.state_dict()}
        if self.kd_optimizer is not None:
            state |= {"kd_optimizer": self.kd_optimizer.state_dict(), "kd_scheduler": self.schedulers[1].state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises KeyError for a checkpoint written with the other `kd_update`."""
        if (self.kd_optimizer is None) != ("kd_optimizer" not in state):
            raise KeyError("kd_optimizer: the checkpoint was written with the other train.kd_update")
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedulers[0].load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.kd_optimizer is not None:
            self.kd_optimizer.load_state_dict(state["kd_optimizer"])
            self.schedulers[1].load_state_dict(state["kd_scheduler"])

"""Non-finite losses: the error that stops a run, and the on-device record of the first bad step."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kddetr.engine import distributed as dist

LossDict = dict[str, Tensor]


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteWatch:
    """The first step whose loss was non-finite and its terms, recorded on the device: no host sync per step."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.step: Optional[Tensor] = None  # -1 while every loss was finite
        self.bad: Optional[Tensor] = None  # which of `keys` were non-finite at `step`

    def update(self, losses: LossDict, total: Tensor, step: int) -> None:
        keys = [*losses, "total"]
        finite = torch.stack([torch.isfinite(v).all() for v in [*losses.values(), total]])
        if self.step is None or keys != self.keys:  # the loss terms of a run do not change; be safe if they do
            self.keys, self.step, self.bad = keys, torch.full((), -1, device=total.device), torch.zeros_like(finite)
        first = ~finite.all() & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.bad = torch.where(first, ~finite, self.bad)

    def first(self, device: torch.device) -> Optional[tuple[int, list[str]]]:
        """(step, non-finite terms) of the first bad step on any process (terms empty: another process), or None."""
        if self.step is None or not dist.any_rank(self.step >= 0, device):
            return None
        step = int(self.step)
        return step, [k for k, b in zip(self.keys, self.bad.tolist()) if b]

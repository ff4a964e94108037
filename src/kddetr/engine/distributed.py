"""torch.distributed helpers: torchrun initialisation, DDP wrapping, ranks, reductions (no-ops in one process)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device: str) -> torch.device:
    """Join the process group that torchrun describes in the environment; returns this process's device.

    NCCL with one GPU per process (`cuda:LOCAL_RANK`) for `device="cuda"`, gloo on CPU.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(torch_device)
    if not is_initialized():
        if device == "cuda":
            tdist.init_process_group(backend="nccl", device_id=torch_device)
        else:
            tdist.init_process_group(backend="gloo")
    return torch_device


@contextlib.contextmanager
def process_group(device: str) -> Iterator[torch.device]:
    """`init_from_env` for the duration of a command; a process group opened here is destroyed on exit."""
    opened = not is_initialized()
    torch_device = init_from_env(device)
    try:
        yield torch_device
    finally:
        if opened and is_initialized():
            tdist.destroy_process_group()


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in DistributedDataParallel when several processes train (gradients are averaged), else itself."""
    if world_size() <= 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if not is_initialized():
        return value
    value = value.clone()
    tdist.all_reduce(value)
    return value / world_size()


def all_ranks(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True iff `flag` holds on every process: lets all processes take the same branch."""
    return _reduce_flag(flag, device, tdist.ReduceOp.MIN)


def any_rank(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True iff `flag` holds on some process."""
    return _reduce_flag(flag, device, tdist.ReduceOp.MAX)


def _reduce_flag(flag: bool | torch.Tensor, device: torch.device, op: tdist.ReduceOp) -> bool:
    if not is_initialized():
        return bool(flag)
    value = torch.tensor(int(bool(flag)), device=device)
    tdist.all_reduce(value, op=op)
    return bool(value)


def all_gather_objects(obj: object) -> list[object]:
    if not is_initialized():
        return [obj]
    out: list[object] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out

"""torch.distributed helpers: torchrun initialisation, rank queries, reductions (no-ops in one process)."""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device: str) -> torch.device:
    """Join the process group that torchrun describes in the environment; returns this process's device."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not is_initialized():
        tdist.init_process_group(backend=backend)
    return torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device("cpu")


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if not is_initialized():
        return value
    value = value.clone()
    tdist.all_reduce(value)
    return value / world_size()


def all_gather_objects(obj: object) -> list[object]:
    if not is_initialized():
        return [obj]
    out: list[object] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out

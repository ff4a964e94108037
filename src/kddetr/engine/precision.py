"""Mixed precision, chosen in one place for every model of a step (the teacher runs under the same autocast)."""
from __future__ import annotations

import torch


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device has it (CPUs, Ampere and later GPUs), else float16 (with gradient scaling)."""
    return torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Loss scaling, on only where autocast runs in float16."""
    return torch.amp.GradScaler(device.type, enabled=enabled and amp_dtype(device) == torch.float16)

"""Decoding query groups isolated from each other over one encoder memory: separate or batch-stacked passes."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from kddetr.models.protocol import DecoderOutput

ISOLATION_MODES = ("separate", "batch")
MAX_PADDING = 0.25  # batch mode: a group is padded into a larger one's pass if at most this fraction is padding

GroupInputs = tuple[Tensor, ...]  # a detector's decoder inputs for one group, each `[B, K, ...]`
Decode = Callable[..., DecoderOutput]  # decode(*inputs, memory, self_attn_mask) -> DecoderOutput


def split_groups(out: DecoderOutput, sizes: Sequence[int]) -> list[DecoderOutput]:
    """One output per group of `sizes` consecutive queries."""
    return [DecoderOutput(logits, boxes) for logits, boxes in zip(out.logits.split(sizes, dim=2),
                                                                  out.boxes.split(sizes, dim=2))]


def repeat_batch(memory: Any, times: int) -> Any:
    """The encoder memory (a dataclass) with every batch-first tensor repeated `times` times along the batch."""
    batch = memory.memory.shape[0]
    changes = {f.name: value.repeat(times, *[1] * (value.dim() - 1)) for f in dataclasses.fields(memory)
               if isinstance(value := getattr(memory, f.name), Tensor) and value.dim() > 0 and value.shape[0] == batch}
    return dataclasses.replace(memory, **changes)


def size_buckets(sizes: Sequence[int], max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Group indices per batch-stacked pass: largest first, smaller groups join while padding stays small."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if buckets and sizes[i] >= (1 - max_padding) * sizes[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _pad(inputs: GroupInputs, size: int) -> GroupInputs:
    """Pad every input to `size` queries by repeating the last one (valid values; the mask hides them)."""
    extra = size - inputs[0].shape[1]
    return tuple(torch.cat((t, t[:, -1:].expand(-1, extra, *t.shape[2:])), 1) if extra else t for t in inputs)


def _padding_mask(sizes: Sequence[int], batch: int, device: torch.device) -> Optional[Tensor]:
    """`[G * B, K, K]` True where the key is padding (None when no group is padded)."""
    size = max(sizes)
    if all(n == size for n in sizes):
        return None
    keys = torch.arange(size, device=device)
    blocked = torch.stack([keys >= n for n in sizes])  # [G, K]
    return blocked.repeat_interleave(batch, 0)[:, None, :].expand(-1, size, -1)


def _batch_stacked(inputs: Sequence[GroupInputs], memory: Any, decode: Decode) -> list[DecoderOutput]:
    """Groups stacked along the batch (group-major), padded to the largest, over the memory repeated per group."""
    sizes = [parts[0].shape[1] for parts in inputs]
    batch = inputs[0][0].shape[0]
    stacked = [torch.cat(parts, 0) for parts in zip(*(_pad(parts, max(sizes)) for parts in inputs))]
    mask = _padding_mask(sizes, batch, stacked[0].device)
    out = decode(*stacked, repeat_batch(memory, len(inputs)), mask)
    return [DecoderOutput(logits[:, :, :n], boxes[:, :, :n]) for logits, boxes, n in
            zip(out.logits.chunk(len(inputs), 1), out.boxes.chunk(len(inputs), 1), sizes)]


def decode_groups(inputs: Sequence[GroupInputs], memory: Any, decode: Decode, mode: str) -> list[DecoderOutput]:
    """Decode every group of `inputs` so that no group sees another in self-attention.

    `separate`: one decoder pass per group. `batch`: groups stacked along the batch axis over the repeated
    memory, one pass per bucket of similar sizes (smaller groups padded, padding masked out). Both give the
    same outputs.
    """
    if mode not in ISOLATION_MODES:
        raise ValueError(f"unknown group isolation {mode!r}; expected one of {', '.join(ISOLATION_MODES)}")
    if mode == "separate" or len(inputs) == 1:
        return [decode(*parts, memory, None) for parts in inputs]
    outputs: list[Optional[DecoderOutput]] = [None] * len(inputs)
    for bucket in size_buckets([parts[0].shape[1] for parts in inputs]):
        if len(bucket) == 1:
            outputs[bucket[0]] = decode(*inputs[bucket[0]], memory, None)
        else:
            for i, out in zip(bucket, _batch_stacked([inputs[i] for i in bucket], memory, decode)):
                outputs[i] = out
    return outputs  # type: ignore[return-value]

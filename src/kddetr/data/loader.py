"""Data loaders for training and evaluation: the datasets of a run and their batching."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler

from kddetr.config import Config
from kddetr.data.coco import CocoDetection, build_dataset
from kddetr.data.collate import collate
from kddetr.errors import UserError


def make_loader(dataset: CocoDetection, batch_size: int, train: bool, num_workers: int,
                sampler: Optional[DistributedSampler] = None, device: Optional[torch.device] = None) -> DataLoader:
    """Batches in `num_workers` processes (kept alive between epochs), pinned when they go to a GPU."""
    pin = torch.cuda.is_available() if device is None else device.type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, drop_last=train, pin_memory=pin, persistent_workers=num_workers > 0)


def load_datasets(cfg: Config, data_dir: Path) -> tuple[CocoDetection, Optional[CocoDetection]]:
    train_set = build_dataset(data_dir, cfg.data.train_split, cfg.data, train=True)
    ann = Path(data_dir) / "annotations" / f"instances_{cfg.data.val_split}.json"
    val_set = build_dataset(data_dir, cfg.data.val_split, cfg.data, train=False) if ann.exists() else None
    if val_set is not None and val_set.category_ids != train_set.category_ids:
        raise UserError(f"{ann}: categories differ from the training split's")
    return train_set, val_set

"""Backbone pretraining without downloads: the detector's ResNet trained as a crop classifier on its own boxes."""
from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.ops import roi_align
from tqdm import tqdm

from kddetr.data.coco import CocoDetection
from kddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from kddetr.errors import UserError
from kddetr.models.backbone import RESNETS, Backbone

OBJECT_FILL = (0.5, 0.85)  # the object's longer side as a fraction of its crop's side
CENTRE_JITTER = 0.15  # crop centre offset from the box centre, as a fraction of the crop's side
BACKGROUND_RATIO = 0.25  # background windows per object crop (20% of the bank)
MAX_OVERLAP = 0.2  # a background window may hold at most this fraction of any box, and of itself
MAX_VIEWS = 4  # jittered crops per box at most, when the bank has room for them
VAL_FRACTION = 0.05  # crops held out for validation (images of the train split when no val split exists)
AUG_SCALE = (0.8, 1.0)  # random sub-window side, as a fraction of the stored crop
AUG_COLOUR = 0.2  # brightness and contrast factors drawn from 1 ± this
WARMUP_STEPS = 50


def _crops_of(image: Image.Image, boxes: np.ndarray, classes: np.ndarray, background: int, views: int,
              crop_size: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    """`views` jittered crops per box, then background windows in proportion to them; crops and their labels."""
    width, height = image.size
    limit = min(width, height)
    windows = []
    for x1, y1, x2, y2 in np.repeat(boxes, views, axis=0):
        side = min(max(x2 - x1, y2 - y1, 1.0) / rng.uniform(*OBJECT_FILL), limit)
        cx, cy = np.array([x1 + x2, y1 + y2]) / 2 + rng.uniform(-1, 1, 2) * CENTRE_JITTER * side
        windows.append((cx - side / 2, cy - side / 2, side))
    num_objects = len(windows)
    wanted = rng.binomial(max(num_objects, views), BACKGROUND_RATIO) if len(boxes) else views
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for _ in range(wanted * 10):
        if len(windows) == num_objects + wanted:
            break
        side = math.exp(rng.uniform(math.log(min(max(8.0, limit / 8), limit)), math.log(limit)))
        x, y = rng.uniform(0, width - side), rng.uniform(0, height - side)
        inter_w = np.clip(np.minimum(boxes[:, 2], x + side) - np.maximum(boxes[:, 0], x), 0, None)
        inter_h = np.clip(np.minimum(boxes[:, 3], y + side) - np.maximum(boxes[:, 1], y), 0, None)
        if np.all(inter_w * inter_h <= MAX_OVERLAP * np.minimum(areas, side * side)):
            windows.append((x, y, side))
    crops = []
    for x, y, side in windows:
        x, y = min(max(x, 0.0), width - side), min(max(y, 0.0), height - side)  # keep the window inside the image
        crop = image.resize((crop_size, crop_size), Image.BILINEAR, box=(x, y, x + side, y + side))
        crops.append(np.asarray(crop))
    return crops, np.repeat(classes, views).tolist() + [background] * (len(windows) - num_objects)


def extract_crops(dataset: CocoDetection, indices: Sequence[int], views: int, max_crops: int, crop_size: int,
                  rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """A crop bank from the images `indices`, in order, until `max_crops`: uint8 `[N, S, S, 3]` and labels `[N]`.

    Labels are the boxes' contiguous classes; background windows get `dataset.num_classes`.
    """
    bank = np.empty((max_crops, crop_size, crop_size, 3), np.uint8)  # pages are only touched as they fill
    labels = np.empty(max_crops, np.int64)
    count = 0
    for index in indices:
        image, target = dataset[index]
        boxes = target["boxes"].numpy().astype(np.float64)
        crops, classes = _crops_of(image, boxes, target["labels"].numpy(), dataset.num_classes, views, crop_size, rng)
        crops, classes = crops[: max_crops - count], classes[: max_crops - count]
        if crops:
            bank[count : count + len(crops)] = np.stack(crops)
            labels[count : count + len(crops)] = classes
            count += len(crops)
        if count == max_crops:
            break
    return torch.from_numpy(bank[:count]), torch.from_numpy(labels[:count])


def _num_boxes(dataset: CocoDetection) -> int:
    return sum(not ann.get("iscrowd", 0) for ann in dataset.coco_gt["annotations"])


def _to_input(crops: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """uint8 `[B, S, S, 3]` -> float `[B, 3, S, S]` normalised with ImageNet statistics, augmented if `generator`."""
    images = crops.permute(0, 3, 1, 2).float() / 255
    if generator is not None:
        images = _augment(images, generator)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)  # ~20% faster convolutions on CPU


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """A random sub-window of each crop, resized back to its size, with brightness and contrast jitter."""
    n, _, size, _ = images.shape
    rand = torch.rand(n, 5, generator=generator)
    side = size * (AUG_SCALE[0] + (AUG_SCALE[1] - AUG_SCALE[0]) * rand[:, 0])
    x, y = rand[:, 1] * (size - side), rand[:, 2] * (size - side)
    rois = torch.stack([torch.arange(n, dtype=torch.float32), x, y, x + side, y + side], 1)
    images = roi_align(images, rois, size, sampling_ratio=2, aligned=True)
    contrast = (1 + AUG_COLOUR * (2 * rand[:, 3] - 1)).view(n, 1, 1, 1)
    brightness = (1 + AUG_COLOUR * (2 * rand[:, 4] - 1)).view(n, 1, 1, 1)
    mean = images.mean((1, 2, 3), keepdim=True)
    return (((images - mean) * contrast + mean) * brightness).clamp(0, 1)


@torch.no_grad()
def _accuracy(model: nn.Module, crops: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    if len(crops) == 0:
        return float("nan")
    model.eval()
    correct = sum(int((model(_to_input(crops[i : i + batch_size])).argmax(1) == labels[i : i + batch_size]).sum())
                  for i in range(0, len(crops), batch_size))
    model.train()
    return correct / len(crops)


def _lr_factor(step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay over the run's progress in [0, 1]."""
    return min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _save(trunk: nn.Module, out_file: Path, metadata: dict[str, str]) -> None:
    """Write the trunk's state dict as safetensors through a temporary file, so a reader never sees half a file."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in trunk.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _train(model: nn.Module, crops: Tensor, labels: Tensor, batch_size: int, lr: float, minutes: float,
           max_steps: int, generator: torch.Generator, bar: tqdm) -> tuple[list[float], float]:
    """AdamW on random augmented batches of the bank until a limit; the losses per step and the seconds taken."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    losses: list[float] = []
    hits: list[float] = []
    start = time.perf_counter()
    elapsed = 0.0
    model.train()
    while (not max_steps or len(losses) < max_steps) and (minutes <= 0 or elapsed < minutes * 60):
        step = len(losses)
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, step / max_steps if max_steps else elapsed / (minutes * 60))
        idx = torch.randint(len(crops), (batch_size,), generator=generator)
        logits = model(_to_input(crops[idx], generator))
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        hits.append((logits.argmax(1) == labels[idx]).float().mean().item())
        elapsed = time.perf_counter() - start
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", acc=f"{np.mean(hits[-20:]):.2f}")
    return losses, elapsed


def _banks(data_dir: Path, split: str, max_crops: int, crop_size: int,
           rng: np.random.Generator) -> tuple[CocoDetection, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Training and validation crop banks; validation comes from the val split, else from held-out train images."""
    dataset = CocoDetection(data_dir, split)
    num_boxes = _num_boxes(dataset)
    if num_boxes == 0:
        raise UserError(f"{dataset.ann_file}: no boxes to pretrain the backbone on")
    order = rng.permutation(len(dataset))
    val_max = max(1, round(VAL_FRACTION * max_crops))
    val_file = Path(data_dir) / "annotations" / "instances_val.json"
    val_set = CocoDetection(data_dir, "val") if split != "val" and val_file.is_file() else None
    if val_set is not None and _num_boxes(val_set) > 0:
        val_bank = extract_crops(val_set, rng.permutation(len(val_set)), 1, val_max, crop_size, rng)
    else:
        held_out = max(1, round(VAL_FRACTION * len(dataset))) if len(dataset) > 1 else 0
        val_bank = extract_crops(dataset, order[:held_out], 1, val_max, crop_size, rng)
        order = order[held_out:]
    views = int(np.clip(round(max_crops / (1 + BACKGROUND_RATIO) / num_boxes), 1, MAX_VIEWS))
    train_bank = extract_crops(dataset, order, views, max_crops, crop_size, rng)
    if not (train_bank[1] < dataset.num_classes).any():
        raise UserError(f"{dataset.ann_file}: no boxes in the training images to pretrain the backbone on")
    return dataset, train_bank, val_bank


def pretrain_backbone(data_dir: Path, arch: str, out_file: Path, num_stages: int = 4, minutes: float = 3.5,
                      max_steps: int = 0, crop_size: int = 64, batch_size: int = 64, lr: float = 1e-3,
                      seed: int = 0, split: str = "train", progress: bool = True, max_crops: int = 20_000) -> dict:
    """Train stages 1..`num_stages` of `arch` + global pooling + a linear (classes + background) head on crops
    of the boxes of `data_dir` (COCO layout), and save the trunk's weights with torchvision key names to
    `out_file` (safetensors) for `model.backbone.weights`.

    Stops after `minutes` of training (<= 0: no limit) or `max_steps` (0: no limit). The learning rate decays
    over `max_steps` when it is set (then a run is reproducible unless the time limit comes first), else over
    `minutes`. Returns `steps`, `minutes` (training only), `first_loss` and `train_loss` (means over the first
    and last steps), `train_acc` (on up to 1000 training crops, unaugmented), `val_acc`, `crops`, `val_crops`.
    """
    if arch not in RESNETS:
        raise UserError(f"arch: unknown backbone {arch!r}; expected one of {', '.join(RESNETS)}")
    if not 1 <= num_stages <= 4:
        raise UserError(f"num_stages: must be 1..4, got {num_stages}")
    if minutes <= 0 and max_steps <= 0:
        raise UserError("minutes / max_steps: give a time limit or a step limit")
    if crop_size < 16 or batch_size < 2 or max_crops < 20:
        raise UserError(f"crop_size / batch_size / max_crops: too small ({crop_size}, {batch_size}, {max_crops})")
    out_file = Path(out_file)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    dataset, (crops, labels), (val_crops, val_labels) = _banks(Path(data_dir), split, max_crops, crop_size, rng)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = Backbone(arch, num_stages, frozen_bn=False)
        trunk = backbone.body
        head = nn.Linear(backbone.num_channels, dataset.num_classes + 1)
    model = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).to(memory_format=torch.channels_last)
    with tqdm(total=max_steps or None, desc=f"pretrain {arch}", disable=not progress) as bar:
        losses, elapsed = _train(model, crops, labels, batch_size, lr, minutes, max_steps, generator, bar)

    window = max(1, min(20, len(losses) // 10))
    summary = {
        "steps": len(losses),
        "minutes": elapsed / 60,
        "first_loss": float(np.mean(losses[:window])),
        "train_loss": float(np.mean(losses[-window:])),
        "train_acc": _accuracy(model, crops[:1000], labels[:1000]),
        "val_acc": _accuracy(model, val_crops, val_labels),
        "crops": len(crops),
        "val_crops": len(val_crops),
    }
    metadata = {"arch": arch, "num_stages": str(num_stages), "steps": str(summary["steps"]),
                "val_acc": f"{summary['val_acc']:.4f}", "crop_size": str(crop_size),
                "num_classes": str(dataset.num_classes)}
    _save(trunk, out_file, metadata)
    return summary

"""`kddetr predict`: detections on image files, drawn as PNGs and listed in `detections.json`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from kddetr.data.collate import collate
from kddetr.data.transforms import build_transforms
from kddetr.engine.checkpoint import load_checkpoint
from kddetr.engine.evaluate import postprocess, to_coco_results
from kddetr.errors import UserError
from kddetr.viz import draw_detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def iter_images(inputs: Sequence[Path]) -> Iterator[Path]:
    """Image files named directly or found (sorted, not recursively) in the given directories, lazily."""
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            yield from (p for p in sorted(item.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            yield item
        else:
            raise UserError(f"{item}: no such image or directory")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: cannot read image: {e}") from None


@torch.inference_mode()
def predict(checkpoint: Path, inputs: Sequence[Path], out_dir: Path, score_threshold: float = 0.3,
            top_k: int = 100, device: str = "cpu") -> int:
    ckpt = load_checkpoint(checkpoint, device)
    transform = build_transforms(ckpt.config.data, train=False)
    names = ckpt.dataset.category_names
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count, rows = 0, 0
    with (out_dir / "detections.json").open("w") as f:
        f.write("[")
        for index, path in enumerate(iter_images(inputs)):
            image = _open(path)
            h, w = image.height, image.width
            target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                      "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(index),
                      "orig_size": torch.tensor([h, w])}
            batch, _ = collate([transform(image, target)])
            out = ckpt.model(batch.to(device))
            pred = postprocess(out.pred_logits, out.pred_boxes, torch.tensor([[h, w]], device=out.pred_boxes.device),
                               top_k=top_k)[0]
            keep = pred["scores"] >= score_threshold
            pred = {k: v[keep].cpu() for k, v in pred.items()}
            drawn = draw_detections(pil_to_tensor(image), pred["boxes"], pred["labels"].tolist(),
                                    pred["scores"].tolist(), names)
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out_dir / f"{path.stem}.png")
            for row in to_coco_results([pred], [index], ckpt.dataset.category_ids):
                f.write(("," if rows else "") + "\n" + json.dumps(row | {"file_name": path.name}))
                rows += 1
            count += 1
        f.write("]\n")
    return count

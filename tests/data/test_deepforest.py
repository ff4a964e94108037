"""deepforest converter: tiling and box cutting on a fake wheel, pinned download, the real wheel end to end."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from kddetr.data import deepforest
from kddetr.errors import UserError


def voc(file_name: str, boxes: list[list[int]]) -> str:
    objects = "".join(
        f"<object><name>Tree</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>"
        for a, b, c, d in boxes
    )
    return f"<annotation><filename>{file_name}</filename>{objects}</annotation>"


@pytest.fixture
def fake_wheel(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A zip laid out like the deepforest wheel: two annotated photos, one unannotated, a CSV to ignore."""
    rng = np.random.default_rng(0)
    photos = {"plot 1.png": rng.integers(0, 256, (200, 300, 3), np.uint8)}  # a space in the name, as in the wheel
    photos["b.png"] = rng.integers(0, 256, (90, 100, 3), np.uint8)
    path = tmp_path / deepforest.WHEEL
    with zipfile.ZipFile(path, "w") as archive:
        for name, pixels in photos.items():
            with archive.open(deepforest.DATA_DIR + name, "w") as f:
                Image.fromarray(pixels).save(f, format="PNG")
        archive.writestr(deepforest.DATA_DIR + "unannotated.png", b"not read")
        archive.writestr(deepforest.DATA_DIR + "example.csv", "image_path,xmin,ymin,xmax,ymax,label\n")
        # inside tile (0, 0); across x = 100: 25 % left of it, 75 % right; inside tile (1, 1)
        boxes = [[10, 10, 40, 50], [90, 20, 130, 40], [150, 150, 170, 190]]
        archive.writestr(deepforest.DATA_DIR + "plot 1.xml", voc("plot 1.png", boxes))
        archive.writestr(deepforest.DATA_DIR + "b.xml", voc("b.png", [[5, 6, 25, 36]]))
        archive.writestr("deepforest/__init__.py", "")
    return path, photos


def test_tiles_photos_and_cuts_boxes_at_tile_edges(fake_wheel, tmp_path):
    wheel, photos = fake_wheel
    summary = deepforest.convert_wheel(wheel, tmp_path / "out", tile_size=128, val_fraction=0.15,
                                       test_fraction=0.25, seed=1)
    counts = {split: summary[split]["images"] for split in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 1, "test": 2}  # 3 x 2 tiles of 100 px + 1
    boxes, names = {}, set()
    for split in ("train", "val", "test"):
        coco = COCO(str(tmp_path / "out" / "annotations" / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["tree"]
        for image in coco.loadImgs(coco.getImgIds()):
            names.add(image["file_name"])
            tile = np.asarray(Image.open(tmp_path / "out" / "images" / split / image["file_name"]))
            assert tile.shape == (image["height"], image["width"], 3)
            stem, row, col = image["file_name"].removesuffix(".png").rsplit("_", 2)
            y, x = int(row) * image["height"], int(col) * image["width"]
            source = photos["plot 1.png" if stem == "plot_1" else f"{stem}.png"]
            assert np.array_equal(tile, source[y : y + tile.shape[0], x : x + tile.shape[1]])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            boxes[image["file_name"]] = sorted(a["bbox"] for a in anns)
    assert names == {f"plot_1_{r}_{c}.png" for r in range(2) for c in range(3)} | {"b_0_0.png"}
    assert boxes["plot_1_0_0.png"] == [[10, 10, 30, 40]]
    assert boxes["plot_1_0_1.png"] == [[0, 20, 30, 20]]
    assert boxes["plot_1_1_1.png"] == [[50, 50, 20, 40]]
    assert boxes["b_0_0.png"] == [[5, 6, 20, 30]]
    assert sum(map(len, boxes.values())) == 4


def test_same_seed_same_files_and_the_split_follows_the_seed(fake_wheel, tmp_path):
    wheel, _ = fake_wheel
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        deepforest.convert_wheel(wheel, tmp_path / name, tile_size=64, seed=seed)
    a, b, c = ({str(p.relative_to(tmp_path / n)): p.read_bytes() for p in (tmp_path / n).rglob("*.*")} for n in "abc")
    assert a == b
    assert {Path(k).name for k in a} == {Path(k).name for k in c}
    assert {k for k in a if "/val/" in k} != {k for k in c if "/val/" in k}


def test_splits_are_disjoint_and_sized_by_their_fractions():
    splits = deepforest.assign_splits(56, 0.15, 0.2, seed=0)
    assert (splits.count("test"), splits.count("val"), splits.count("train")) == (11, 8, 37)
    assert deepforest.assign_splits(56, 0.15, 0.2, seed=0) == splits != deepforest.assign_splits(56, 0.15, 0.2, 1)
    assert "test" not in deepforest.assign_splits(10, 0.2, 0.0, seed=0)


def test_bad_inputs_raise_user_errors(fake_wheel, tmp_path):
    wheel, _ = fake_wheel
    with pytest.raises(UserError, match="val_fraction"):
        deepforest.convert_wheel(wheel, tmp_path / "a", val_fraction=1.0)
    with pytest.raises(UserError, match="none for training"):  # 7 tiles: 4 to test, 3 to val
        deepforest.convert_wheel(wheel, tmp_path / "a", tile_size=128, val_fraction=0.4, test_fraction=0.5)
    broken = tmp_path / "broken.whl"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr(deepforest.DATA_DIR + "x.xml", voc("missing.png", [[1, 1, 5, 5]]))
    with pytest.raises(UserError, match="missing.png"):
        deepforest.convert_wheel(broken, tmp_path / "b")
    with pytest.raises(UserError, match="sha256"):  # a cached file that is not the pinned wheel
        deepforest.fetch_wheel(wheel.parent)


def test_failed_download_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(deepforest, "VERSION", "0.0.0.dev0")
    monkeypatch.setattr(deepforest, "WHEEL", "deepforest-0.0.0.dev0-py3-none-any.whl")
    with pytest.raises(UserError, match=r"pip download --no-deps .*deepforest==0\.0\.0\.dev0"):
        deepforest.fetch_wheel(tmp_path)


def test_real_wheel_gives_about_950_trees(tmp_path):
    summary = deepforest.convert(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / deepforest.WHEEL).stat().st_size > 10_000_000
    total = sum(summary[split]["annotations"] for split in ("train", "val", "test"))
    assert 900 <= total <= 951  # 951 boxes in 4 photos; a few are cut away at tile edges
    tiles = sum(summary[split]["images"] for split in ("train", "val", "test"))
    assert (summary["val"]["images"], summary["test"]["images"]) == (round(0.15 * tiles), round(0.2 * tiles))
    coco = json.loads((tmp_path / "out" / "annotations" / "instances_test.json").read_text())
    assert {c["name"] for c in coco["categories"]} == {"tree"}
    for image in coco["images"]:
        assert max(image["width"], image["height"]) <= 400
        assert (tmp_path / "out" / "images" / "test" / image["file_name"]).is_file()

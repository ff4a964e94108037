"""CocoDetection: targets, category mapping, crowd/negatives/clipping, validation errors, lazy image errors."""
import json

import pytest
import torch
from PIL import Image

from kddetr.config import DataConfig
from kddetr.data.coco import CocoDetection, build_dataset
from kddetr.errors import UserError


def test_targets_and_category_mapping(coco_dict, make_coco):
    ds = CocoDetection(make_coco(coco_dict), "val")
    assert len(ds) == 3 and ds.image_ids == [10, 11, 12]
    assert ds.category_ids == [3, 7] and ds.category_names == ["three", "seven"]
    for label, cat in enumerate(ds.category_ids):
        assert ds.label_to_category_id(label) == cat and ds.category_id_to_label(cat) == label

    image, target = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (160, 120)
    assert target["boxes"].tolist() == [[10, 20, 40, 60], [100, 50, 140, 80]]  # xyxy pixels
    assert target["boxes"].canvas_size == (120, 160)
    assert target["labels"].tolist() == [0, 1]
    assert target["image_id"].item() == 10 and target["orig_size"].tolist() == [120, 160]


def test_crowd_left_out_of_targets_but_kept_for_evaluation(coco_dict, make_coco):
    ds = CocoDetection(make_coco(coco_dict), "val")
    assert len(ds[0][1]["boxes"]) == 2  # annotation 3 is a crowd region
    assert any(a["iscrowd"] == 1 for a in ds.coco_gt["annotations"])
    assert ds.coco_gt["annotations"] == coco_dict["annotations"]


def test_negative_images_kept(coco_dict, make_coco):
    _, target = CocoDetection(make_coco(coco_dict), "val")[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["image_id"].item() == 12


def test_boxes_clipped_to_image_and_degenerate_dropped(coco_dict, make_coco):
    coco_dict["annotations"] = [
        {"id": 20, "image_id": 11, "category_id": 7, "bbox": [80, 100, 40, 40]},  # over the right/bottom edge
        {"id": 21, "image_id": 11, "category_id": 3, "bbox": [-5.5, -4, 10, 10]},  # over the top-left corner
        {"id": 22, "image_id": 11, "category_id": 3, "bbox": [200, 10, 10, 10]},  # entirely outside
        {"id": 23, "image_id": 11, "category_id": 3, "bbox": [5, 5, 0, 10]},  # zero width
    ]
    _, target = CocoDetection(make_coco(coco_dict), "val")[1]
    assert target["boxes"].tolist() == [[80, 100, 96, 128], [0, 0, 4.5, 6]]
    assert target["labels"].tolist() == [1, 0]


@pytest.mark.parametrize("layout", ["images", "val"])
def test_image_directory_fallbacks(coco_dict, make_coco, layout):
    ds = CocoDetection(make_coco(coco_dict, image_dir=layout), "val")
    assert ds[0][0].size == (160, 120)


def _set(path, value):
    def edit(coco):
        node = coco
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


BAD = {
    "missing key": (lambda c: c.pop("categories"), "'categories'"),
    "unknown image": (_set(["annotations", 0, "image_id"], 99), "annotations[0] (id 1): image_id 99"),
    "unknown category": (_set(["annotations", 1, "category_id"], 5), "annotations[1] (id 2): category_id 5"),
    "duplicate image id": (_set(["images", 1, "id"], 10), "images[1]: duplicate id 10"),
    "duplicate annotation id": (_set(["annotations", 2, "id"], 1), "annotations[2]: duplicate id 1"),
    "duplicate category id": (_set(["categories", 1, "id"], 7), "categories[1]: duplicate id 7"),
    "bbox of 3": (_set(["annotations", 0, "bbox"], [1, 2, 3]), "annotations[0]: 'bbox' must be 4 finite numbers"),
    "bbox not finite": (_set(["annotations", 3, "bbox"], [1, 2, float("nan"), 3]), "annotations[3]: 'bbox' must be"),
    "bbox string": (_set(["annotations", 0, "bbox"], [1, "2", 3, 4]), "annotations[0]: 'bbox' must be"),
    "negative size": (_set(["annotations", 1, "bbox"], [1, 2, -3, 4]), "annotations[1] (id 2): bbox has a negative"),
    "missing field": (lambda c: c["annotations"][0].pop("bbox"), "annotations[0]: missing field 'bbox'"),
    "bad width": (_set(["images", 2, "width"], 0), "images[2]: 'width' must be a positive integer"),
    "iscrowd": (_set(["annotations", 0, "iscrowd"], 2), "annotations[0]: 'iscrowd' must be 0 or 1"),
    "no categories": (_set(["categories"], []), "'categories' is empty"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_invalid_annotations_name_file_and_record(coco_dict, make_coco, case):
    edit, expected = BAD[case]
    root = make_coco(coco_dict)
    edit(coco_dict)
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco_dict))
    with pytest.raises(UserError) as err:
        CocoDetection(root, "val")
    assert "instances_val.json" in str(err.value) and expected in str(err.value)


def test_invalid_json_and_missing_files(coco_dict, make_coco, tmp_path):
    root = make_coco(coco_dict)
    with pytest.raises(UserError, match="instances_train.json: annotation file not found"):
        CocoDetection(root, "train")
    (root / "annotations" / "instances_val.json").write_text('{"images": [')
    with pytest.raises(UserError, match="instances_val.json: invalid JSON"):
        CocoDetection(root, "val")
    (root / "annotations" / "instances_val.json").write_text("[]")
    with pytest.raises(UserError, match="instances_val.json: expected a JSON object"):
        CocoDetection(root, "val")
    (tmp_path / "bare" / "annotations").mkdir(parents=True)
    (tmp_path / "bare" / "annotations" / "instances_val.json").write_text(json.dumps(coco_dict))
    with pytest.raises(UserError, match="no image directory for split 'val'"):
        CocoDetection(tmp_path / "bare", "val")


def test_image_files_read_lazily_with_clear_errors(coco_dict, make_coco):
    root = make_coco(coco_dict)
    images = root / "images" / "val"
    ds = CocoDetection(root, "val")
    (images / "b.png").unlink()  # after construction: files are only opened by __getitem__
    (images / "c.png").write_bytes(b"not a png")
    Image.new("RGB", (10, 10)).save(images / "a.png")
    with pytest.raises(UserError, match=r"b\.png: image file not found"):
        ds[1]
    with pytest.raises(UserError, match=r"c\.png: cannot read image"):
        ds[2]
    with pytest.raises(UserError, match=r"a\.png: image is 10x10 but .*instances_val.json says 160x120"):
        ds[0]


def test_grayscale_images_converted_to_rgb(coco_dict, make_coco):
    root = make_coco(coco_dict)
    Image.new("L", (64, 64), 128).save(root / "images" / "val" / "c.png")
    image, _ = CocoDetection(root, "val")[2]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (128, 128, 128)


def test_build_dataset_returns_model_format(coco_dict, make_coco):
    cfg = DataConfig(train_sizes=[96, 112], eval_size=96, max_size=200)
    ds = build_dataset(make_coco(coco_dict), "val", cfg, train=False)
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 128)
    assert target["size"].tolist() == [96, 128] and target["orig_size"].tolist() == [120, 160]
    expected = torch.tensor([[25 / 160, 40 / 120, 30 / 160, 40 / 120], [120 / 160, 65 / 120, 40 / 160, 30 / 120]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].dtype == torch.int64 and target["image_id"].dtype == torch.int64


def test_empty_split_loads(coco_dict, tmp_path):
    coco_dict["images"], coco_dict["annotations"] = [], []
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(coco_dict))
    ds = CocoDetection(tmp_path, "val")  # no image directory needed either
    assert len(ds) == 0 and ds.category_ids == [3, 7]

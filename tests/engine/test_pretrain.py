"""Backbone pretraining on crops: weights that load into the detector's trunk, learning, determinism, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.models.resnet import BasicBlock, ResNet

from kddetr.data.coco import CocoDetection
from kddetr.data.synth import generate
from kddetr.engine.pretrain import extract_crops, pretrain_backbone
from kddetr.errors import UserError
from kddetr.models.backbone import Backbone

TINY = dict(crop_size=32, batch_size=32, lr=2e-3, minutes=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=40, num_val=10, size=96)
    return root


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("weights") / "resnet10.safetensors"
    return out, pretrain_backbone(data, "resnet10", out, num_stages=3, max_steps=120, **TINY)


def test_weights_load_strictly_into_the_detector_trunk(trained: tuple[Path, dict]) -> None:
    out, summary = trained
    state = load_file(out)
    expected = {k for k in ResNet(BasicBlock, [1, 1, 1, 1]).state_dict() if not k.startswith(("fc.", "layer4."))}
    assert set(state) == expected
    trunk = Backbone("resnet10", 3, weights=str(out)).body
    for key, value in trunk.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert (meta["arch"], meta["num_stages"], int(meta["steps"])) == ("resnet10", "3", summary["steps"])
    assert float(meta["val_acc"]) == pytest.approx(summary["val_acc"], abs=1e-4)
    assert not list(out.parent.glob("*.tmp"))


def test_learns_the_training_crops(trained: tuple[Path, dict]) -> None:
    _, summary = trained
    assert summary["steps"] == 120 and summary["crops"] > 100 and summary["val_crops"] > 10
    assert summary["train_loss"] < 0.5 * summary["first_loss"]
    assert summary["train_acc"] > 0.6  # 11 classes; the largest (background) is ~20% of the crops


def test_crop_bank_is_mostly_objects_with_some_background(data: Path) -> None:
    dataset = CocoDetection(data, "train")
    crops, labels = extract_crops(dataset, range(len(dataset)), 2, 10_000, 24, np.random.default_rng(0))
    assert crops.dtype == torch.uint8 and crops.shape[1:] == (24, 24, 3) and len(crops) == len(labels)
    background = (labels == dataset.num_classes).float().mean().item()
    assert 0.1 < background < 0.3
    boxes = sum(len(dataset[i][1]["labels"]) for i in range(len(dataset)))
    assert int((labels < dataset.num_classes).sum()) == 2 * boxes
    capped, _ = extract_crops(dataset, range(len(dataset)), 2, 50, 24, np.random.default_rng(0))
    assert len(capped) == 50


def test_same_seed_same_weights(data: Path, tmp_path: Path) -> None:
    runs = [pretrain_backbone(data, "resnet10", tmp_path / f"{i}.safetensors", num_stages=2, max_steps=4, seed=3,
                              **TINY) for i in range(2)]
    other = pretrain_backbone(data, "resnet10", tmp_path / "other.safetensors", num_stages=2, max_steps=4, seed=4,
                              **TINY)
    first, second, third = (load_file(tmp_path / f"{name}.safetensors") for name in ("0", "1", "other"))
    assert runs[0]["train_loss"] == runs[1]["train_loss"]
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(first["conv1.weight"], third["conv1.weight"])
    assert other["steps"] == 4


def test_unknown_arch(data: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="resnet7"):
        pretrain_backbone(data, "resnet7", tmp_path / "w.safetensors", max_steps=1, **TINY)


def test_dataset_without_boxes(make_coco, coco_dict: dict, tmp_path: Path) -> None:
    root = make_coco({**coco_dict, "annotations": []}, split="train")
    with pytest.raises(UserError, match="instances_train.json.*no boxes"):
        pretrain_backbone(root, "resnet10", tmp_path / "w.safetensors", max_steps=1, **TINY)

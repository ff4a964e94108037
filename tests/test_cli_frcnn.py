"""The command line with a Faster R-CNN student: train, distil from a DAB-DETR teacher, eval, predict."""
import json

import pytest
import yaml

from kddetr.cli import main

TINY_FRCNN = {
    "model": {"arch": "faster_rcnn", "backbone": {"name": "resnet10", "num_stages": 3}, "hidden_dim": 16,
              "num_feature_levels": 2, "anchor_sizes": [8, 16, 32], "num_queries": 20, "roi_batch_size": 32,
              "roi_head_dim": 32},
    "data": {"train_sizes": [64], "eval_size": 64, "max_size": 128, "hflip": False, "random_crop": False},
    "train": {"epochs": 1, "batch_size": 4, "lr": 1.0e-3, "lr_backbone": 1.0e-3, "log_every": 1},
    "kd": {"general_points": 8, "cls_background": True},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_and_train):
    root = tmp_path_factory.mktemp("cli_frcnn")
    data, teacher = synth_and_train(root, "teacher")
    config = root / "frcnn.yaml"
    config.write_text(yaml.safe_dump(TINY_FRCNN))
    return root, data, teacher, str(config)


@pytest.mark.parametrize("command", ["train", "distill"])
def test_frcnn_student_trains_evaluates_and_predicts(setup, command):
    root, data, teacher, config = setup
    run = root / command
    extra = ["--teacher", str(teacher / "last")] if command == "distill" else []
    assert main([command, config, *extra, "--data", str(data), "--out", str(run), "--no-progress"]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "train/loss_classifier" in record and "AP" in record
    assert ("train/general/kd_cls" in record) == (command == "distill")

    out = root / f"eval_{command}" / "metrics.json"
    assert main(["eval", str(run / "last"), "--data", str(data), "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    results = json.loads((out.parent / "results.json").read_text())
    assert results and all(0 <= r["bbox"][0] and r["bbox"][0] + r["bbox"][2] <= 64.01 for r in results)

    pred = root / f"pred_{command}"
    assert main(["predict", str(run / "last"), str(data / "images" / "val"), "--out", str(pred),
                 "--score-threshold", "0", "--top-k", "3"]) == 0
    dets = json.loads((pred / "detections.json").read_text())
    assert len(list(pred.glob("*.png"))) == 4 and 0 < len(dets) <= 3 * 4


def test_hungarian_baseline_needs_a_detr_student(setup, capsys):
    root, data, teacher, config = setup
    out = root / "hungarian"
    assert main(["distill", config, "--teacher", str(teacher / "last"), "--data", str(data), "--out", str(out),
                 "--set", "kd.method=hungarian"]) == 2
    assert "kd.method: hungarian" in capsys.readouterr().err and not out.exists()

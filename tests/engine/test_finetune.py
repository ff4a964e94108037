"""`--init`: class rows follow the category names, everything else loads as it is, mismatches are refused."""
import json
from pathlib import Path

import pytest
import torch

from kddetr.cli import main
from kddetr.config import load_config
from kddetr.engine.checkpoint import DatasetInfo, save_checkpoint
from kddetr.engine.finetune import init_from_checkpoint
from kddetr.errors import UserError
from kddetr.models.build import build_detector

TINY = Path(__file__).parents[1] / "fixtures" / "tiny.yaml"
OLD = ["cat", "dog", "bird"]


def _checkpoint(root: Path, overrides=(), names=OLD, seed=0) -> tuple[Path, dict]:
    cfg = load_config(TINY, list(overrides))
    torch.manual_seed(seed)
    model = build_detector(cfg.model, len(names))
    path = save_checkpoint(root / "ckpt", model, cfg, DatasetInfo(list(range(1, len(names) + 1)), list(names)))
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("denoising", [False, True])
def test_mapped_classes_keep_their_rows_bit_exactly_and_new_ones_start_fresh(tmp_path, denoising):
    overrides = [f"model.denoising.enabled={denoising}"]
    ckpt, old = _checkpoint(tmp_path, overrides)
    torch.manual_seed(1)
    model = build_detector(load_config(TINY, overrides).model, 3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    summary = init_from_checkpoint(model, "dab_detr", ckpt, ["bird", "horse", "cat"])
    new = model.state_dict()
    class_tensors = ["class_embed.weight", "class_embed.bias"] + (["denoising.label_embed.weight"] if denoising else [])
    assert sorted(summary.class_mapped) == sorted(class_tensors)
    for name in class_tensors:
        assert torch.equal(new[name][0], old[name][2]) and torch.equal(new[name][2], old[name][0])
        assert torch.equal(new[name][1], fresh[name][1])  # biases start at the same prior either way
        assert name.endswith("bias") or not torch.equal(new[name][1], old[name][1])
    others = [k for k in new if k not in class_tensors]
    assert all(torch.equal(new[k], old[k]) for k in others) and sorted(summary.loaded) == sorted(others)
    assert summary.classes == {"bird": "bird", "horse": None, "cat": "cat"}
    assert summary.describe().endswith("classes: 2 of 3 from the checkpoint (bird, cat), new: horse")


def test_faster_rcnn_predictor_maps_class_rows_past_the_background(tmp_path):
    cfg = load_config("configs/embedded_frcnn_student.yaml", ["model.backbone.weights=null", "model.hidden_dim=32",
                                                               "model.faster_rcnn.roi_head_dim=16"])
    torch.manual_seed(0)
    teacher = build_detector(cfg.model, 2)
    ckpt = save_checkpoint(tmp_path / "frcnn", teacher, cfg, DatasetInfo([1, 2], ["cat", "dog"]))
    old = teacher.state_dict()
    model = build_detector(cfg.model, 3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    summary = init_from_checkpoint(model, "faster_rcnn", ckpt, ["dog", "bird", "pig"], {"pig": "cat"})
    new = model.state_dict()
    score, delta = "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.weight"
    assert {score, delta} <= set(summary.class_mapped)
    assert torch.equal(new[score][0], old[score][0])  # background
    assert torch.equal(new[score][1], old[score][2]) and torch.equal(new[score][3], old[score][1])
    assert torch.equal(new[score][2], fresh[score][2])
    assert torch.equal(new[delta][4:8], old[delta][8:12]) and torch.equal(new[delta][12:16], old[delta][4:8])
    assert torch.equal(new[delta][8:12], fresh[delta][8:12])
    assert summary.describe().endswith("classes: 2 of 3 from the checkpoint (dog, pig<-cat), new: bird")


def test_other_shapes_are_refused_unless_partial(tmp_path):
    ckpt, old = _checkpoint(tmp_path, ["model.num_queries=12", "model.decoder_layers=3"])
    model = build_detector(load_config(TINY).model, 3)
    with pytest.raises(UserError, match=r"refpoint_embed.weight: checkpoint \(12, 4\) vs model \(10, 4\) \(and \d+ "
                                        r"more\); pass --init-partial"):
        init_from_checkpoint(model, "dab_detr", ckpt, OLD)
    summary = init_from_checkpoint(model, "dab_detr", ckpt, OLD, partial=True)
    assert "refpoint_embed.weight" in summary.reinitialised
    assert any(".layers.2." in k for k in summary.left_out)  # the third decoder layer has nowhere to go
    assert torch.equal(model.state_dict()["class_embed.weight"], old["class_embed.weight"])


def test_init_trains_and_resume_wins(tmp_path, capsys):
    """Through the CLI: the summary is printed; with --resume the run continues and says --init is not applied."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--train", "8", "--val", "4", "--test", "0", "--size",
                 "64"]) == 0
    ckpt, _ = _checkpoint(tmp_path, names=[f"digit_{d}" for d in range(10)])
    run = tmp_path / "run"
    base = ["train", str(TINY), "--data", str(data), "--out", str(run), "--no-progress", "--init", str(ckpt)]
    assert main([*base, "--epochs", "1"]) == 0
    assert "classes: 10 of 10 from the checkpoint" in capsys.readouterr().out
    assert main([*base, "--epochs", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"--resume: continuing {run / 'last'}; --init {ckpt} is not applied" in out
    assert "tensors loaded" not in out
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_tiny_fine_tune_beats_backbone_only_init_on_the_same_steps(tmp_path):
    """Pretrain the tiny model on one class naming, fine-tune it onto renamed classes: lower loss than from scratch."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--train", "16", "--val", "4", "--test", "0", "--size",
                 "64"]) == 0
    common = ["--data", str(data), "--no-progress", "--set", "train.eval_every=0"]
    assert main(["train", str(TINY), "--out", str(tmp_path / "pre"), "--epochs", "12", *common]) == 0
    renamed = tmp_path / "renamed"
    coco_files = sorted((data / "annotations").glob("*.json"))
    import shutil
    shutil.copytree(data, renamed)
    for file in coco_files:  # the same images under other names: the mapping must be given
        coco = json.loads(file.read_text())
        for c in coco["categories"]:
            c["name"] = c["name"].replace("digit_", "number ")
        (renamed / "annotations" / file.name).write_text(json.dumps(coco))
    common[1] = str(renamed)
    mapping = [x for d in range(10) for x in ("--class-map", f"number {d}=digit_{d}")]
    assert main(["train", str(TINY), "--out", str(tmp_path / "ft"), "--epochs", "2", "--init",
                 str(tmp_path / "pre" / "last"), *mapping, *common]) == 0
    assert main(["train", str(TINY), "--out", str(tmp_path / "scratch"), "--epochs", "2", *common]) == 0

    def last_loss(run: str) -> float:
        return json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])["train/loss"]

    assert last_loss("ft") < 0.8 * last_loss("scratch")


def test_a_checkpoint_is_the_config_of_its_fine_tune(tmp_path, capsys):
    """`kddetr train CKPT` (or CKPT/config.yaml, as `kddetr import` writes it) trains that model with its settings;
    its `dataset` section, the classes it was trained on, is not a setting."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--train", "8", "--val", "4", "--test", "0", "--size",
                 "64"]) == 0
    ckpt, _ = _checkpoint(tmp_path, ["model.num_queries=12", "train.lr=3e-4"])
    for i, given in enumerate([ckpt, ckpt / "config.yaml"]):
        run = tmp_path / f"run{i}"
        assert main(["train", str(given), "--data", str(data), "--out", str(run), "--no-progress", "--epochs", "1",
                     "--set", "train.eval_every=0", "--init", str(ckpt)]) == 0
        saved = load_config(run / "config.yaml")
        assert (saved.model.num_queries, saved.train.lr, saved.train.epochs) == (12, 3e-4, 1)
        assert "classes: 0 of 10 from the checkpoint" in capsys.readouterr().out
    loose = tmp_path / "loose.yaml"  # the same file away from its weights is a config like any other
    loose.write_text((ckpt / "config.yaml").read_text())
    assert main(["train", str(loose), "--data", str(data), "--out", str(tmp_path / "run_loose")]) == 2
    assert "loose.yaml: unknown key 'dataset'" in capsys.readouterr().err

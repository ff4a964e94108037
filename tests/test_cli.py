"""The command line as users type it: one flow through every command, and the bad-input contract."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kddetr.cli import main

TINY = str(Path(__file__).parent / "fixtures" / "tiny.yaml")


@pytest.fixture(scope="module")
def flow(tmp_path_factory, synth_and_train):
    root = tmp_path_factory.mktemp("cli")
    data, run = synth_and_train(root, "run")
    return root, data, run


def test_train_eval_predict_plot(flow, capsys):
    root, data, run = flow
    out = root / "eval" / "metrics.json"
    assert main(["eval", str(run / "best"), "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    results = json.loads((out.parent / "results.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    assert 1 <= results[0]["category_id"] <= 10

    pred = root / "pred"
    images = sorted((data / "images" / "val").iterdir())
    assert main(["predict", str(run / "best"), str(images[0]), str(data / "images" / "val"), "--out", str(pred),
                 "--score-threshold", "0", "--top-k", "5"]) == 0
    dets = json.loads((pred / "detections.json").read_text())
    assert len(list(pred.glob("*.png"))) == len(images)
    assert len(dets) == 5 * (len(images) + 1) and {"file_name", "bbox", "score", "category_id"} <= set(dets[0])

    png = root / "curves.png"
    assert main(["plot", str(run), str(run), "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    timed = root / "curves_time.png"
    assert main(["plot", str(run), "--out", str(timed), "--x", "time"]) == 0
    assert timed.stat().st_size > 10_000


def test_eval_on_the_test_split_scores_the_checkpoints_num_select(flow, tmp_path):
    import shutil

    import yaml

    _, data, run = flow
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "best", ckpt)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert config["model"]["num_select"] == 0  # the architecture's default: 300 (query, class) pairs for DAB-DETR
    out = tmp_path / "default" / "metrics.json"
    assert main(["eval", str(ckpt), "--data", str(data), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    per_image = len(json.loads((out.parent / "results.json").read_text())) / 3
    assert per_image == 10 * 10  # all of the tiny model's 10 queries x 10 classes (< 300)
    config["model"]["num_select"] = 7
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "seven" / "metrics.json"
    assert main(["eval", str(ckpt), "--data", str(data), "--split", "test", "--out", str(out), "--no-progress"]) == 0
    assert len(json.loads((out.parent / "results.json").read_text())) == 7 * 3


@pytest.mark.parametrize("args,fragment", [
    (["--set", "model.hiden_dim=3"], "Did you mean 'hidden_dim'"),
    (["--set", "train.lr=abc"], "expected a number"),
])
def test_bad_config_exits_2_and_writes_nothing(flow, tmp_path, capsys, args, fragment):
    _, data, _ = flow
    out = tmp_path / "never"
    assert main(["train", TINY, "--data", str(data), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_existing_run_needs_resume_and_missing_teacher_is_clear(flow, capsys):
    _, data, run = flow
    assert main(["train", TINY, "--data", str(data), "--out", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["distill", TINY, "--teacher", str(run / "nope"), "--data", str(data), "--out", str(run.parent / "kd")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert not (run.parent / "kd").exists()


def test_teacher_set_overrides_the_teachers_config_and_a_bad_key_names_its_file(flow, tmp_path, capsys, monkeypatch):
    _, data, run = flow
    out = tmp_path / "kd"
    args = ["distill", TINY, "--teacher", str(run / "best"), "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*args, "--teacher-set", "model.hiden_dim=3"]) == 2
    err = capsys.readouterr().err
    assert str(run / "best" / "config.yaml") in err and "Did you mean 'hidden_dim'" in err and not out.exists()

    import kddetr.engine.checkpoint as checkpoint
    teachers = []
    real_load = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint",
                        lambda path, device="cpu", overrides=(): teachers.append(real_load(path, device, overrides))
                        or teachers[-1])
    assert main([*args, "--teacher-set", "model.dropout=0.25", "--set", "train.max_steps=1", "--epochs", "1"]) == 0
    (teacher,) = teachers
    dropouts = {m.p for m in teacher.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert teacher.config.model.dropout == 0.25 and dropouts == {0.25}


def test_resume_before_the_first_checkpoint_starts_the_run_afresh(flow, tmp_path, capsys):
    """A requeued job always passes --resume: killed before its first checkpoint, it starts over, as if new."""
    _, data, run = flow
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.yaml").write_text("model: {hidden_dim: 3}\n")  # what a kill in the first epoch leaves
    (killed / "metrics.jsonl").write_text("")
    args = ["train", TINY, "--data", str(data), "--epochs", "1", "--no-progress", "--resume"]
    assert main([*args, "--out", str(killed)]) == 0
    printed = capsys.readouterr().out
    assert f"--resume: no checkpoint in {killed} yet; starting the run from the beginning" in printed
    assert re.search(r"^DAB-DETR with [\d.]+ M parameters \([\d.]+ M trained\), 10 classes, \d+ training images$",
                     printed, flags=re.M), printed
    assert main([*args, "--out", str(tmp_path / "never_started")]) == 0

    def losses(path: Path) -> list:
        return [{k: v for k, v in json.loads(l).items() if k.startswith("train/")}
                for l in (path / "metrics.jsonl").read_text().splitlines()]

    assert losses(killed) == losses(tmp_path / "never_started") == losses(run)


def test_console_script_exit_code_and_debug(tmp_path):
    cmd = [sys.executable, "-m", "kddetr", "eval", str(tmp_path / "missing"), "--data", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "kddetr: error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kddetr", "--debug", *cmd[3:]], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_bench_teacher_points_prints_and_records_the_gap(flow, capsys):
    root, data, run = flow
    records = root / "teacher_points"
    assert main(["bench", "teacher-points", str(run / "last"), "--data", str(data), "--records", str(records)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| `{run / 'last'}`")][-1]
    detections, points, gap = (float(cell) for cell in row.strip("|").split("|")[1:])
    assert points == detections and gap == 0.0  # DAB-DETR decodes its own anchors as points exactly
    saved = json.loads((records / "output.json").read_text())
    assert saved["command"].startswith("kddetr bench teacher-points ") and row in saved["output"]
    assert main(["bench", "teacher-points", str(run / "last"), "--data", str(data), "--set", "model.no_such=1"]) == 2
    assert "no_such" in capsys.readouterr().err


def _gradient_rows(printed: str) -> dict[str, list[float]]:
    rows = [line.strip("|").split("|") for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [float(c) for c in cells[1:]] for cells in rows[1:]}


def test_bench_kd_gradients_measures_the_kd_share_of_the_gradient(flow, capsys):
    """The same batches and points with every KD weight halved: the KD gradient halves, the detection gradient
    and the cosine stay; the table has the student's parts and `all`, and is recorded."""
    root, data, run = flow
    tiny = str(Path(__file__).parent / "fixtures" / "tiny.yaml")
    command = ["bench", "kd-gradients", tiny, "--teacher", str(run / "last"), "--data", str(data), "--batches", "2",
               "--set", "kd.general_points=8"]
    records = root / "kd_gradients"
    assert main(command + ["--records", str(records)]) == 0
    full = _gradient_rows(capsys.readouterr().out)
    halved_weights = ["--set", "kd.cls_weight=0.5", "--set", "kd.bbox_weight=2.5", "--set", "kd.giou_weight=1.0"]
    assert main(command + halved_weights) == 0
    half = _gradient_rows(capsys.readouterr().out)
    assert {"backbone", "all"} <= set(full) and list(full)[-1] == "all" and full["all"][1] > 0
    for part, (det, kd, ratio, cosine) in full.items():
        assert det > 0 and ratio == pytest.approx(kd / det, rel=0.02, abs=0.01) and -1 <= cosine <= 1
        assert half[part][0] == pytest.approx(det, rel=2e-3) and half[part][1] == pytest.approx(kd / 2, rel=2e-3)
        assert half[part][3] == pytest.approx(cosine, abs=0.011)
    saved = json.loads((records / "output.json").read_text())
    assert saved["command"].startswith("kddetr bench kd-gradients ") and "| all |" in saved["output"]
    assert main(command + ["--set", "kd.method=none"]) == 2
    assert "no KD loss" in capsys.readouterr().err

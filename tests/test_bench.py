import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kddetr.bench.kd_gain import (ARCHS, VARIANTS, Row, _slug, ensure_teacher, main, row_recipe, run_record,
                                  run_row, table)
from kddetr.errors import UserError
from kddetr.config import BackboneConfig, load_config, save_config
from kddetr.registry import REGISTRY


def test_variant_slugs_are_distinct_paths():
    slugs = [_slug(n) for n in VARIANTS]
    assert len(set(slugs)) == len(slugs)
    assert _slug("student (no KD)") == "student_no_kd"
    assert _slug("KD-DETR general+specific") == "kd_detr_general_specific"


def test_final_row_is_the_last_evaluated_epoch_not_the_best(tmp_path):
    rows = [{"epoch": 1, "s_per_step": 0.1, "AP": 9.0}, {"epoch": 2, "s_per_step": 0.3},
            {"epoch": 3, "s_per_step": 0.2, "AP": 7.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    record = run_record(Row("student (no KD)", 0), tmp_path)
    assert record.final_val["AP"] == 7.0 and record.s_per_step == 0.2 and record.test is None
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "metrics.json").write_text(json.dumps({"AP": 5.0}))
    assert run_record(Row("student (no KD)", 0), tmp_path).test == {"AP": 5.0}


def test_table_formats_missing_sizes_as_dash():
    md = table([("student", {"AP": 5.0, "AP50": 17.6, "AP75": 0.8, "APs": 3.6, "APm": 8.6, "APl": -1.0}, 0.25)],
               {"AP": 40.0, "AP50": 70.0, "AP75": 40.0, "APs": 30.0, "APm": 50.0, "APl": -1.0})
    lines = md.splitlines()
    assert lines[2].startswith("| teacher | 40.0 | 70.0") and lines[3].endswith("| – | 0.250 |")


REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_has_a_teacher_and_a_student_config_with_the_same_kd_block(arch):
    from kddetr.config import load_config
    from kddetr.models.build import build_detector, count_parameters

    from kddetr.registry import spec

    teacher_path, student_path, shipped = spec(arch).teacher_config, spec(arch).student_config, spec(arch).shipped_teacher
    teacher_cfg, student_cfg = load_config(REPO / teacher_path), load_config(REPO / student_path)
    assert teacher_cfg.model.arch == student_cfg.model.arch == arch
    assert student_cfg.kd == load_config(REPO / "configs/embedded_student.yaml").kd
    assert shipped is not None and (REPO / shipped / "model.safetensors").is_file()
    no_weights = BackboneConfig("resnet10", num_stages=3)
    teacher, student = (build_detector(dataclasses.replace(cfg.model, backbone=no_weights), 10)
                        for cfg in (teacher_cfg, student_cfg))
    assert count_parameters(student) < 0.7 * count_parameters(teacher)


@pytest.fixture
def fake_runs(monkeypatch):
    """`subprocess.run` stubbed for `kddetr` commands: records each and leaves a finished run (last/, an evaluated
    epoch). Other commands (matplotlib's first `fc-list` on a fresh machine) run for real."""
    calls, real_run = [], subprocess.run

    def fake_run(args, **kwargs):
        if list(args[1:3]) != ["-m", "kddetr"]:
            return real_run(args, **kwargs)
        calls.append(args)
        run = Path(args[args.index("--out") + 1])
        if args[3] == "eval":  # the bench's evaluation of a finished run (or of the teacher) on a split
            run.parent.mkdir(parents=True, exist_ok=True)
            run.write_text(json.dumps({"AP": 3.0, "AP50": 9.0}))
            return
        (run / "last").mkdir(parents=True, exist_ok=True)
        overrides = [args[i + 1] for i, flag in enumerate(args) if flag == "--set"]
        cfg = load_config(args[4], overrides)  # the config `kddetr train|distill` would save
        save_config(cfg, run / "config.yaml")
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": cfg.train.epochs, "step": 5, "AP": 1.0}) + "\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    return calls


@pytest.fixture
def unshipped_rt_detr(monkeypatch):
    """RT-DETR as if no trained teacher were committed: the bench must train one first."""
    monkeypatch.setitem(REGISTRY, "rt_detr", dataclasses.replace(REGISTRY["rt_detr"], shipped_teacher=None))


def test_the_teacher_is_trained_first_unless_given(tmp_path, fake_runs, unshipped_rt_detr):
    given = tmp_path / "mine"
    assert ensure_teacher("dino", given, tmp_path / "data", tmp_path, [], 1) == given
    assert ensure_teacher("dab_detr", None, tmp_path / "data", tmp_path, [], 1) == Path("assets/teacher")
    assert fake_runs == []
    assert ensure_teacher("dino", None, tmp_path / "data", tmp_path, [], 1) == Path("assets/teacher_dino")
    assert fake_runs == []
    checkpoint = ensure_teacher("rt_detr", None, tmp_path / "data", tmp_path, ["train.max_steps=2"], 1)
    assert checkpoint == tmp_path / "teacher" / "last"
    (args,) = fake_runs
    assert args[3:5] == ["train", "configs/embedded_rt_detr_teacher.yaml"] and "train.max_steps=2" in args


def test_a_finished_run_is_reused_only_for_the_same_teacher(tmp_path, fake_runs):
    config, data = Path("configs/embedded_dino_student.yaml"), tmp_path / "data"
    name = "KD-DETR general+specific"
    first = run_row(Row(name), config, tmp_path / "teacher_a", data, tmp_path, [], 1)
    assert run_row(Row(name), config, tmp_path / "teacher_a", data, tmp_path, [], 1) == first and len(fake_runs) == 1
    with pytest.raises(UserError, match="started by another command.*teacher_a"):
        run_row(Row(name), config, tmp_path / "teacher_b", data, tmp_path, [], 1)
    assert len(fake_runs) == 1


def test_rows_with_committed_records_are_not_trained_again(tmp_path, fake_runs, monkeypatch):
    """A fresh clone has the records but no run directories: the rows recorded by the same recipe are taken from
    the records; a row whose recipe changed (here: another lr) is trained again."""
    monkeypatch.chdir(REPO)
    data, records_dir = tmp_path / "data", tmp_path / "records"
    (data / "annotations").mkdir(parents=True)
    for split in ("val", "test"):
        (data / "annotations" / f"instances_{split}.json").write_text("{}")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.yaml").write_text("model: {arch: deformable_detr}\n")
    argv = ["--data", str(data), "--teacher", str(tmp_path / "teacher"), "--records", str(records_dir), "--jobs",
            "1", "--threads", "1", "--variants", "student (no KD)", "Hungarian KD"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    trained = [a for a in fake_runs if a[3] in ("train", "distill")]
    assert [a[3] for a in trained] == ["train", "distill"]
    manifest = json.loads((records_dir / "bench.json").read_text())
    assert manifest["minutes"] > 0 and (manifest["arch"], manifest["teacher_arch"]) == ("dab_detr", "deformable_detr")

    fake_runs.clear()
    assert main([*argv, "--out", str(tmp_path / "fresh_clone")]) == 0
    assert [a for a in fake_runs if a[3] in ("train", "distill")] == []
    assert "| Hungarian KD | 3.0 | 9.0 |" in (tmp_path / "fresh_clone" / "table.md").read_text()
    assert json.loads((records_dir / "bench.json").read_text())["minutes"] > 0  # still the whole command's

    assert main([*argv, "--out", str(tmp_path / "other_lr"), "--set", "train.lr=1e-3"]) == 0
    assert [a[3] for a in fake_runs if a[3] in ("train", "distill")] == ["train", "distill"]
    assert json.loads((records_dir / "bench.json").read_text())["minutes"] > 0


def test_a_resumed_bench_records_no_wall_time(tmp_path, fake_runs, monkeypatch):
    """A row resumed from an earlier sitting's checkpoint: this sitting's minutes are not the command's."""
    monkeypatch.chdir(REPO)
    data, records_dir, out = tmp_path / "data", tmp_path / "records", tmp_path / "out"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_test.json").write_text("{}")
    (out / "student_no_kd" / "last").mkdir(parents=True)
    argv = ["--data", str(data), "--teacher", str(tmp_path / "teacher"), "--records", str(records_dir), "--jobs",
            "1", "--threads", "1", "--variants", "student (no KD)", "--out", str(out)]
    assert main(argv) == 0
    (trained,) = [a for a in fake_runs if a[3] == "train"]
    assert "--resume" in trained
    assert json.loads((records_dir / "bench.json").read_text())["minutes"] is None


def test_another_teacher_trains_only_the_distilled_rows_again(tmp_path, fake_runs, monkeypatch):
    """The student alone never reads the teacher: its record (also one written when no-KD recipes still named the
    bench's teacher) is taken for another teacher, the distilled row is trained again."""
    monkeypatch.chdir(REPO)
    data, records_dir = tmp_path / "data", tmp_path / "records"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_test.json").write_text("{}")
    for name in ("teacher_a", "teacher_b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("model: {arch: dab_detr}\n")
    argv = ["--data", str(data), "--records", str(records_dir), "--jobs", "1", "--threads", "1", "--demo"]
    assert main([*argv, "--teacher", str(tmp_path / "teacher_a"), "--out", str(tmp_path / "a")]) == 0
    no_kd = records_dir / "student_no_kd" / "command.json"
    assert json.loads(no_kd.read_text())["teacher"] is None
    no_kd.write_text(json.dumps(json.loads(no_kd.read_text()) | {"teacher": str(tmp_path / "teacher_a")}))

    fake_runs.clear()
    assert main([*argv, "--teacher", str(tmp_path / "teacher_b"), "--out", str(tmp_path / "b")]) == 0
    trained = [a for a in fake_runs if a[3] in ("train", "distill")]
    assert [a[3] for a in trained] == ["distill"] and str(tmp_path / "teacher_b") in trained[0]


def test_a_record_is_trained_again_when_its_config_file_changed(tmp_path, fake_runs, monkeypatch, capsys):
    """Same command, but the config file it names now says something else: the record is stale, not reused."""
    monkeypatch.chdir(REPO)
    data, records_dir, config = tmp_path / "data", tmp_path / "records", tmp_path / "student.yaml"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_test.json").write_text("{}")
    config.write_text(Path("configs/embedded_student.yaml").read_text())
    argv = ["--data", str(data), "--teacher", str(tmp_path / "teacher"), "--records", str(records_dir), "--jobs",
            "1", "--threads", "1", "--variants", "student (no KD)", "--config", str(config)]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    fake_runs.clear()
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    assert [a for a in fake_runs if a[3] == "train"] == []

    config.write_text(config.read_text().replace("lr: 2.0e-4", "lr: 3.0e-4", 1))
    assert main([*argv, "--out", str(tmp_path / "edited")]) == 0
    assert [a[3] for a in fake_runs if a[3] == "train"] == ["train"]
    assert "train.lr: 0.0002 -> 0.0003" in capsys.readouterr().out


def test_device_reaches_every_command_and_the_recipe_but_cpu_recipes_stay_as_recorded(tmp_path, fake_runs,
                                                                                        monkeypatch,
                                                                                        unshipped_rt_detr):
    monkeypatch.chdir(REPO)
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_test.json").write_text("{}")
    argv = ["--arch", "rt_detr", "--data", str(data), "--jobs", "1", "--threads", "1", "--demo",
            "--out", str(tmp_path / "gpu"), "--device", "cuda"]
    assert main(argv) == 0
    assert [a[3] for a in fake_runs] == ["train", "eval", "train", "eval", "distill", "eval"]
    assert all(a[a.index("--device") + 1] == "cuda" for a in fake_runs)
    for slug in ("teacher", "student_no_kd", "kd_detr_general_specific"):
        assert json.loads((tmp_path / "gpu" / f"{slug}.command.json").read_text())["flags"] == ["--device", "cuda"]
    cpu = row_recipe(Row("student (no KD)"), Path("c.yaml"), Path("t"), data, [])
    assert "flags" not in cpu and cpu == row_recipe(Row("student (no KD)"), Path("c.yaml"), Path("t"), data, [], "cpu")


def test_teacher_set_reaches_the_distill_runs_and_their_recipes_only(tmp_path, fake_runs, monkeypatch):
    monkeypatch.chdir(REPO)
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_test.json").write_text("{}")
    argv = ["--arch", "dino", "--data", str(data), "--jobs", "1", "--threads", "1", "--demo", "--out",
            str(tmp_path / "out"), "--teacher-set", "model.num_select=50"]
    assert main(argv) == 0
    runs = {a[3]: a for a in fake_runs if a[3] in ("train", "distill")}
    assert "--teacher-set" not in runs["train"]
    distill = runs["distill"]
    assert distill[distill.index("--teacher-set") + 1] == "model.num_select=50"
    recipe = json.loads((tmp_path / "out" / "kd_detr_general_specific.command.json").read_text())
    assert recipe["flags"] == ["--teacher-set", "model.num_select=50"]
    assert "flags" not in json.loads((tmp_path / "out" / "student_no_kd.command.json").read_text())


def test_a_run_killed_midway_is_resumed_not_reused(tmp_path):
    from kddetr.bench.kd_gain import finished

    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {epochs: 4, max_steps: 0}\n")
    rows = [{"epoch": e, "step": 10 * e, "time_s": e} | ({"AP": 5.0} if e % 2 == 0 else {}) for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not finished(run)  # evaluated at epoch 2 of 4: not the end
    (run / "config.yaml").write_text("train: {epochs: 4, max_steps: 20}\n")
    assert finished(run)  # stopped at max_steps
    (run / "config.yaml").write_text("train: {epochs: 2}\n")
    assert finished(run)
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert not finished(run)


@pytest.mark.slow
def test_kd_bench_starts_for_rt_detr(tmp_path, monkeypatch, unshipped_rt_detr):
    """A dry run with tiny settings: the RT-DETR teacher is trained (as when none is shipped), the demo variants
    run, the table is written."""
    monkeypatch.chdir(REPO)
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "kddetr", "data", "synth", "--out", str(data), "--train", "8", "--val", "4",
                    "--test", "4"],
                   check=True, stdout=subprocess.DEVNULL)
    tiny = ["train.max_steps=2", "train.epochs=1", "train.batch_size=4", "model.encoder_layers=1",
            "model.decoder_layers=1", "kd.general_points=5"]
    argv = ["--arch", "rt_detr", "--demo", "--data", str(data), "--out", str(tmp_path / "bench"), "--jobs", "1",
            "--threads", "1"] + [x for item in tiny for x in ("--set", item)]
    assert main(argv) == 0
    table_md = (tmp_path / "bench" / "table.md").read_text()
    assert "| KD-DETR general+specific |" in table_md and (tmp_path / "bench" / "teacher" / "last").is_dir()


def test_finetune_bench_trains_from_the_checkpoint_and_from_the_backbone_and_reports_both(tmp_path, fake_runs,
                                                                                         monkeypatch):
    """Both rows train the same config and seed; only the first gets `--init` and its flags. A second invocation
    with the same records trains nothing; the report states the test AP difference and the early-steps claim."""
    from kddetr.bench import finetune, records, report

    monkeypatch.chdir(REPO)
    data, records_dir, init = tmp_path / "data", tmp_path / "records", tmp_path / "ckpt"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_test.json").write_text("{}")
    init.mkdir()
    (init / "config.yaml").write_text("model: {}\n")
    argv = ["configs/deepforest_teacher.yaml", "--init", str(init), "--init-partial", "--class-map", "tree=7",
            "--data", str(data), "--records", str(records_dir), "--jobs", "1", "--threads", "1",
            "--set", "train.max_steps=5"]
    assert finetune.main([*argv, "--out", str(tmp_path / "first")]) == 0
    trained = [a for a in fake_runs if a[3] == "train"]
    assert len(trained) == 2 and all("train.seed=0" in a and "train.max_steps=5" in a for a in trained)
    first, second = trained
    assert first[first.index("--init"):first.index("--init") + 5] == ["--init", str(init), "--class-map", "tree=7",
                                                                     "--init-partial"]
    assert "--init" not in second and "--class-map" not in second

    fake_runs.clear()
    assert finetune.main([*argv, "--out", str(tmp_path / "fresh_clone")]) == 0
    assert [a for a in fake_runs if a[3] == "train"] == []

    bench = records.load_bench(records_dir)
    assert bench.kind == "finetune" and bench.split == "test" and bench.command.startswith("kddetr bench finetune")
    table = report.results_table(bench)
    assert "| teacher |" not in table
    assert f"- --init {init} − backbone only: **+0.0 AP** on test" in table
    assert "- val AP within 500 steps: --init" in table


def test_finetune_bench_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    from kddetr.bench import finetune

    with pytest.raises(UserError, match="not a kddetr checkpoint"):
        finetune.main(["configs/deepforest_teacher.yaml", "--init", str(tmp_path), "--data", str(tmp_path)])

"""Results tables come from committed run records: records round-trip, tables and gains, the README check."""
import json
import re
import shutil
from pathlib import Path

import pytest

from kddetr.bench import records, report
from kddetr.bench.kd_gain import Row, plan_rows, schedule_overrides
from kddetr.errors import UserError

REPO = Path(__file__).parents[1]
TEACHER = {"val": {"AP": 47.0, "AP50": 76.3, "AP75": 53.9, "APs": 43.4, "APm": 55.0, "APl": -1.0},
           "test": {"AP": 46.5, "AP50": 73.9, "AP75": 52.8, "APs": 42.2, "APm": 54.5, "APl": -1.0}}


def fake_run(root: Path, slug: str, val_aps: list, test_ap=None) -> Path:
    """A run directory as `kddetr train` leaves it: config, one metrics line per epoch, the bench's test eval."""
    run = root / "runs" / slug
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("train: {seed: 0}\n")
    lines = [{"epoch": i + 1, "step": 250 * (i + 1), "time_s": 60.0 * (i + 1), "s_per_step": 0.2 + 0.01 * i,
              **({"AP": ap} if ap is not None else {})} for i, ap in enumerate(val_aps)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    if test_ap is not None:
        (run / "test").mkdir()
        (run / "test" / "metrics.json").write_text(json.dumps({k: test_ap for k in report.KEYS} | {"APl": -1.0}))
    (root / "runs" / f"{slug}.command.json").write_text('{"command": "train"}\n')
    return run


@pytest.fixture
def bench_records(tmp_path) -> Path:
    rows = plan_rows(["student (no KD)", "KD-DETR general+specific", "Hungarian KD"], [0, 1],
                     ["student (no KD)", "KD-DETR general+specific"])
    dest = tmp_path / "records" / "kd_full"
    records.save_manifest(dest, "dab_detr", "full", rows, TEACHER, ["--schedule", "full", "--variants", "a b"])
    finished = {"student_no_kd_seed0": 20.0, "student_no_kd_seed1": 22.0, "kd_detr_general_specific_seed0": 30.0,
                "kd_detr_general_specific_seed1": 33.0, "hungarian_kd_seed0": 25.0}
    for slug, ap in finished.items():
        records.save_run(fake_run(tmp_path, slug, [None, ap - 1, ap + 1], ap), dest / slug)
    return dest


def test_rows_keep_each_variants_seeds_together_and_in_the_given_order():
    rows = plan_rows(["KD-DETR general+specific", "Hungarian KD", "student (no KD)"], [0, 1],
                     ["student (no KD)", "KD-DETR general+specific"])
    assert [(r.variant, r.seed) for r in rows] == [("KD-DETR general+specific", 0), ("KD-DETR general+specific", 1),
                                                   ("Hungarian KD", 0), ("student (no KD)", 0), ("student (no KD)", 1)]
    assert rows[1].slug == "kd_detr_general_specific_seed1"
    assert plan_rows(["Hungarian KD"], [], []) == [Row("Hungarian KD")] and Row("Hungarian KD").slug == "hungarian_kd"


def test_full_schedule_is_the_teachers(tmp_path):
    (tmp_path / "config.yaml").write_text("train: {epochs: 30, lr_drop_epochs: [26], batch_size: 8}\n")
    assert schedule_overrides("full", tmp_path) == ["train.epochs=30", "train.lr_drop_epochs=[26]",
                                                    "train.eval_every=2"]
    assert schedule_overrides("short", tmp_path) == []
    with pytest.raises(UserError, match="config.yaml: not found"):
        schedule_overrides("full", tmp_path / "nowhere")


def test_records_hold_no_weights_and_load_back(bench_records):
    bench = records.load_bench(bench_records)
    assert {p.name for p in (bench_records / "hungarian_kd_seed0").iterdir()} == {
        "config.yaml", "metrics.jsonl", "test_metrics.json", "command.json"}
    assert bench.command == "kddetr bench kd --schedule full --variants 'a b'"
    kd0 = bench.runs[2]
    assert (kd0.slug, kd0.finished, kd0.steps, kd0.final_val["AP"], kd0.test["AP"]) == (
        "kd_detr_general_specific_seed0", True, 750, 31.0, 30.0)
    assert kd0.s_per_step == pytest.approx(0.21)


def test_table_shows_each_seed_their_mean_and_the_gains_on_shared_seeds(bench_records):
    md = report.results_table(records.load_bench(bench_records))
    lines = md.splitlines()
    assert lines[0].startswith("| model | seed | test AP |") and lines[2].startswith("| teacher | – | 46.5 |")
    assert "| student (no KD) | 1 | 22.0 | 22.0 |" in md
    assert "| **student (no KD)** | mean of 0, 1 | **21.0** |" in md
    assert "| **KD-DETR general+specific** | mean of 0, 1 | **31.5** |" in md
    assert "− student (no KD): **+10.5 AP** on test (mean of seeds 0, 1: +10.0, +11.0)" in md
    assert "− Hungarian KD: **+5.0 AP** on test (seed 0)" in md  # seed 0 against seed 0, not the mean
    assert "teacher − KD-DETR general+specific: 15.0 AP on test" in md


def test_unfinished_runs_are_shown_as_such(bench_records, tmp_path):
    (bench_records / "hungarian_kd_seed0" / "test_metrics.json").unlink()
    (bench_records / "student_no_kd_seed1" / "test_metrics.json").unlink()
    md = report.results_table(records.load_bench(bench_records))
    assert "| Hungarian KD | 0 | running: 750 steps recorded |" in md
    assert "mean of 0, 1 | **21.0**" not in md and "− student (no KD)" not in md


def test_readme_blocks_are_regenerated_and_a_stale_one_is_caught(bench_records, tmp_path, capsys):
    readme, details = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    readme.write_text("# x\n\n<!-- results:kd_full -->\nhand-typed 99.9\n<!-- /results -->\nafter\n")
    details.parent.mkdir()
    details.write_text("fresh\n<!-- results:kd_full -->\n<!-- /results -->\n")
    argv = [str(bench_records.parent), "--docs", str(readme), str(details), "--figures", str(tmp_path / "docs")]
    assert report.main([*argv, "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{readme}: results block 'kd_full' differs" in err and f"{details}: results block 'kd_full' differs" in err
    assert report.main(argv) == 0
    text = readme.read_text()
    assert "hand-typed" not in text and "| **KD-DETR general+specific** | mean of 0, 1 | **31.5** |" in text
    assert text.endswith("<!-- /results -->\nafter\n")
    assert details.read_text() == "fresh\n" + text.removeprefix("# x\n\n").removesuffix("after\n")
    assert (tmp_path / "docs" / "results_kd_full.png").stat().st_size > 10_000
    assert report.main([*argv, "--check"]) == 0


def test_a_block_without_records_is_an_error(bench_records, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:missing -->\n<!-- /results -->\n")
    with pytest.raises(UserError, match=re.escape(f"{readme}: results block 'missing' has no records")):
        report.main([str(bench_records.parent), "--docs", str(readme), "--check"])


def test_a_marker_that_opens_no_block_is_an_error(bench_records, tmp_path):
    """A marker the block pattern cannot read (here: a space in its name, or no closing marker) is never skipped."""
    readme = tmp_path / "README.md"
    for text in ("<!-- results:kd full -->\n<!-- /results -->\n", "<!-- results:kd_full -->\ntable\n"):
        readme.write_text(text)
        with pytest.raises(UserError, match=re.escape(f"{readme}: results marker '{text.splitlines()[0]}' opens no")):
            report.main([str(bench_records.parent), "--docs", str(readme), "--check"])


def test_a_glob_with_a_character_class_picks_those_records(bench_records, tmp_path):
    for seed in (0, 1, 2):
        shutil.copytree(bench_records, tmp_path / "records" / "probes" / f"p_seed{seed}")
    benches = report.find_benches([tmp_path / "records"])
    text = "<!-- results:kd_full,probes/p_seed[01] -->\n<!-- /results -->\n"
    new, changed = report.update_document(text, benches)
    assert changed == ["kd_full,probes/p_seed[01]"]
    assert "`p_seed0`" in new and "`p_seed1`" in new and "p_seed2" not in new


@pytest.mark.parametrize("doc", report.DOCS)
def test_every_results_table_in_the_docs_is_what_the_committed_records_give(doc):
    text = (REPO / doc).read_text()
    assert report.BLOCK.search(text), f"{doc} has no results block"
    _, changed = report.update_document(text, report.find_benches([REPO / "benchmarks" / "results"]))
    assert changed == [], f"stale tables in {doc} (run `kddetr bench report`): {changed}"


def test_a_finished_benchmark_states_its_wall_time(bench_records):
    bench = records.load_bench(bench_records)
    assert bench.minutes is None and "wall time" not in report.results_table(bench)
    manifest = json.loads((bench_records / "bench.json").read_text())
    (bench_records / "bench.json").write_text(json.dumps(manifest | {"minutes": 12.34}))
    assert report.results_table(records.load_bench(bench_records)).endswith(
        "- wall time of the whole command: 12.3 min")


def test_a_printing_benchmark_is_recorded_whole_and_put_back_in_its_block(tmp_path):
    records.save_output(tmp_path / "speed_kd", "kddetr bench speed --only kd", "### KD overhead\n\n| a | b |")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:speed_kd -->\nold\n<!-- /results -->\n")
    assert report.main([str(tmp_path), "--docs", str(readme), "--figures", str(tmp_path / "docs")]) == 0
    assert readme.read_text() == ("<!-- results:speed_kd -->\n```bash\nkddetr bench speed --only kd\n```\n\n"
                                  "### KD overhead\n\n| a | b |\n<!-- /results -->\n")
    assert not (tmp_path / "docs").exists()  # nothing to draw for printed tables


def test_a_comparison_block_tables_several_records_by_what_each_command_sets(tmp_path):
    """`<!-- results:base,probes/* -->`: one row per run of each, labelled by the `--set` (or teacher, config,
    arch) its command adds to what all share, the commands listed, one figure of every curve; nested records are found."""
    rows = plan_rows(["KD-DETR general+specific"], [], [])
    shared = ["--set", "train.epochs=7"]
    for name, extra, ap in (("base", [], 23.0), ("probes/kd_uniform", ["--set", "kd.general_distribution=uniform"],
                                                  21.0), ("probes/kd_other_teacher", ["--teacher", "t2"], 20.0),
                          ("probes/kd_teacher_set", ["--teacher-set", "model.dropout=0.2"], 19.0)):
        dest = tmp_path / "records" / name
        records.save_manifest(dest, "dab_detr", "short", rows, TEACHER, ["--demo", *shared, *extra])
        records.save_run(fake_run(tmp_path / name.replace("/", "_"), rows[0].slug, [ap - 2, ap], ap + 1),
                         dest / rows[0].slug)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:base,probes/kd_* -->\n<!-- /results -->\n")
    argv = [str(tmp_path / "records"), "--docs", str(readme), "--figures", str(tmp_path / "docs")]
    assert report.main(argv) == 0
    text = readme.read_text()
    assert "- `kd_uniform`: `kddetr bench kd --demo --set train.epochs=7 --set kd.general_distribution=uniform`" in text
    assert "| `base` | none beyond the shared ones | KD-DETR general+specific | config | 23.0 | 24.0 | 500 |" in text
    assert "| `kd_uniform` | `kd.general_distribution=uniform` | KD-DETR general+specific | config | 21.0 | 22.0 |" in text
    assert "| `kd_other_teacher` | `--teacher t2` | KD-DETR general+specific | config | 20.0 | 21.0 |" in text
    assert "| `kd_teacher_set` | `--teacher-set model.dropout=0.2` | KD-DETR general+specific | config | 19.0 |" in text
    assert (tmp_path / "docs" / "results_base_probes_kd.png").stat().st_size > 10_000
    assert report.main([*argv, "--check"]) == 0
    readme.write_text("<!-- results:nothing_* -->\n<!-- /results -->\n")
    with pytest.raises(UserError, match="'nothing_\\*' has no records"):
        report.main([*argv, "--check"])


def test_a_comparison_figure_draws_each_distinct_teacher_once():
    """Compared benchmarks of one teacher share its line; another teacher gets its own, named by its benchmark."""
    def bench(name: str, val_ap) -> records.Bench:
        teacher = {} if val_ap is None else {"val": {"AP": val_ap}}
        return records.Bench(name, "kddetr bench kd", "dino", "full", teacher, [])

    assert report.teacher_lines([bench("a", 57.71), bench("b", 57.68), bench("c", None)]) == [("teacher 57.7", 57.71)]
    assert report.teacher_lines([bench("a", 57.7), bench("b", 65.66), bench("c", 57.7)]) == [
        ("teacher of a 57.7", 57.7), ("teacher of b 65.7", 65.66)]
    assert report.teacher_lines([bench("c", None)]) == []


def test_every_committed_record_was_made_by_the_config_its_command_makes_today(monkeypatch):
    monkeypatch.chdir(REPO)
    assert report.drifted_records([Path("benchmarks/results")]) == []


def test_a_record_whose_config_is_not_its_commands_is_caught(monkeypatch, tmp_path, capsys):
    """A committed record copied and its config edited (as if the config file had changed since it ran)."""
    monkeypatch.chdir(REPO)
    source = Path("benchmarks/results/kd_dino")
    copy = shutil.copytree(source, tmp_path / "records" / "kd_dino")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:kd_dino -->\n<!-- /results -->\n")
    argv = [str(copy.parent), "--docs", str(readme), "--figures", str(tmp_path / "docs")]
    assert report.main(argv) == 0 and report.main([*argv, "--check"]) == 0
    config = copy / "student_no_kd_seed0" / "config.yaml"
    config.write_text(config.read_text().replace("num_queries: 30", "num_queries: 20", 1))
    assert report.main([*argv, "--check"]) == 1
    assert "student_no_kd_seed0: model.num_queries: 20 -> 30" in capsys.readouterr().err


def _glance_bench(name: str, runs: list, teacher_arch: str = "dino", teacher_ap: float = 60.0) -> records.Bench:
    """A benchmark of finished runs given as (variant, seed, test AP, steps, student arch)."""
    made = [records.RunRecord(variant, seed, f"r{seed}", [{"step": steps, "AP": ap}], {"AP": ap},
                              {"model": {"arch": student}}) for variant, seed, ap, steps, student in runs]
    return records.Bench(name, "kddetr bench kd", "dino", "full", {"test": {"AP": teacher_ap}}, made,
                         teacher_arch=teacher_arch)


def test_a_glance_row_pairs_each_seed_of_the_student_alone_with_the_distilled_one():
    alone = [("student (no KD)", 0, 40.0, 500, "faster_rcnn"), ("student (no KD)", 1, 44.0, 500, "faster_rcnn")]
    kd = [("KD-DETR general+specific", 0, 43.0, 500, "faster_rcnn"), ("Hungarian KD", 0, 30.0, 500, "faster_rcnn")]
    benches = {"base": _glance_bench("base", alone + kd),
               "probes/a_seed1": _glance_bench("probes/a_seed1", [("KD-DETR specific", 1, 44.5, 500, "faster_rcnn")],
                                               teacher_arch="dab_detr", teacher_ap=50.0),
               "probes/a_seed0": _glance_bench("probes/a_seed0", [("KD-DETR specific", 0, 42.0, 500, "faster_rcnn")],
                                               teacher_arch="dab_detr", teacher_ap=50.0)}
    lines = report.glance("glance:base,base+probes/a_seed*", benches).splitlines()
    # the first row: KD-DETR general+specific of `base` (not its Hungarian KD) on the one seed it has
    assert lines[2] == "| DINO → Faster R-CNN | 500 | 0 | 40.0 | 43.0 | **+3.0** | 60.0 | 15% | `base` |"
    # the second: the student alone from `base`, the distilled runs and the teacher from the last records
    assert lines[3] == ("| DAB-DETR → Faster R-CNN | 500 | 0, 1 | 42.0 | 43.2 | **+1.2** (+2.0, +0.5) | 50.0 | 16% | "
                        "`base` + `probes/a_seed*` |")
    assert lines[-1].startswith("AP on test; the student columns are means over the seeds shown; gap closed:")
    # a teacher that is not above the student alone leaves no gap to close
    weak = {"base": benches["base"], "weak": _glance_bench("weak", [kd[0]], teacher_ap=39.0)}
    assert "| 39.0 | – | `base` + `weak` |" in report.glance("glance:base+weak", weak)


def test_a_glance_row_refuses_other_schedules_and_ambiguous_variants():
    alone = ("student (no KD)", 0, 40.0, 500, "dino")
    benches = {"short": _glance_bench("short", [alone]),
               "long": _glance_bench("long", [("KD-DETR specific", 0, 45.0, 5000, "dino")]),
               "two": _glance_bench("two", [("KD-DETR specific", 0, 45.0, 500, "dino"),
                                            ("KD-DETR general", 0, 44.0, 500, "dino")])}
    with pytest.raises(UserError, match="different schedules \\(500 and 5000 steps\\)"):
        report.glance("glance:short+long", benches)
    with pytest.raises(UserError, match="2 distilled variants \\(KD-DETR specific, KD-DETR general\\)"):
        report.glance("glance:short+two", benches)
    running = {"short": benches["short"], "late": records.Bench("late", "c", "dino", "full", {"test": {"AP": 60.0}},
                                                                 [records.RunRecord("KD-DETR specific", 0, "r0")])}
    row = "| – | – | – | running | – | 60.0 | – | `short` + `late` |"
    assert row in report.glance("glance:short+late", running)

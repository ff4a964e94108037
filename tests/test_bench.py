import json

from kddetr.bench.kd_gain import VARIANTS, _final, _slug, table


def test_variant_slugs_are_distinct_paths():
    slugs = [_slug(n) for n in VARIANTS]
    assert len(set(slugs)) == len(slugs)
    assert _slug("student (no KD)") == "student_no_kd"
    assert _slug("KD-DETR general+specific") == "kd_detr_general_specific"


def test_final_row_is_the_last_evaluated_epoch_not_the_best(tmp_path):
    rows = [{"epoch": 1, "s_per_step": 0.1, "AP": 9.0}, {"epoch": 2, "s_per_step": 0.1},
            {"epoch": 3, "s_per_step": 0.1, "AP": 7.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert _final(tmp_path)["AP"] == 7.0


def test_table_formats_missing_sizes_as_dash():
    md = table([("student", {"AP": 5.0, "AP50": 17.6, "AP75": 0.8, "APs": 3.6, "APm": 8.6, "APl": -1.0}, 0.25)],
               {"AP": 40.0, "AP50": 70.0, "AP75": 40.0, "APs": 30.0, "APm": 50.0, "APl": -1.0})
    lines = md.splitlines()
    assert lines[2].startswith("| teacher | 40.0 | 70.0") and lines[3].endswith("| – | 0.250 |")

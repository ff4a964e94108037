"""`kddetr bench speed --quick` prints every table; the speed options leave the training step's results unchanged."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kddetr.bench import speed
from kddetr.config import load_config
from kddetr.data.synth import generate
from kddetr.engine.checkpoint import DatasetInfo, save_checkpoint
from kddetr.models.build import build_detector

TINY = Path(__file__).parent / "fixtures" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    generate(root / "data", num_train=4, num_val=1, size=64, seed=0)
    cfg = load_config(TINY, ["model.hidden_dim=48"])
    torch.manual_seed(0)
    save_checkpoint(root / "teacher", build_detector(cfg.model, 10), cfg,
                    DatasetInfo(list(range(10)), [f"digit_{i}" for i in range(10)]))
    return root / "data", root / "teacher"


def test_quick_run_prints_every_table(tiny_run, capsys) -> None:
    data, teacher = tiny_run
    assert speed.main(["--quick", "--config", str(TINY), "--teacher", str(teacher), "--data", str(data),
                       "--batch-size", "2", "--general-points", "6", "--specific-points", "12",
                       "--set", "model.denoising.enabled=true", "--loader-workers", "1"]) == 0  # embedded: DN
    out = capsys.readouterr().out
    titles = re.findall(r"^### (.+)$", out, flags=re.M)
    starts = ["KD overhead", "vs HF transformers", "inference", "memory", "scaling: KD step vs general points",
              "scaling: image size", "input pipeline: KD step, batch 2", "threads: wall-clock", "ops: a KD step"]
    assert len(titles) == len(starts) and all(t.startswith(s) for t, s in zip(titles, starts)), titles
    assert "6 general + 12 specific points" in titles[0]  # the teacher got 12 queries for the specific points
    kd_rows = dict(re.findall(r"^\| (KD step \(\w+\)|student step|teacher forward) \| [\d.e-]+ \| ([\d.e-]+) \|$",
                              out.split("### threads")[0], flags=re.M))
    assert set(kd_rows) == {"student step", "teacher forward", "KD step (separate)", "KD step (batch)"}
    assert abs(float(kd_rows["student step"]) + float(kd_rows["teacher forward"]) - 1) < 1e-2  # ratios to their sum
    assert len(re.findall(r"^\| part: (student step decoding the points too|teacher forward over the points) \|",
                          out, flags=re.M)) == 2
    assert re.search(r"^KD step \(batch\) / the sum of its parts .*: [\d.]+$", out, flags=re.M)
    hf_rows = re.findall(r"^\| (DAB-DETR|Deformable DETR|RT-DETR) \| (train step|train step, backbone frozen|inference) \|.*"
                         r"\| ([\d.e-]+) \|$", out, flags=re.M)
    if "skipped" not in out:
        assert len(hf_rows) == 9 and all(float(diff) < 1e-4 for *_, diff in hf_rows)  # same weights, same outputs
    assert re.search(r"^\| distilled student \| [\d.]+ \| [\d.]+ \|$", out, flags=re.M)
    assert len(re.findall(r"^\| (train|KD|inference) \| [\d.]+ \|", out, flags=re.M)) == 3
    assert len(re.findall(r"^\| [048] \| [\d.e-]+ \|", out, flags=re.M)) == 3  # 0, 4 and 8 points
    loader = dict(re.findall(r"^\| (batches in memory|DataLoader, \d workers) \| [\d.e-]+ \| ([\d.]+) \|$", out,
                             flags=re.M))
    assert set(loader) == {"batches in memory", "DataLoader, 0 workers", "DataLoader, 1 workers"}
    assert float(loader["batches in memory"]) == 1.0


def test_threads_and_ops_tables_time_each_thread_count(tiny_run, capsys) -> None:
    """On 2 threads: each step timed on 1 and 2 threads, the KD step's ops profiled on both; the count restored."""
    data, teacher = tiny_run
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert speed.main(["--quick", "--only", "threads", "--only", "ops", "--config", str(TINY), "--teacher",
                           str(teacher), "--data", str(data), "--batch-size", "2", "--general-points", "4"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "| step | 1 thread | 2 threads | speed-up 1 → 2 |" in out
    steps = re.findall(r"^\| (student step|teacher forward|KD step) \| ([\d.e-]+) \| ([\d.e-]+) \| ([\d.e-]+) \|$",
                       out, flags=re.M)
    assert [s[0] for s in steps] == ["student step", "teacher forward", "KD step"]
    assert all(abs(float(one) / float(two) / float(ratio) - 1) < 0.1 for _, one, two, ratio in steps), steps
    ops = re.findall(r"^\| ([^|]+?) \| ([\d.e-]+) \| ([\d.e-]+) \| ([\d.e-]+) \| ([\d.e-]+) \|$", out,
                     flags=re.M)
    assert ops[-1][:2] == ("all ops", "1.000") and len(ops) == 9
    assert any(name.startswith("aten::") for name, *_ in ops)
    shares = [float(share) for _, share, *_ in ops[:-1]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1.0 + 1e-6


def test_teacher_from_a_config_at_another_image_size(tiny_run, capsys) -> None:
    """A YAML teacher is built with random weights (no checkpoint of that size needed); --image-size resizes."""
    data, _ = tiny_run
    assert speed.main(["--quick", "--only", "kd", "--config", str(TINY), "--teacher", str(TINY), "--data", str(data),
                       "--batch-size", "2", "--general-points", "4", "--specific-points", "0",
                       "--image-size", "48"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 at (48, 48) px" in out
    assert f"4 general + {load_config(TINY).model.num_queries} specific points" in out



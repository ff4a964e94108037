"""`make gpu-check` (one line and exit 0 without a GPU; its checks run and can fail on any device) and the
COCO-scale benchmark."""
import json
from pathlib import Path

import pytest
import torch

from kddetr.bench import coco_scale, gpu_check
from kddetr.data.synth import generate

REPO = Path(__file__).parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu-check runs for real")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert out == "gpu-check: no CUDA device is visible on this machine; nothing to check\n"


def test_parity_compares_cpu_with_the_device_and_fails_past_the_tolerance(monkeypatch):
    monkeypatch.chdir(REPO)
    check = gpu_check.parity("deformable_detr", torch.device("cpu"))
    assert check.ok and check.detail.startswith("max abs error 0.0e+00")
    monkeypatch.setattr(gpu_check, "PARITY_TOLERANCE", -1.0)  # nothing passes a negative tolerance
    assert not gpu_check.parity("dab_detr", torch.device("cpu")).ok


def test_amp_distill_steps_lower_the_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    generate(tmp_path / "data", num_train=16, num_val=2, size=64, seed=0)
    check = gpu_check.amp_steps("distill", torch.bfloat16, torch.device("cpu"), tmp_path / "data",
                                REPO / "assets" / "teacher", steps=4)
    assert check.ok and check.name == "distill 4 steps, bfloat16 autocast" and "→" in check.detail


def test_a_failing_command_is_a_failed_row_and_the_table_names_the_device():
    ok = gpu_check.command("true", ["python", "-c", "print('fine')"])
    bad = gpu_check.command("false", ["python", "-c", "import sys; sys.exit('broken')"])
    assert ok.ok and not bad.ok and bad.detail == "broken"
    md = gpu_check.table([ok, bad], "NVIDIA H100")
    assert md.startswith("gpu-check on NVIDIA H100") and "| false | FAILED | broken |" in md
    assert "| ok | a \\| b | 0 |" in gpu_check.table([gpu_check.Check("pipe", True, "a | b")], "x")


def test_records_hold_the_command_the_table_and_what_the_commands_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    printing = gpu_check.command("speed", ["python", "-c", "print('| step | s |')"])
    monkeypatch.setattr(gpu_check, "checks", lambda *args: [("speed", lambda: printing),
                                                            ("broken", lambda: 1 / 0)])
    assert gpu_check.main(["--device", "cpu", "--records", str(tmp_path / "rec")]) == 1  # one check failed
    record = json.loads((tmp_path / "rec" / "output.json").read_text())
    assert record["command"] == f"kddetr bench gpu-check --device cpu --records {tmp_path / 'rec'}"
    assert record["output"].startswith("gpu-check on cpu") and record["output"].endswith("| step | s |")
    assert "| broken | FAILED | ZeroDivisionError: division by zero |" in record["output"]


def test_coco_scale_bench_loads_and_scores_what_it_generates(capsys):

    coco = coco_scale.make_annotations(30, 200, 80)
    assert len(coco["images"]) == 30 and len(coco["annotations"]) == 200 and len(coco["categories"]) == 80
    results = coco_scale.detections_for(coco, 10)
    assert len(results) == 300 and {r["image_id"] for r in results} == set(range(1, 31))
    assert coco_scale.main(["--images", "300", "--boxes", "2000", "--eval-images", "20", "--detections", "30",
                            "--train-images", "0"]) == 0
    out = capsys.readouterr().out
    assert "| load annotations (CocoDetection) | 300 images, 2000 boxes, 80 classes |" in out
    assert "| COCO evaluation (faster-coco-eval) | 20 images x 30 detections |" in out



def test_tree_memory_counts_pages_shared_with_a_forked_worker_once():
    """A loader worker forked from the trainer shares its pages: summed RSS would count them twice, PSS once."""
    import os
    import time

    alone = coco_scale._tree_pss_mib(os.getpid())
    assert 100 < alone < 1e5  # this process, torch imported
    child = os.fork()
    if child == 0:
        time.sleep(3)
        os._exit(0)
    try:
        time.sleep(0.5)
        assert coco_scale._tree_pss_mib(os.getpid()) < 1.2 * alone
    finally:
        os.waitpid(child, 0)

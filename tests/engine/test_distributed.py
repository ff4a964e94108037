"""DistributedDataParallel training with torchrun: 2 gloo processes on CPU against one process."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from kddetr.cli import main
from kddetr.data.synth import generate

TINY = Path(__file__).parent.parent / "fixtures" / "tiny.yaml"
# Identical images on every process: no random crop or flip (tiny.yaml has no flip, one size), and frozen
# BatchNorm, whose batch statistics would otherwise differ between 2 half batches and 1 full batch.
SAME_DATA = ["--set", "data.random_crop=false", "--set", "model.backbone.frozen_bn=true",
             "--set", "train.eval_every=0", "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=8, num_val=4, size=64, seed=0)
    return root


def _torchrun(*args: str) -> None:
    """`torchrun --standalone --nproc_per_node 2 -m kddetr ARGS` (the OS picks a free rendezvous port)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kddetr", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _max_diff(run_a: Path, run_b: Path) -> float:
    a, b = (load_file(str(r / "last" / "model.safetensors")) for r in (run_a, run_b))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_ranks_of_two_cover_the_single_process_batch_of_four():
    """Rank r takes items r, r + 2, ... of the shared permutation, so step k of both ranks together is
    items 4k..4k+3 of it: exactly the one-process batch of 4 at step k, in another order."""
    data = list(range(10))
    single = list(DistributedSampler(data, num_replicas=1, rank=0, seed=3, drop_last=True))
    ranks = [list(DistributedSampler(data, num_replicas=2, rank=r, seed=3, drop_last=True)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    for step in range(2):
        together = ranks[0][2 * step:2 * step + 2] + ranks[1][2 * step:2 * step + 2]
        assert sorted(together) == sorted(single[4 * step:4 * step + 4])


def test_two_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    _torchrun("train", str(TINY), "--data", str(data_dir), "--out", str(tmp_path / "ddp"), "--batch-size", "2",
              *SAME_DATA)
    assert main(["train", str(TINY), "--data", str(data_dir), "--out", str(tmp_path / "one"), "--batch-size", "4",
                 *SAME_DATA]) == 0
    init = tmp_path / "init"
    assert main(["train", str(TINY), "--data", str(data_dir), "--out", str(init), "--batch-size", "4",
                 "--set", "train.lr=0", "--set", "train.lr_backbone=0", "--set", "train.max_steps=1", *SAME_DATA]) == 0
    diff = _max_diff(tmp_path / "ddp", tmp_path / "one")
    print(f"max |w_2proc - w_1proc| after 4 steps: {diff:.2e}")
    assert diff < 1e-4
    assert _max_diff(tmp_path / "one", init) > 2e-3  # 4 AdamW steps of lr 1e-3 moved them 20× the tolerance
    ddp_rows, one_rows = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                          for r in ("ddp", "one"))
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in one_rows] == [2, 4]
    # the logged losses are the means over both processes, i.e. the losses of the full batch
    assert ddp_rows[-1]["train/loss"] == pytest.approx(one_rows[-1]["train/loss"], rel=1e-5)


def test_distillation_with_two_processes_writes_one_run(data_dir, tmp_path):
    teacher = tmp_path / "teacher"
    assert main(["train", str(TINY), "--data", str(data_dir), "--out", str(teacher), "--epochs", "1",
                 "--set", "model.hidden_dim=48", "--no-progress"]) == 0
    out = tmp_path / "kd"
    _torchrun("distill", str(TINY), "--data", str(data_dir), "--out", str(out), "--teacher", str(teacher / "last"),
              "--epochs", "1", "--batch-size", "2", "--no-progress")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and "train/general/kd_cls" in json.loads(rows[0]) and "AP" in json.loads(rows[0])
    assert len(list((out / "tb").glob("events.*"))) == 1
    assert sorted(p.name for p in out.iterdir()) == ["best", "config.yaml", "last", "metrics.jsonl", "tb"]
    state = torch.load(out / "last" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2  # 8 images / (2 processes × 2)


@pytest.mark.slow
def test_resume_with_two_processes_continues_the_run(data_dir, tmp_path):
    args = ["train", str(TINY), "--data", str(data_dir), "--batch-size", "2", *SAME_DATA]
    _torchrun(*args, "--out", str(tmp_path / "straight"), "--epochs", "2")
    _torchrun(*args, "--out", str(tmp_path / "split"), "--epochs", "1")
    _torchrun(*args, "--out", str(tmp_path / "split"), "--epochs", "2", "--resume")
    assert _max_diff(tmp_path / "straight", tmp_path / "split") < 1e-6
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 2


# `torchrun ... killer.py STEP ARGS...`: `kddetr ARGS` in which rank 1 SIGKILLs itself after its STEP-th step
RANK1_KILLER = """
import os, signal, sys
import kddetr.engine.train as train
nth, seen, step = int(sys.argv[1]), [0], train.Trainer.train_step

def train_step(self, *args, **kwargs):
    result = step(self, *args, **kwargs)
    seen[0] += 1
    if os.environ["RANK"] == "1" and seen[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
train.Trainer.train_step = train_step
from kddetr.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow  # kill and resume are checked in one process by test_kill_resume.py, two processes here
def test_a_killed_rank_stops_the_job_and_resume_finishes_identically(data_dir, tmp_path):
    """One rank dies mid-epoch: torchrun stops the other within a bounded time, names the dead rank, and
    `--resume` ends exactly where an uninterrupted run does."""
    args = ["train", str(TINY), "--data", str(data_dir), "--batch-size", "2", "--epochs", "3", *SAME_DATA]
    killer = tmp_path / "killer.py"
    killer.write_text(RANK1_KILLER)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    start = time.time()
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(killer), "3", *args, "--out", str(tmp_path / "killed")],
                            env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.time() - start
    assert killed.returncode != 0 and elapsed < 120, (elapsed, killed.stderr[-2000:])
    assert "rank      : 1" in killed.stderr and "Signal 9 (SIGKILL)" in killed.stderr
    state = torch.load(tmp_path / "killed" / "last" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 1  # step 3 is the first of epoch 2: epoch 1's checkpoint is the last
    _torchrun(*args, "--out", str(tmp_path / "killed"), "--resume")
    _torchrun(*args, "--out", str(tmp_path / "straight"))
    assert _max_diff(tmp_path / "straight", tmp_path / "killed") == 0
    rows = [[{k: v for k, v in json.loads(l).items() if k not in ("time_s", "s_per_step")}
             for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("straight", "killed")]
    assert rows[0] == rows[1] and len(rows[0]) == 3

"""Crash safety: a `kddetr train` process killed with SIGKILL resumes to bit-identical checkpoints and metrics."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kddetr.config import Config
from kddetr.data.synth import generate
from kddetr.engine.checkpoint import DatasetInfo, load_state_dict_file, recover_checkpoint, save_checkpoint

TINY = Path(__file__).parents[1] / "fixtures" / "tiny.yaml"
EPOCHS = 4  # of 2 steps each (8 images, batch 4)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
KDDETR = (sys.executable, "-m", "kddetr")

# `python -c KILLER POINT N ARGS...` runs `kddetr ARGS...` and SIGKILLs itself at the N-th POINT:
# step: after a training step; write: in the temp dir of a `last` save, weights written, trainer state not yet;
# rename: between a save's two renames (`last` -> `last.old` done, temp dir -> `last` not yet);
# nospace: the N-th write of a `last` checkpoint's weights fails with ENOSPC (a full disk) instead of a kill.
KILLER = """
import os, signal, sys
import kddetr.engine.checkpoint as checkpoint
import kddetr.engine.train as train
point, nth, seen = sys.argv[1], int(sys.argv[2]), [0]

def kill_after(fn, matches):
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        seen[0] += matches(*args)
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

if point == "step":
    train.Trainer.train_step = kill_after(train.Trainer.train_step, lambda *a: True)
elif point == "write":
    checkpoint.save_file = kill_after(checkpoint.save_file, lambda tensors, file: ".last." in str(file))
elif point == "rename":
    os.replace = kill_after(os.replace, lambda src, dst: str(dst).endswith("last.old"))
elif point == "nospace":
    import errno
    real_save = checkpoint.save_file

    def full_disk(tensors, file, *args, **kwargs):
        seen[0] += ".last." in str(file)
        if seen[0] == nth and ".last." in str(file):
            open(file, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_save(tensors, file, *args, **kwargs)
    checkpoint.save_file = full_disk
from kddetr.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(TINY), "--data", str(data), "--out", str(out), "--epochs", str(EPOCHS), "--no-progress",
            *extra]


def _finish(argv: list[str]) -> None:
    proc = subprocess.run([*KDDETR, *argv], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _killed_at(point: str, nth: int, argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, point, str(nth), *argv], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point} #{nth}: {proc.stderr}"


def _killed_when(ready: Callable[[], bool], argv: list[str], delay: float = 0.0) -> bool:
    """Run `kddetr argv`; SIGKILL it from outside `delay` s after `ready()` first holds. False: it ended first."""
    proc = subprocess.Popen([*KDDETR, *argv], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not ready() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            return False
        proc.send_signal(signal.SIGKILL)
        return True
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def _records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("time_s", "s_per_step")} for row in rows]


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical `last` and `best` checkpoints, the same trainer state (optimiser, schedule, RNGs, sampler)
    and the same metrics records."""
    # compared by value: the files' bytes also hold key orders, object identities and torch.save's random id
    for name in ("last", "best"):
        assert _equal(load_file(str(a / name / "model.safetensors")), load_file(str(b / name / "model.safetensors")))
        assert (a / name / "config.yaml").read_text() == (b / name / "config.yaml").read_text()
    states = [{k: v for k, v in torch.load(run / "last" / "trainer_state.pt", weights_only=True).items()
               if k != "time_s"} for run in (a, b)]
    assert _equal(*states), "trainer_state.pt differs"
    assert _records(a) == _records(b)
    assert [row["epoch"] for row in _records(b)] == list(range(1, EPOCHS + 1))
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())  # no leftovers


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=8, num_val=4, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The uninterrupted run every killed one must match."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _finish(_args(data, out))
    return out


def test_killed_after_first_checkpoint_resumes_bit_identical(data, straight, tmp_path):
    out = tmp_path / "run"
    assert _killed_when(lambda: (out / "last" / "trainer_state.pt").is_file(), _args(data, out))
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
    _finish(_args(data, out, "--resume"))
    assert_same_run(straight, out)
    times = [json.loads(line)["time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert times == sorted(times) and times[0] > 0  # the resumed run's clock goes on from the killed one's


def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(data, straight, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLER, "nospace", "2", *_args(data, out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{out / 'last'}: cannot write the checkpoint (No space left on device); the previous checkpoint there " \
           "is kept" in proc.stderr
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["epoch"] == 1  # whole and loadable
    assert sorted(p.name for p in out.iterdir()) == ["best", "config.yaml", "last", "metrics.jsonl", "tb"]
    _finish(_args(data, out, "--resume"))  # space freed: the run goes on as if nothing happened
    assert_same_run(straight, out)


def _tiny_checkpoint(path: Path, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    save_checkpoint(path, model, Config(), DatasetInfo([1, 2], ["a", "b"]), {"epoch": seed})
    return model


def test_save_killed_between_renames_recovers_previous(tmp_path, monkeypatch):
    path = tmp_path / "last"
    first = _tiny_checkpoint(path, seed=1)
    real = os.replace

    def die_before_second_rename(src, dst):
        if Path(src) == path.with_name(".last.tmp"):
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line of save_checkpoint runs
        real(src, dst)

    monkeypatch.setattr(os, "replace", die_before_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _tiny_checkpoint(path, seed=2)
    monkeypatch.setattr(os, "replace", real)
    assert not path.exists() and (tmp_path / "last.old").is_dir()
    recover_checkpoint(path)
    assert torch.equal(load_state_dict_file(path / "model.safetensors")["weight"], first.weight)
    assert torch.load(path / "trainer_state.pt")["epoch"] == 1
    second = _tiny_checkpoint(path, seed=3)  # the next save goes through and leaves nothing else behind
    assert torch.equal(load_state_dict_file(path / "model.safetensors")["weight"], second.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "distill"])
def test_killed_at_many_points_resumes_bit_identical(data, straight, tmp_path, command):
    """Mid-epoch, while a checkpoint is written, between its renames and at random moments: always identical."""
    out = tmp_path / "run"
    extra = ["--teacher", str(straight / "last")] if command == "distill" else []
    argv = [command, *_args(data, out, *extra)[1:]]
    reference = straight
    if command == "distill":
        reference = tmp_path / "reference"
        _finish([command, *_args(data, reference, *extra)[1:]])
    _killed_at("step", 3, argv)  # the first step of epoch 2
    assert [row["epoch"] for row in _records(out)] == [1]
    _killed_at("write", 1, [*argv, "--resume"])  # writing epoch 2's checkpoint
    _killed_at("rename", 1, [*argv, "--resume"])  # swapping epoch 2's checkpoint in
    assert not (out / "last").exists() and (out / "last.old").is_dir()
    rng = random.Random(0)  # then wherever the clock says: in start-up, a step, an evaluation or a save
    kills = [_killed_when(lambda: True, [*argv, "--resume"], delay=rng.uniform(0.5, 3.5)) for _ in range(3)]
    assert any(kills)
    if not (out / "last").exists():  # the last kill came between two renames
        assert (out / "last.old").is_dir()
    _finish([*argv, "--resume"])
    assert_same_run(reference, out)

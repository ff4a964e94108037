"""Load: `kddetr predict` and `kddetr eval` stream 1,000 images in memory that barely grows with the count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kddetr.config import load_config
from kddetr.engine.checkpoint import DatasetInfo, save_checkpoint
from kddetr.models.build import build_detector

TINY = Path(__file__).parents[1] / "fixtures" / "tiny.yaml"
SIZE = 64
MIB = 1024  # ru_maxrss is in KiB on Linux


def _write_split(root: Path, count: int, seed: int = 0) -> Path:
    """`count` noise JPEGs with one random box each, as the `val` split of a COCO dataset at `root`."""
    rng = np.random.default_rng(seed)
    (root / "images" / "val").mkdir(parents=True)
    images, annotations = [], []
    for i in range(1, count + 1):
        name = f"{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "images" / "val" / name)
        images.append({"id": i, "file_name": name, "width": SIZE, "height": SIZE})
        x, y = rng.integers(0, SIZE // 2, 2).tolist()
        annotations.append({"id": i, "image_id": i, "category_id": int(rng.integers(1, 4)), "iscrowd": 0,
                            "bbox": [x, y, 24, 24], "area": 576})
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def _peak_rss_mib(*args: str) -> float:
    """Run `python args` to completion; the peak resident memory of that process alone."""
    proc = subprocess.Popen([sys.executable, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    error = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, error
    return usage.ru_maxrss / MIB


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = load_config(TINY)
    path = tmp_path_factory.mktemp("ckpt") / "best"
    return save_checkpoint(path, build_detector(cfg.model, 3), cfg, DatasetInfo([1, 2, 3], ["c1", "c2", "c3"]))


@pytest.mark.slow
def test_predict_and_eval_memory_is_bounded(checkpoint, tmp_path):
    # torch and torchvision alone are most of the peak (their shared libraries count as resident)
    peaks = {("import", 0): _peak_rss_mib("-c", "import kddetr.engine.runner, kddetr.engine.predict")}
    for count in (100, 1000):
        data = _write_split(tmp_path / f"data{count}", count)
        out = tmp_path / f"pred{count}"
        peaks["predict", count] = _peak_rss_mib("-m", "kddetr", "predict", str(checkpoint),
                                                str(data / "images" / "val"), "--out", str(out),
                                                "--score-threshold", "0.0", "--top-k", "10")
        assert len(list(out.glob("*.png"))) == count
        assert len(json.loads((out / "detections.json").read_text())) == 10 * count
        metrics = tmp_path / f"eval{count}" / "metrics.json"
        peaks["eval", count] = _peak_rss_mib("-m", "kddetr", "eval", str(checkpoint), "--data", str(data),
                                             "--out", str(metrics))
        assert len({r["image_id"] for r in json.loads((metrics.parent / "results.json").read_text())}) == count
    print(" ".join(f"{cmd}@{n}={mib:.0f}MiB" for (cmd, n), mib in peaks.items()))
    for cmd, growth in (("predict", 20), ("eval", 100)):  # eval keeps 100 results per image for COCOeval
        work = peaks[cmd, 1000] - peaks["import", 0]
        assert work < 400, f"{cmd}: {work:.0f} MiB over the imports for 1,000 images"
        assert peaks[cmd, 1000] - peaks[cmd, 100] < growth, f"{cmd}: {peaks} grows with the image count"

"""The committed assets are what the README says: the teacher reproduces its recorded AP."""
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from kddetr.data.synth import generate
from kddetr.engine.checkpoint import read_checkpoint_config
from kddetr.engine.runner import evaluate_checkpoint
from kddetr.registry import REGISTRY

ROOT = Path(__file__).parent.parent
TEACHER = ROOT / "assets" / "teacher"
BACKBONE = ROOT / "assets" / "backbone" / "resnet10_s3.safetensors"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    # the val and test splits of `make demo`, byte for byte
    generate(root, num_train=1, num_val=200, size=128, seed=0, num_test=500)
    return root


SHIPPED = {arch: ROOT / entry.shipped_teacher for arch, entry in REGISTRY.items() if entry.shipped_teacher}
# every committed teacher: each arch's shipped one and the others the README's tables name (e.g. a second DINO)
TEACHERS = {path.name: path for path in sorted((ROOT / "assets").glob("teacher*"))}


@pytest.mark.parametrize(("name", "split"), [
    pytest.param(name, split, marks=[] if split == "val" else [pytest.mark.slow])
    for name in TEACHERS for split in ("val", "test")])  # val shows the weights are the recorded ones; test: slow
def test_committed_teacher_reproduces_recorded_ap(embedded, name, split):
    teacher = TEACHERS[name]
    recorded = json.loads((teacher / f"{split}_metrics.json").read_text())
    metrics = evaluate_checkpoint(teacher, embedded, split, None, progress=False)
    assert abs(metrics["AP"] - recorded["AP"]) <= 0.5
    assert abs(metrics["AP50"] - recorded["AP50"]) <= 0.5


def test_every_benchmarked_pair_ships_its_teacher():
    assert set(SHIPPED) == {"dab_detr", "deformable_detr", "dino", "rt_detr"} and TEACHER == SHIPPED["dab_detr"]
    assert all(read_checkpoint_config(teacher)[0].model.arch == arch for arch, teacher in SHIPPED.items())
    assert set(SHIPPED.values()) <= set(TEACHERS.values())


def test_committed_backbone_is_a_pretrained_resnet10():
    with safe_open(str(BACKBONE), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["arch"] == "resnet10" and meta["num_stages"] == "3" and float(meta["val_acc"]) > 0.8
    assert "conv1.weight" in keys and not any(k.startswith(("fc.", "layer4.")) for k in keys)

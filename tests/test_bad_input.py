"""Bad input through the real CLI: exit code 2, one line naming the file and the record or key, nothing half-written."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import save_file

from kddetr.cli import main
from kddetr.config import load_config
from kddetr.data.coco import CocoDetection
from kddetr.data.synth import generate
from kddetr.engine.checkpoint import DatasetInfo, save_checkpoint
from kddetr.models.build import build_detector

TINY = Path(__file__).parent / "fixtures" / "tiny.yaml"


class Payload:
    """Unpickling this creates the file `marker`: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _snapshot(path: Path) -> Optional[dict[str, bytes]]:
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"" for p in sorted(path.rglob("*"))}


def _half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _shift_categories(coco: dict, by: int = 100) -> None:
    for c in coco["categories"]:
        c["id"] += by
    for a in coco["annotations"]:
        a["category_id"] += by


@dataclass
class Env:
    root: Path
    data: Path  # a fresh copy of the dataset, free to damage
    ckpt: Path  # a fresh copy of a valid checkpoint of the tiny model for that dataset
    out: Path  # where the command writes; must look the same afterwards as before

    @property
    def marker(self) -> Path:
        return self.root / "payload-ran"

    def ann_file(self, split: str = "train") -> Path:
        return self.data / "annotations" / f"instances_{split}.json"

    def edit(self, change: Callable[[dict], object], split: str = "train") -> "Env":
        coco = json.loads(self.ann_file(split).read_text())
        change(coco)
        self.ann_file(split).write_text(json.dumps(coco))
        return self

    def image(self, index: int = 0, split: str = "train") -> Path:
        coco = json.loads(self.ann_file(split).read_text())
        return self.data / "images" / split / coco["images"][index]["file_name"]

    def write(self, path: Path, content: bytes | Image.Image) -> "Env":
        if isinstance(content, Image.Image):
            content.save(path, format="JPEG")
        else:
            path.write_bytes(content)
        return self

    def remove(self, path: Path) -> "Env":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return self

    def truncate(self, path: Path) -> "Env":
        return self.write(path, _half(path))

    def edit_ckpt_config(self, section: str, key: str, value) -> "Env":
        file = self.ckpt / "config.yaml"
        data = yaml.safe_load(file.read_text())
        data[section][key] = value
        file.write_text(yaml.safe_dump(data))
        return self

    def as_arch(self, arch: str) -> "Env":
        """The checkpoint's config as another architecture's with its default options (weights unchanged)."""
        file = self.ckpt / "config.yaml"
        data = yaml.safe_load(file.read_text())
        data["model"].pop(data["model"]["arch"], None)
        data["model"]["arch"] = arch
        file.write_text(yaml.safe_dump(data))
        return self

    def write_run(self, state: object) -> "Env":
        """A run directory at `out` whose `last` checkpoint holds `state` as trainer_state.pt."""
        shutil.copytree(self.ckpt, self.out / "last")
        torch.save(state, self.out / "last" / "trainer_state.pt")
        return self

    def train(self, *args: str, command: str = "train") -> list[str]:
        return [command, str(TINY), "--data", str(self.data), "--out", str(self.out), "--no-progress", *args]

    def distill(self, teacher: Path, *args: str) -> list[str]:
        return self.train("--teacher", str(teacher), *args, command="distill")

    def eval(self, checkpoint: Path, *args: str) -> list[str]:
        return ["eval", str(checkpoint), "--data", str(self.data), "--out", str(self.out / "metrics.json"), *args]

    def predict(self, checkpoint: Path, *inputs: Path) -> list[str]:
        return ["predict", str(checkpoint), *map(str, inputs or [self.data / "images" / "val"]), "--out", str(self.out)]


def _other_teacher(e: Env) -> Path:
    """A checkpoint of the tiny model trained on three other categories."""
    cfg = load_config(TINY)
    return save_checkpoint(e.root / "teacher3", build_detector(cfg.model, 3), cfg,
                           DatasetInfo([1, 2, 3], ["cat", "dog", "bird"]))


def _twelve_queries(e: Env) -> Path:
    """A checkpoint of the tiny model with 12 queries instead of 10, for the same categories."""
    cfg = load_config(TINY, ["model.num_queries=12"])
    return save_checkpoint(e.root / "twelve", build_detector(cfg.model, 10), cfg,
                           DatasetInfo(list(range(1, 11)), [f"digit_{d}" for d in range(10)]))


def _config_file(e: Env, text: str) -> Path:
    path = e.root / "bad.yaml"
    path.write_text(TINY.read_text() + text)
    return path


def _resnet18_weights(e: Env) -> Path:
    path = e.root / "resnet18.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(path))
    return path


def _payload_weights(e: Env) -> Path:
    path = e.root / "backbone.pth"
    torch.save({"conv1.weight": Payload(e.marker)}, path)
    return path


def _photos(e: Env, *files: tuple[str, bytes]) -> Path:
    folder = e.root / "photos"
    folder.mkdir()
    for name, content in files:
        (folder / name).write_bytes(content)
    return folder


def _with_config(argv: list[str], config: Path) -> list[str]:
    return [argv[0], str(config), *argv[2:]]


# id -> (the command, run on a damaged Env; what its one-line message must say: file, record or key, problem)
CASES: dict[str, tuple[Callable[[Env], list[str]], tuple[str, ...]]] = {
    # ---- dataset files
    "missing images dir": (lambda e: e.remove(e.data / "images").train(),
                           ("{root}/data: no image directory for split 'train'",)),
    "missing annotation file": (lambda e: e.remove(e.ann_file()).train(),
                                ("instances_train.json: annotation file not found",)),
    "invalid JSON": (lambda e: e.write(e.ann_file(), b'{"images": [').train(),
                     ("instances_train.json: invalid JSON", "line 1")),
    "JSON without images list": (lambda e: e.edit(lambda c: c.pop("images")).train(),
                                 ("instances_train.json: missing top-level list 'images'",)),
    "image file missing": (lambda e: e.remove(e.image(2)).train(),
                           ("000002.jpg: image file not found", "image id 3 in", "instances_train.json")),
    "image zero bytes": (lambda e: e.write(e.image(1), b"").train(),
                         ("000001.jpg: cannot read image: empty file", "image id 2")),
    "image not an image": (lambda e: e.write(e.image(1), b"<html>404</html>").train(),
                           ("000001.jpg: cannot read image: not in an image format", "image id 2")),
    "image of another size": (lambda e: e.write(e.image(3), Image.new("RGB", (32, 48))).train(),
                              ("000003.jpg: image is 32x48 but", "says 64x64 (image id 4)")),
    "image truncated": (lambda e: e.truncate(e.image(0)).train(),
                        ("000000.jpg: cannot read image: image file is truncated", "image id 1")),
    "image truncated, loader workers": (lambda e: e.truncate(e.image(0)).train("--set", "data.num_workers=1"),
                                        ("000000.jpg: cannot read image: image file is truncated",)),
    # ---- annotation records
    "unknown image id": (lambda e: e.edit(lambda c: c["annotations"][2].update(image_id=999)).train(),
                         ("instances_train.json: annotations[2] (id 3): image_id 999 is not in 'images'",)),
    "unknown category id": (lambda e: e.edit(lambda c: c["annotations"][1].update(category_id=42)).train(),
                            ("instances_train.json: annotations[1] (id 2): category_id 42 is not in",)),
    "negative box width": (lambda e: e.edit(lambda c: c["annotations"][0].update(bbox=[5, 5, -3, 4])).train(),
                           ("instances_train.json: annotations[0] (id 1): bbox has a negative width",)),
    "negative box height": (lambda e: e.edit(lambda c: c["annotations"][3].update(bbox=[5, 5, 3, -1])).train(),
                            ("instances_train.json: annotations[3] (id 4): bbox has a negative",)),
    "NaN in box": (lambda e: e.edit(lambda c: c["annotations"][0].update(bbox=[1, float("nan"), 3, 4])).train(),
                   ("instances_train.json: annotations[0]: 'bbox' must be 4 finite numbers",)),
    "box of 3 numbers": (lambda e: e.edit(lambda c: c["annotations"][0].update(bbox=[1, 2, 3])).train(),
                         ("instances_train.json: annotations[0]: 'bbox' must be 4 finite numbers",)),
    "duplicate image id": (lambda e: e.edit(lambda c: c["images"][1].update(id=1)).train(),
                           ("instances_train.json: images[1]: duplicate id 1",)),
    "duplicate annotation id": (lambda e: e.edit(lambda c: c["annotations"][4].update(id=2)).train(),
                                ("instances_train.json: annotations[4]: duplicate id 2",)),
    "image record without file_name": (lambda e: e.edit(lambda c: c["images"][0].pop("file_name")).train(),
                                       ("instances_train.json: images[0]: missing field 'file_name'",)),
    "empty dataset": (lambda e: e.edit(lambda c: c.update(images=[], annotations=[])).train(),
                      ("instances_train.json: 0 training images",)),
    "val categories differ from train": (lambda e: e.edit(_shift_categories, split="val").train(),
                                         ("instances_val.json: categories differ",)),
    # ---- config
    "unknown config key (--set)": (lambda e: e.train("--set", "train.lrr=1e-3"),
                                   ("tiny.yaml.train: unknown key 'lrr'. Did you mean 'lr'?",)),
    "unknown config key (file)": (lambda e: _with_config(e.train(), _config_file(e, "trian: {epochs: 1}\n")),
                                  ("bad.yaml: unknown key 'trian'. Did you mean 'train'?",)),
    "wrong value type": (lambda e: e.train("--set", "train.epochs=two"),
                         ("tiny.yaml.train.epochs: expected an integer, got 'two'",)),
    "wrong item type": (lambda e: e.train("--set", "data.train_sizes=[64, big]"),
                        ("tiny.yaml.data.train_sizes[1]: expected an integer",)),
    "value not a choice": (lambda e: e.train("--set", "kd.method=magic"),
                           ("tiny.yaml.kd.method: 'magic' is not one of",)),
    "config file missing": (lambda e: _with_config(e.train(), e.root / "nope.yaml"),
                            ("nope.yaml: config file not found",)),
    "config invalid YAML": (lambda e: _with_config(e.train(), _config_file(e, "train: [1, 2\n")),
                            ("bad.yaml: invalid YAML", "line")),
    "backbone weights missing": (lambda e: e.train("--set", f"model.backbone.weights={e.root / 'r10.pth'}"),
                                 ("r10.pth: backbone weights file not found",)),
    "backbone weights of another ResNet": (
        lambda e: e.train("--set", f"model.backbone.weights={_resnet18_weights(e)}"),
        ("resnet18.safetensors: backbone weights do not fit", "unexpected: layer1.1.")),
    "backbone weights that run code": (lambda e: e.train("--set", f"model.backbone.weights={_payload_weights(e)}"),
                                       ("backbone.pth: refused",)),
    # ---- checkpoints: teacher, eval, predict
    "teacher with other categories": (lambda e: e.distill(_other_teacher(e)),
                                      ("teacher3: category ids differ", "only in data: [4, 5")),
    "teacher not a checkpoint": (lambda e: e.distill(e.data), ("{root}/data: not a checkpoint directory",)),
    "teacher weights truncated": (lambda e: e.truncate(e.ckpt / "model.safetensors").distill(e.ckpt),
                                  ("best/model.safetensors: cannot read safetensors weights",)),
    "checkpoint of another shape": (lambda e: e.edit_ckpt_config("model", "hidden_dim", 48).eval(e.ckpt),
                                    ("best/model.safetensors: weights do not fit", "shape mismatch:",
                                     "checkpoint (32,", "model (48,")),
    "checkpoint of another architecture": (lambda e: e.edit_ckpt_config("model", "decoder_layers", 3).eval(e.ckpt),
                                           ("best/model.safetensors: weights do not fit", "missing:", "layers.2.")),
    "checkpoint weights truncated": (lambda e: e.truncate(e.ckpt / "model.safetensors").eval(e.ckpt),
                                     ("best/model.safetensors: cannot read safetensors weights", "truncated")),
    "checkpoint config unknown key": (lambda e: e.edit_ckpt_config("train", "lr_decay", 1).eval(e.ckpt),
                                      ("best/config.yaml.train: unknown key 'lr_decay'",)),
    "checkpoint config with another architecture's options": (
        lambda e: e.edit_ckpt_config("model", "arch", "dino").eval(e.ckpt),
        ("best/config.yaml.model.dab_detr: options of dab_detr, but", "model.arch is dino")),
    "eval on a non-checkpoint dir": (lambda e: e.eval(e.data), ("{root}/data: not a checkpoint directory",)),
    "eval on a run dir, not its checkpoint": (lambda e: e.eval(e.ckpt.parent), (
        "{root}/run: not a checkpoint directory", "did you mean {root}/run/best?")),
    "eval data with other categories": (lambda e: e.edit(_shift_categories, split="val").eval(e.ckpt),
                                        ("{root}/run/best: category ids differ", "only in data: [101,")),
    "predict with a non-checkpoint dir": (lambda e: e.predict(e.data), ("{root}/data: not a checkpoint directory",)),
    "predict on a missing path": (lambda e: e.predict(e.ckpt, e.root / "nope.jpg"),
                                  ("nope.jpg: no such image or directory",)),
    "predict on a dir without images": (lambda e: e.predict(e.ckpt, _photos(e, ("notes.txt", b"hi"))),
                                        ("{root}/photos: no image files",)),
    "predict on a non-image": (lambda e: e.predict(e.ckpt, _photos(e, ("a.png", b"GIF89a?"))),
                               ("photos/a.png: cannot read image",)),
    "predict on a truncated image": (lambda e: e.predict(e.ckpt, _photos(e, ("a.jpg", e.image(1).read_bytes()),
                                                                        ("b.jpg", _half(e.image(0))))),
                                     ("photos/b.jpg: cannot read image: image file is truncated",)),
    # ---- starting from a checkpoint (--init)
    "init checkpoint of another shape": (lambda e: e.train("--init", str(_twelve_queries(e))), (
        "twelve: does not fit the model at refpoint_embed.weight: checkpoint (12, 4) vs model (10, 4)",
        "--init-partial")),
    "init checkpoint of another architecture": (lambda e: e.as_arch("dino").train(
        "--init", str(e.ckpt)), ("best: a dino checkpoint cannot start a dab_detr model",)),
    "init not a checkpoint": (lambda e: e.train("--init", str(e.data)), ("{root}/data: not a checkpoint directory",)),
    "init class map, unknown dataset class": (lambda e: e.train("--init", str(e.ckpt), "--class-map", "tree=digit_1"),
                                              ("--class-map tree=digit_1: 'tree' is not a class of the dataset",)),
    "init class map, unknown checkpoint class": (
        lambda e: e.train("--init", str(e.ckpt), "--class-map", "digit_1=tree"),
        ("--class-map digit_1=tree: 'tree' is not a class of {root}/run/best",)),
    "init class map without =": (lambda e: e.train("--init", str(e.ckpt), "--class-map", "digit_1"),
                                 ("--class-map 'digit_1': expected DATASET_CLASS=CHECKPOINT_CLASS",)),
    "class map without --init": (lambda e: e.train("--class-map", "a=b"), ("--class-map and --init-partial need",)),
    # ---- resuming
    "run dir exists, no --resume": (lambda e: e.write_run({"epoch": 1}).train(),
                                    ("{root}/out: already holds a run", "--resume")),
    "trainer state that runs code": (lambda e: e.write_run({"epoch": Payload(e.marker)}).train("--resume"),
                                     ("last/trainer_state.pt: refused", "could run code")),
    "trainer state truncated": (lambda e: e.write_run({"epoch": 1}).truncate(e.out / "last" / "trainer_state.pt")
                                .train("--resume"), ("last/trainer_state.pt: cannot load trainer state",)),
    "trainer state of another layout": (lambda e: e.write_run({"epoch": 1}).train("--resume"),
                                        ("last/trainer_state.pt: does not fit this run", "optimizer")),
    "resume with another architecture": (lambda e: e.write_run({"epoch": 1}).train("--resume", "--set",
                                                                                  "model.hidden_dim=48"),
                                         ("last/model.safetensors: weights do not fit", "shape mismatch")),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pristine")
    generate(root / "data", num_train=8, num_val=4, size=64, seed=0)
    cfg = load_config(TINY)
    ckpt = save_checkpoint(root / "run" / "best", build_detector(cfg.model, 10), cfg,
                           DatasetInfo(list(range(1, 11)), [f"digit_{d}" for d in range(10)]))
    return root / "data", ckpt


@pytest.fixture
def env(pristine, tmp_path) -> Env:
    data, ckpt = pristine
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(ckpt.parent, tmp_path / "run")
    return Env(tmp_path, tmp_path / "data", tmp_path / "run" / "best", tmp_path / "out")


def test_payload_would_run_code(env):
    """The malicious files below really run code when unpickled without `weights_only`."""
    torch.save({"epoch": Payload(env.marker)}, env.root / "state.pt")
    torch.load(env.root / "state.pt", weights_only=False)
    assert env.marker.exists()


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_exits_2_with_one_line(env, capsys, case):
    build, fragments = CASES[case]
    argv = build(env)
    before = _snapshot(env.out)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kddetr: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "\r" not in err
    for fragment in fragments:
        fragment = fragment.format(root=env.root)
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert _snapshot(env.out) == before, "the output directory was changed"
    assert not env.marker.exists(), "a pickled payload ran"


def test_odd_but_valid_input_trains(env, capsys, caplog):
    """Images without boxes stay as negatives; boxes are clipped to the image; boxes without area are reported."""
    def change(coco):
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] > 4]  # images 1-4: negatives
        coco["annotations"][0]["bbox"] = [50, 50, 40, 40]  # over the edge: clipped to 50..64
        coco["annotations"][1]["bbox"] = [10, 10, 0, 5]  # no width
        coco["annotations"][2]["bbox"] = [70, 10, 5, 5]  # outside the image

    env.edit(change)
    with caplog.at_level(logging.WARNING, logger="kddetr"):
        assert main(env.train("--epochs", "1", "--set", "train.max_steps=1")) == 0
    assert "2 box(es) with no area" in caplog.text and "instances_train.json" in caplog.text
    assert "kddetr: error" not in capsys.readouterr().err
    assert (env.out / "last" / "model.safetensors").is_file()
    dataset = CocoDetection(env.data, "train")
    assert len(dataset) == 8 and all(len(dataset[i][1]["boxes"]) == 0 for i in range(4))
    boxes = [box for i in range(4, 8) for box in dataset[i][1]["boxes"].tolist()]
    assert [50.0, 50.0, 64.0, 64.0] in boxes, boxes  # clipped to the image

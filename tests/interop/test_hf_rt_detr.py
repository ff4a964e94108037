"""HF transformers RT-DETR(v2) directories: import (`kddetr import hf`) and export (`kddetr export --format hf`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kddetr.config import BackboneConfig, Config
from kddetr.engine.checkpoint import DatasetInfo, load_checkpoint
from kddetr.errors import UserError
from kddetr.interop.cli import import_checkpoint
from kddetr.interop.hf import hf_config
from kddetr.interop.hf_rt_detr import config_from_hf

from . import EXPORT_DATASET, export_to_hf, max_error, tiny_config

transformers = pytest.importorskip("transformers")
from tests.models.test_rt_detr import hf_rt_detr  # noqa: E402

NAMES = ["cat", "dog", "fish"]
VARIANTS = {"v1": dict(), "v2": dict(version="v2", stages=(3, 4), levels=2, points=3),
            "v1_plain_resnet": dict(plain=True, stages=(2, 3), levels=2)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers(tmp_path: Path, variant: str) -> None:
    hf = hf_rt_detr(**VARIANTS[variant], names=NAMES)
    hf.save_pretrained(tmp_path / "hf")  # transformers' on-disk names
    import_checkpoint("hf", tmp_path / "hf", tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    model, want = ckpt.config.model, VARIANTS[variant]
    assert (model.arch, model.options.version, model.num_feature_levels) == (
        "rt_detr", want.get("version", "v1"), want.get("levels", 3))
    assert model.options.resnet_variant == ("plain" if want.get("plain") else "vd")
    assert (model.hidden_dim, model.num_queries, model.options.num_points) == (32, 10, [want.get("points", 2)])
    assert ckpt.dataset.category_names == NAMES
    error = max_error(ckpt.model, hf, 0.01, 0.01)
    print(f"\nHF RT-DETR import ({variant}): max abs error {error:.2e}")
    assert error < 1e-4


@pytest.mark.parametrize("variant", ["v1", "v2", "v1_plain_resnet"])
def test_export_loads_in_transformers_and_round_trips(tmp_path: Path, variant: str) -> None:
    v2 = variant == "v2"
    backbone = BackboneConfig(name="resnet10", num_stages=3 if variant == "v1_plain_resnet" else 4, frozen_bn=True)
    cfg = Config(model=tiny_config(arch="rt_detr", activation="relu", num_feature_levels=2 if v2 else 3,
                                   backbone=backbone).replace(
        resnet_variant="plain" if variant == "v1_plain_resnet" else "vd", num_points=[3] if v2 else [2],
        version="v2" if v2 else "v1"))
    hf_class = transformers.RTDetrV2ForObjectDetection if v2 else transformers.RTDetrForObjectDetection
    model, hf, names = export_to_hf(cfg, hf_class, tmp_path)
    assert len(names) == len(hf.state_dict())  # every tensor written, HF's unused backbone stages included
    error = max_error(model, hf, 0.01, 0.01)
    print(f"\nHF RT-DETR export ({variant}): max abs error {error:.2e}")
    assert error < 1e-4

    import_checkpoint("hf", tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert back.dataset == EXPORT_DATASET and back.config.model.options.version == cfg.model.options.version
    assert model.state_dict().keys() == back.model.state_dict().keys()
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("change,field", [
    ({"with_box_refine": False}, "with_box_refine"),
    ({"eval_size": [640, 640]}, "eval_size"),
    ({"decoder_attention_heads": 4}, "decoder_attention_heads"),
    ({"decoder_activation_function": "silu"}, "decoder_activation_function"),
    ({"backbone_config": {"model_type": "rt_detr_resnet", "embedding_size": 32}}, "embedding_size"),
    ({"backbone_config": {"model_type": "rt_detr_resnet", "out_indices": [3, 4]}}, "stages"),
    ({"num_feature_levels": 5}, "num_feature_levels"),
])
def test_unsupported_hf_options_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(UserError, match=field):
        config_from_hf({"model_type": "rt_detr", **change})


def test_defaults_are_rt_detr_r50vd() -> None:
    cfg = config_from_hf({"model_type": "rt_detr"})
    assert (cfg.backbone.name, cfg.options.resnet_variant, cfg.num_feature_levels, cfg.num_queries) == (
        "resnet50", "vd", 3, 300)
    assert (cfg.denoising.enabled, cfg.denoising.query_budget, cfg.options.activation) == (True, 100, "silu")
    assert config_from_hf({"model_type": "rt_detr_v2", "decoder_method": "discrete"}).options.decoder_method == \
        "discrete"


def test_export_refuses_what_hf_cannot_express() -> None:
    cfg = tiny_config(arch="rt_detr", activation="relu").replace(csp_blocks=2)
    with pytest.raises(UserError, match="csp_blocks"):
        hf_config(cfg, DatasetInfo([1], ["a"]))
    cfg = tiny_config(arch="rt_detr", activation="relu").replace(version="v2", num_points=[2, 3, 4],
                                                                 backbone=BackboneConfig("resnet10", 4))
    with pytest.raises(UserError, match="num_points"):
        hf_config(cfg, DatasetInfo([1], ["a"]))


def test_the_readme_rt_detr_walk_through_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    """README's "Distilling an RT-DETR from HF checkpoints": each command as written, on two tiny random HF
    models and a tiny dataset, two steps each at 64 px."""
    import re
    import shlex

    from kddetr.cli import main
    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"### Distilling an RT-DETR from HF checkpoints\n.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["kddetr", "import"]] * 2 + [["kddetr", "train"]] * 2 + [["kddetr", "distill"]]
    monkeypatch.chdir(tmp_path)
    names = ["digit_0", "digit_1", "person"]
    hf_rt_detr(decoder_layers=3, names=names).save_pretrained(tmp_path / "path/to/rtdetr_r50vd")
    hf_rt_detr(decoder_layers=2, names=names).save_pretrained(tmp_path / "path/to/rtdetr_r18vd")
    assert main(["data", "synth", "--out", "my_data", "--train", "4", "--val", "2", "--test", "0",
                 "--size", "64"]) == 0
    tiny_run = ["--no-progress", "--batch-size", "2", "--set", "train.max_steps=2", "--set", "data.train_sizes=[64]",
                "--set", "data.eval_size=64", "--set", "data.max_size=96"]
    for command in commands:
        assert main(command[1:] + (tiny_run if command[1] in ("train", "distill") else [])) == 0, command
    student = load_checkpoint(tmp_path / "runs/student_kd/last")
    assert student.config.train.kd_update == "separate" and student.config.kd.cls_iou_target
    assert student.config.model.decoder_layers == 2 and student.dataset.category_names[:2] == names[:2]

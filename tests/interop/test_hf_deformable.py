"""HF transformers Deformable DETR directories: import (`kddetr import hf`) and export (`kddetr export --format hf`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kddetr.config import Config
from kddetr.engine.checkpoint import DatasetInfo, load_checkpoint
from kddetr.errors import UserError
from kddetr.interop.cli import import_checkpoint
from kddetr.interop.hf import hf_config
from kddetr.interop.hf_deformable_detr import config_from_hf as deformable_config_from_hf

from . import EXPORT_DATASET, export_to_hf, randomise, max_error, tiny_config

transformers = pytest.importorskip("transformers")

NAMES = ["cat", "dog", "fish"]
VARIANTS = {"plain": dict(levels=4, box_refine=False, two_stage=False),
            "one_level": dict(levels=1, box_refine=False, two_stage=False),
            "box_refine": dict(levels=3, box_refine=True, two_stage=False),
            "two_stage": dict(levels=4, box_refine=True, two_stage=True)}


def hf_detector(levels: int, box_refine: bool, two_stage: bool) -> transformers.DeformableDetrForObjectDetection:
    stages = [f"stage{s}" for s in range(5 - min(levels, 3), 5)]
    backbone = transformers.ResNetConfig(embedding_size=64, layer_type="basic", depths=[1, 1, 1, 1],
                                         hidden_sizes=[64, 128, 256, 512], out_features=stages)
    cfg = transformers.DeformableDetrConfig(
        backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=6, two_stage_num_proposals=7,
        num_feature_levels=levels, encoder_n_points=2, decoder_n_points=2, with_box_refine=box_refine,
        two_stage=two_stage, activation_function="gelu", dropout=0.0, id2label=dict(enumerate(NAMES)))
    torch.manual_seed(0)
    return randomise(transformers.DeformableDetrForObjectDetection(cfg))


@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage"])
def test_import_matches_transformers(tmp_path: Path, variant: str) -> None:
    hf = hf_detector(**VARIANTS[variant])
    hf.save_pretrained(tmp_path / "hf")  # leaves out tied heads: the import must find them as HF would
    import_checkpoint("hf", tmp_path / "hf", tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    model, want = ckpt.config.model, VARIANTS[variant]
    assert (model.arch, model.num_feature_levels, model.options.box_refine, model.options.two_stage) == (
        "deformable_detr", want["levels"], want["box_refine"], want["two_stage"])
    assert (model.hidden_dim, model.options.num_points, model.activation, model.num_heads) == (32, 2, "gelu", 4)
    assert model.num_queries == (7 if want["two_stage"] else 6) and model.backbone.num_stages == 4
    assert ckpt.dataset.category_names == NAMES
    error = max_error(ckpt.model, hf, 0.02, 0.1)
    print(f"\nHF Deformable DETR import ({variant}): max abs error {error:.2e}")
    assert error < 1e-4


@pytest.mark.parametrize("variant", ["one_level", "box_refine", "two_stage"])
def test_export_loads_in_transformers_and_round_trips(tmp_path: Path, variant: str) -> None:
    want = VARIANTS[variant]
    cfg = Config(model=tiny_config().replace(
        arch="deformable_detr", activation="relu", num_points=2, num_feature_levels=want["levels"],
        box_refine=want["box_refine"], two_stage=want["two_stage"]))
    model, hf, names = export_to_hf(cfg, transformers.DeformableDetrForObjectDetection, tmp_path)
    assert len(names) == len(hf.state_dict())  # every tied copy written: nothing is left to HF's tying
    error = max_error(model, hf, 0.02, 0.1)
    print(f"\nHF Deformable DETR export ({variant}): max abs error {error:.2e}")
    assert error < 1e-4

    import_checkpoint("hf", tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert back.dataset == EXPORT_DATASET
    assert model.state_dict().keys() == back.model.state_dict().keys()
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("change,field", [
    ({"position_embedding_type": "learned"}, "position_embedding_type"),
    ({"decoder_n_points": 2}, "decoder_n_points"),
    ({"decoder_attention_heads": 4}, "decoder_attention_heads"),
    ({"activation_function": "prelu"}, "activation_function"),
    ({"two_stage": True}, "with_box_refine"),
    ({"backbone_config": {"model_type": "resnet", "out_features": ["stage4"]}}, "out_features"),
    ({"num_feature_levels": 2}, "num_feature_levels"),
    ({"backbone_config": {"model_type": "resnet"}, "dilation": True}, "dilation"),
])
def test_unsupported_hf_options_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(UserError, match=field):
        deformable_config_from_hf({"model_type": "deformable_detr", **change})


def test_timm_backbone_defaults() -> None:
    four = deformable_config_from_hf({"model_type": "deformable_detr", "with_box_refine": True, "two_stage": True})
    assert (four.backbone.name, four.backbone.num_stages, four.num_feature_levels, four.num_queries) == (
        "resnet50", 4, 4, 300)
    one = deformable_config_from_hf({"model_type": "deformable_detr", "num_feature_levels": 1, "dilation": True})
    assert (one.backbone.num_stages, one.backbone.dilation, one.num_feature_levels) == (4, True, 1)


def test_export_refuses_what_hf_cannot_express() -> None:
    cfg = tiny_config().replace(arch="deformable_detr", activation="prelu")
    with pytest.raises(UserError, match="model.activation"):
        hf_config(cfg, DatasetInfo([1], ["a"]))

"""Official DAB-DETR / KD-DETR repo checkpoints (`{"model": ..., "args": ...}`, their names) -> ours."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from kddetr.config import BackboneConfig
from kddetr.engine.checkpoint import load_checkpoint
from kddetr.errors import UserError
from kddetr.interop.cli import add_import_export_parsers, import_checkpoint, run_import
from kddetr.interop.onnx import sample_inputs
from kddetr.models.build import build_detector
from kddetr.models.protocol import ImageBatch

from . import randomise, tiny_config

CLASSES = 4
# Names of the official modules (IDEA-Research/DAB-DETR models/DAB_DETR/{DABDETR,transformer,backbone}.py)
# for a ResNet with four stages, 1 encoder and 2 decoder layers, PReLU, pre_norm and patterns.
OFFICIAL_NAMES = {
    "backbone.0.body.conv1.weight", "backbone.0.body.bn1.running_var", "backbone.0.body.layer4.0.downsample.0.weight",
    "backbone.0.body.layer2.0.bn2.bias", "input_proj.weight", "refpoint_embed.weight", "class_embed.bias",
    "bbox_embed.layers.2.weight", "transformer.patterns.weight",
    "transformer.encoder.layers.0.self_attn.in_proj_weight", "transformer.encoder.layers.0.self_attn.out_proj.bias",
    "transformer.encoder.layers.0.linear1.weight", "transformer.encoder.layers.0.activation.weight",
    "transformer.encoder.layers.0.norm2.bias", "transformer.encoder.query_scale.layers.1.weight",
    "transformer.encoder.norm.weight", "transformer.decoder.layers.0.sa_qcontent_proj.weight",
    "transformer.decoder.layers.0.self_attn.out_proj.weight", "transformer.decoder.layers.1.ca_qpos_proj.weight",
    "transformer.decoder.layers.1.ca_qpos_sine_proj.bias", "transformer.decoder.layers.1.cross_attn.out_proj.weight",
    "transformer.decoder.layers.1.linear2.bias", "transformer.decoder.layers.1.activation.weight",
    "transformer.decoder.layers.1.norm3.weight", "transformer.decoder.norm.weight",
    "transformer.decoder.query_scale.layers.0.weight", "transformer.decoder.ref_point_head.layers.1.bias",
    "transformer.decoder.ref_anchor_head.layers.0.weight", "transformer.decoder.bbox_embed.layers.2.bias",
}


def to_official(state: dict[str, Tensor], decoder_layers: int) -> dict[str, Tensor]:
    """Our state dict under the official names, with what the official model holds besides ours."""
    official = {}
    for key, value in state.items():
        if key.startswith("backbone.body."):
            key = "backbone.0." + key[len("backbone."):]
        elif key.startswith(("encoder.", "decoder.", "patterns.")):
            key = "transformer." + re.sub(r"\.ffn\.", ".", key)
        official[key] = value
    for key in [k for k in official if k.startswith("bbox_embed.")]:
        official["transformer.decoder." + key] = official[key]  # the decoder shares the box head
    gen = torch.Generator().manual_seed(5)
    for i in range(1, decoder_layers):  # built in every layer, used only in the first
        dim = state["input_proj.weight"].shape[0]
        official[f"transformer.decoder.layers.{i}.ca_qpos_proj.weight"] = torch.randn(dim, dim, generator=gen)
        official[f"transformer.decoder.layers.{i}.ca_qpos_proj.bias"] = torch.randn(dim, generator=gen)
    return official


def outputs(model: nn.Module) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        out = model(ImageBatch(*sample_inputs(2, 64, 64)))
    return out.logits, out.boxes


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A .pth as the official training script saves it (model, optimizer-free extras, argparse args)."""
    cfg = tiny_config(backbone=BackboneConfig(name="resnet10", num_stages=4, frozen_bn=True), activation="prelu",
                      normalize_before=True, num_patterns=2, temperature=10.0)
    torch.manual_seed(0)
    model = randomise(build_detector(cfg, CLASSES))
    args = argparse.Namespace(modelname="dab_detr", nheads=4, pe_temperatureH=10, pe_temperatureW=10, dilation=False,
                              transformer_activation="prelu", random_refpoints_xy=False, dropout=0.0, lr=1e-4)
    path = tmp_path_factory.mktemp("official") / "checkpoint.pth"
    torch.save({"model": to_official(model.state_dict(), cfg.decoder_layers), "epoch": 49, "args": args}, path)
    return path, model


def test_import_keeps_outputs_and_reads_saved_args(official_pth, tmp_path: Path) -> None:
    path, model = official_pth
    assert OFFICIAL_NAMES <= set(torch.load(path, weights_only=False)["model"])
    import_checkpoint("official", path, tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    cfg = ckpt.config.model
    assert (cfg.num_heads, cfg.activation) == (4, "prelu")
    assert (cfg.options.temperature, cfg.options.normalize_before, cfg.options.num_patterns) == (10.0, True, 2)
    assert (cfg.hidden_dim, cfg.encoder_layers, cfg.decoder_layers, cfg.dim_feedforward) == (32, 1, 2, 64)
    assert (cfg.num_queries, cfg.backbone.name, cfg.backbone.num_stages) == (6, "resnet10", 4)
    assert ckpt.dataset.category_ids == list(range(CLASSES))
    (logits, boxes), (ref_logits, ref_boxes) = outputs(ckpt.model), outputs(model)
    error = max((logits - ref_logits).abs().max().item(), (boxes - ref_boxes).abs().max().item())
    print(f"\nofficial import: max abs error {error:.2e}")
    assert error < 1e-6 and ref_boxes.std(dim=2).mean() > 0.05


def test_import_with_config_yaml_and_no_args(tmp_path: Path) -> None:
    cfg = tiny_config(activation="gelu", temperature=10.0)
    torch.manual_seed(0)
    model = randomise(build_detector(cfg, CLASSES))
    torch.save({"model": to_official(model.state_dict(), cfg.decoder_layers)}, tmp_path / "weights.pth")
    model_yaml = {"num_heads": 4, "temperature": 10.0, "activation": "gelu", "denoising": {"enabled": True}}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump({"model": model_yaml, "train": {"lr": 3e-4}}))
    import_checkpoint("official", tmp_path / "weights.pth", tmp_path / "ckpt", config=tmp_path / "teacher.yaml")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.config.train.lr == 3e-4 and ckpt.config.model.backbone.num_stages == 3
    assert ckpt.config.model.denoising.enabled  # its embeddings start fresh: the official model has none
    for ours, ref in zip(outputs(ckpt.model), outputs(model)):
        assert (ours - ref).abs().max() < 1e-6


def test_categories_file_selects_class_rows(official_pth, tmp_path: Path) -> None:
    path, model = official_pth
    coco = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "three"}, {"id": 0, "name": "zero"}]}
    (tmp_path / "instances_val.json").write_text(json.dumps(coco))
    parser = argparse.ArgumentParser()
    add_import_export_parsers(parser.add_subparsers(dest="command"))
    run_import(parser.parse_args(["import", "official", str(path), "--out", str(tmp_path / "ckpt"),
                                  "--categories", str(tmp_path / "instances_val.json"), "--num-classes", "4"]))
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.dataset.category_ids == [0, 3] and ckpt.dataset.category_names == ["zero", "three"]
    assert torch.allclose(outputs(ckpt.model)[0], outputs(model)[0][..., [0, 3]], atol=1e-6)


def _resave(path: Path, tmp_path: Path, rename=lambda k: k, added=None, **extra) -> Path:
    """The checkpoint at `path` with its keys renamed (None drops one), tensors `added`, `extra` entries."""
    state = torch.load(path, weights_only=False)["model"]
    out = tmp_path / "changed.pth"
    torch.save({"model": {**{rename(k): v for k, v in state.items() if rename(k)}, **(added or {})}, **extra}, out)
    return out


def test_refusals_name_the_problem(official_pth, tmp_path: Path) -> None:
    path, _ = official_pth
    (tmp_path / "wrong.yaml").write_text("model: {hidden_dim: 64}\n")
    with pytest.raises(UserError, match="model.hidden_dim=64"):
        import_checkpoint("official", path, tmp_path / "a", config=tmp_path / "wrong.yaml")
    with pytest.raises(UserError, match="--num-classes 5"):
        import_checkpoint("official", path, tmp_path / "a", num_classes=5)
    with pytest.raises(UserError, match="--arch"):
        import_checkpoint("official", path, tmp_path / "a", arch="dab_deformable_detr")
    per_layer = _resave(path, tmp_path, lambda k: k.replace("bbox_embed.layers", "bbox_embed.0.layers"))
    with pytest.raises(UserError, match="bbox_embed_diff_each_layer"):
        import_checkpoint("official", per_layer, tmp_path / "a")
    unsafe = _resave(path, tmp_path, extra_object=Path("x"))
    with pytest.raises(UserError, match="weights_only"):
        import_checkpoint("official", unsafe, tmp_path / "a")
    no_prelu = _resave(path, tmp_path, lambda k: None if k.endswith("activation.weight") else k)
    (tmp_path / "prelu.yaml").write_text("model: {activation: prelu, num_heads: 4}\n")
    with pytest.raises(UserError, match="no PReLU weights"):
        import_checkpoint("official", no_prelu, tmp_path / "a", config=tmp_path / "prelu.yaml")
    unknown = _resave(path, tmp_path, added={"query_embed.weight": torch.zeros(6, 32)})
    with pytest.raises(UserError, match="no kddetr parameter for 'query_embed.weight'"):
        import_checkpoint("official", unknown, tmp_path / "a")
    assert not (tmp_path / "a").exists()

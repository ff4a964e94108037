"""Official Deformable-DETR repo checkpoints (`{"model": ..., "args": ...}`, its names) -> ours."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kddetr.config import BackboneConfig
from kddetr.engine.checkpoint import load_checkpoint
from kddetr.errors import UserError
from kddetr.interop.cli import import_checkpoint
from kddetr.interop.onnx import sample_inputs
from kddetr.models.build import build_detector
from kddetr.models.protocol import ImageBatch

from . import randomise, tiny_config

CLASSES = 4
# Names of the official modules (fundamentalvision/Deformable-DETR models/{deformable_detr,deformable_transformer,
# backbone}.py) for a four-stage ResNet, 4 levels, 1 encoder and 2 decoder layers.
OFFICIAL_NAMES = {
    "backbone.0.body.conv1.weight", "backbone.0.body.layer4.0.downsample.0.weight", "backbone.0.body.bn1.running_var",
    "input_proj.0.0.weight", "input_proj.3.1.bias", "transformer.level_embed",
    "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
    "transformer.encoder.layers.0.self_attn.attention_weights.bias",
    "transformer.encoder.layers.0.self_attn.value_proj.weight",
    "transformer.encoder.layers.0.self_attn.output_proj.bias",
    "transformer.encoder.layers.0.norm1.weight", "transformer.encoder.layers.0.linear1.weight",
    "transformer.encoder.layers.0.linear2.bias", "transformer.encoder.layers.0.norm2.bias",
    "transformer.decoder.layers.1.cross_attn.sampling_offsets.bias", "transformer.decoder.layers.1.norm1.weight",
    "transformer.decoder.layers.1.self_attn.in_proj_weight", "transformer.decoder.layers.1.self_attn.out_proj.bias",
    "transformer.decoder.layers.1.norm2.bias", "transformer.decoder.layers.1.linear1.weight",
    "transformer.decoder.layers.1.norm3.weight", "class_embed.0.weight", "class_embed.1.bias",
    "bbox_embed.1.layers.2.weight",
}
ONE_STAGE_NAMES = {"query_embed.weight", "transformer.reference_points.weight"}
TWO_STAGE_NAMES = {"transformer.enc_output.weight", "transformer.enc_output_norm.bias", "transformer.pos_trans.weight",
                   "transformer.pos_trans_norm.weight", "class_embed.2.weight",
                   "transformer.decoder.class_embed.2.bias",
                   "transformer.decoder.bbox_embed.1.layers.0.weight"}
TRANSFORMER_PARTS = ("level_embed", "reference_points", "enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")


def to_official(state: dict[str, Tensor], decoder_layers: int, box_refine: bool, two_stage: bool) -> dict[str, Tensor]:
    """Our state dict under the official names, with the official model's repeated and shared heads."""
    official = {}
    for key, value in state.items():
        if key.startswith("backbone.body."):
            key = "backbone.0." + key[len("backbone."):]
        elif m := re.fullmatch(r"(encoder|decoder)\.(\d+)\.(.+)", key):
            name = m[3].removeprefix("ffn.")
            if m[1] == "decoder":  # official: norm1 after the cross-attention, norm2 after the self-attention
                name = re.sub(r"^norm([12])\.", lambda n: f"norm{3 - int(n[1])}.", name)
            key = f"transformer.{m[1]}.layers.{m[2]}.{name}"
        elif key.split(".")[0] in TRANSFORMER_PARTS:
            key = "transformer." + key
        official[key] = value
    heads = [k for k in official if re.match(r"(class|bbox)_embed\.0\.", k)]
    for key in heads if not box_refine else []:  # one head module, listed once per decoder layer
        for i in range(1, decoder_layers):
            official[key.replace(".0.", f".{i}.", 1)] = official[key]
    for kind, tied in (("bbox_embed", box_refine), ("class_embed", two_stage)):
        for key in [k for k in official if k.startswith(kind + ".") and tied]:
            official["transformer.decoder." + key] = official[key]
    return official


def outputs(model: nn.Module) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        out = model(ImageBatch(*sample_inputs(2, 64, 96)))
    return out.logits, out.boxes


def official_pth(path: Path, two_stage: bool, **args) -> nn.Module:
    """Our random Deformable DETR saved as the official training script saves it; returns the model."""
    cfg = tiny_config().replace(arch="deformable_detr", activation="relu", num_points=2,
                              backbone=BackboneConfig(name="resnet10", num_stages=4, frozen_bn=True),
                              box_refine=two_stage, two_stage=two_stage, num_queries=7 if two_stage else 6)
    torch.manual_seed(0)
    model = randomise(build_detector(cfg, CLASSES))
    state = to_official(model.state_dict(), cfg.decoder_layers, cfg.options.box_refine, cfg.options.two_stage)
    saved = {"model": state, "epoch": 49}
    if args:
        saved["args"] = argparse.Namespace(with_box_refine=two_stage, two_stage=two_stage, **args)
    torch.save(saved, path)
    return model


@pytest.mark.parametrize("two_stage", [False, True])
def test_import_keeps_outputs(tmp_path: Path, two_stage: bool) -> None:
    args = dict(nheads=4, num_queries=7, dropout=0.0, dilation=False, position_embedding="sine",
                position_embedding_scale=6.283185307179586, masks=False)
    model = official_pth(tmp_path / "checkpoint.pth", two_stage, **args)
    names = set(torch.load(tmp_path / "checkpoint.pth", weights_only=False)["model"])
    assert OFFICIAL_NAMES | (TWO_STAGE_NAMES if two_stage else ONE_STAGE_NAMES) <= names

    import_checkpoint("official", tmp_path / "checkpoint.pth", tmp_path / "ckpt", arch="deformable_detr")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    cfg = ckpt.config.model
    assert (cfg.arch, cfg.num_heads, cfg.options.num_points, cfg.num_feature_levels, cfg.activation) == (
        "deformable_detr", 4, 2, 4, "relu")
    assert (cfg.hidden_dim, cfg.encoder_layers, cfg.decoder_layers, cfg.dim_feedforward) == (32, 1, 2, 64)
    assert (cfg.options.box_refine, cfg.options.two_stage) == (two_stage, two_stage)
    assert (cfg.num_queries, cfg.backbone.num_stages) == (7 if two_stage else 6, 4)
    assert ckpt.dataset.category_ids == list(range(CLASSES))
    (logits, boxes), (ref_logits, ref_boxes) = outputs(ckpt.model), outputs(model)
    error = max((logits - ref_logits).abs().max().item(), (boxes - ref_boxes).abs().max().item())
    print(f"\nofficial Deformable-DETR import (two_stage={two_stage}): max abs error {error:.2e}")
    assert error < 1e-6 and ref_boxes.std(dim=2).mean() > 0.02


def test_heads_from_config_yaml_without_args(tmp_path: Path) -> None:
    model = official_pth(tmp_path / "weights.pth", two_stage=False)
    (tmp_path / "wrong.yaml").write_text("model: {num_heads: 3}\n")
    with pytest.raises(UserError, match="num_heads=3"):
        import_checkpoint("official", tmp_path / "weights.pth", tmp_path / "a", arch="deformable_detr",
                          config=tmp_path / "wrong.yaml")
    (tmp_path / "teacher.yaml").write_text("model: {num_heads: 4}\ntrain: {lr: 3.0e-4}\n")
    import_checkpoint("official", tmp_path / "weights.pth", tmp_path / "ckpt", arch="deformable_detr",
                      config=tmp_path / "teacher.yaml")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.config.train.lr == 3e-4 and ckpt.config.model.options.num_points == 2
    for ours, ref in zip(outputs(ckpt.model), outputs(model)):
        assert (ours - ref).abs().max() < 1e-6


@pytest.mark.parametrize("args,match", [({"nheads": 4, "position_embedding": "learned"}, "position_embedding"),
                                        ({"nheads": 4, "position_embedding_scale": 1.0}, "position_embedding_scale"),
                                        ({"nheads": 4, "masks": True}, "masks")])
def test_refusals_name_the_problem(tmp_path: Path, args: dict, match: str) -> None:
    official_pth(tmp_path / "checkpoint.pth", two_stage=False, **args)
    with pytest.raises(UserError, match=match):
        import_checkpoint("official", tmp_path / "checkpoint.pth", tmp_path / "a", arch="deformable_detr")
    assert not (tmp_path / "a").exists()

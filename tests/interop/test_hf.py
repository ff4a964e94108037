"""HF transformers DAB-DETR directories: import (`kddetr import hf`) and export (`kddetr export --format hf`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kddetr.config import Config
from kddetr.engine.checkpoint import DatasetInfo, load_checkpoint
from kddetr.errors import UserError
from kddetr.interop.cli import import_checkpoint
from kddetr.interop.hf import hf_config, hf_to_ours
from kddetr.interop.hf_dab_detr import DAB
from kddetr.interop.hf_dab_detr import config_from_hf as model_config_from_hf
from kddetr.interop.onnx import sample_inputs
from kddetr.models.protocol import ImageBatch

from . import EXPORT_DATASET, export_to_hf, randomise, tiny_config

transformers = pytest.importorskip("transformers")

NAMES = ["cat", "dog", "N/A", "fish"]


def hf_detector(**overrides) -> transformers.DabDetrForObjectDetection:
    backbone = transformers.ResNetConfig(embedding_size=64, layer_type="basic", depths=[1, 1, 1, 1],
                                         hidden_sizes=[64, 128, 256, 512], out_features=["stage3"])
    cfg = transformers.DabDetrConfig(
        backbone_config=backbone, hidden_size=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=6, dropout=0.0,
        id2label=dict(enumerate(NAMES)), **overrides)
    torch.manual_seed(0)
    return randomise(transformers.DabDetrForObjectDetection(cfg))


def max_error(ours: torch.nn.Module, hf: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> float:
    with torch.no_grad():
        out = ours(ImageBatch(images, mask))
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
    assert out.pred_logits.shape == ref.logits.shape
    assert out.pred_boxes.std(dim=1).mean() > 0.05  # queries differ: a wrong mapping would show
    return max((out.pred_logits - ref.logits).abs().max().item(), (out.pred_boxes - ref.pred_boxes).abs().max().item())


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_import_matches_transformers(tmp_path: Path, weights_file: str) -> None:
    hf = hf_detector(activation_function="relu", normalize_before=True, temperature_height=10, temperature_width=10)
    hf.save_pretrained(tmp_path / "hf")
    if weights_file == "pytorch_model.bin":
        (tmp_path / "hf" / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "hf" / weights_file)

    import_checkpoint("hf", tmp_path / "hf", tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    model = ckpt.config.model
    assert (model.activation, model.num_heads) == ("relu", 4)
    assert (model.options.normalize_before, model.options.temperature) == (True, 10)
    assert (model.backbone.name, model.backbone.num_stages, model.decoder_layers) == ("resnet10", 3, 2)
    assert ckpt.dataset.category_ids == [0, 1, 2, 3] and ckpt.dataset.category_names == NAMES
    error = max_error(ckpt.model, hf, *sample_inputs(2, 64, 64))
    print(f"\nHF import ({weights_file}): max abs error {error:.2e}")
    assert error < 1e-4


def test_export_loads_in_transformers_and_round_trips(tmp_path: Path) -> None:
    cfg = Config(model=tiny_config(num_patterns=2))
    cfg.model.denoising.enabled = True  # training-only embeddings: must not reach the export
    model, hf, names = export_to_hf(cfg, transformers.DabDetrForObjectDetection, tmp_path)
    assert not any("denoising" in n or "label_embed" in n for n in names)
    assert names == set(hf.state_dict())
    error = max_error(model, hf, *sample_inputs(2, 64, 64))
    print(f"\nHF export: max abs error {error:.2e}")
    assert error < 1e-4

    import_checkpoint("hf", tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert back.dataset == EXPORT_DATASET and back.config.model.options.num_patterns == 2
    original = {k: v for k, v in model.state_dict().items() if not k.startswith("denoising.")}
    assert original.keys() == back.model.state_dict().keys()
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in original.items())


@pytest.mark.parametrize("change,field", [
    ({"model_type": "deformable_detr"}, "model_type"),
    ({"keep_query_pos": True}, "keep_query_pos"),
    ({"temperature_width": 30}, "temperature_width"),
    ({"decoder_ffn_dim": 128}, "decoder_ffn_dim"),
    ({"activation_function": "silu"}, "activation_function"),
    ({"sine_position_embedding_scale": 1.0}, "sine_position_embedding_scale"),
    ({"backbone_config": {"model_type": "resnet", "depths": [2, 3, 4, 2]}}, "depths"),
    ({"backbone_config": {"model_type": "resnet", "downsample_in_bottleneck": True}}, "downsample_in_bottleneck"),
    ({"backbone_config": {"model_type": "swin"}}, "backbone_config.model_type"),
])
def test_unsupported_hf_options_name_the_field(change: dict, field: str) -> None:
    hf = {"model_type": "dab-detr", "backbone_config": {"model_type": "resnet"}, **change}
    with pytest.raises(UserError, match=field):
        model_config_from_hf(hf)


def test_backbone_variants_from_hf_configs() -> None:
    timm = model_config_from_hf({"model_type": "dab-detr", "backbone": "resnet101", "dilation": True}).backbone
    assert (timm.name, timm.num_stages, timm.dilation, timm.frozen_bn) == ("resnet101", 4, True, True)
    default = model_config_from_hf({"model_type": "dab-detr", "use_timm_backbone": False}).backbone
    assert (default.name, default.num_stages) == ("resnet50", 4)
    t = torch.ones(1)
    for prefix in ("model.backbone.conv_encoder.model.", "model.backbone.conv_encoder.model._backbone."):
        timm_state = {prefix + "layer1.0.conv1.weight": t, prefix + "layer4.0.bn1.weight": t}
        assert hf_to_ours(timm_state, 3, DAB) == {"backbone.body.layer1.0.conv1.weight": t}


@pytest.mark.parametrize("change", [{"pre_norm_layers": True}, {"modulate_hw_attn": False}, {"temperature": 20.5}])
def test_export_refuses_what_hf_cannot_express(change: dict) -> None:
    with pytest.raises(UserError, match=next(iter(change))):
        hf_config(tiny_config(**change), DatasetInfo([1], ["a"]))


def test_export_of_a_detector_without_an_hf_counterpart_is_one_clear_error() -> None:
    with pytest.raises(UserError, match="model.arch: dino has no HF transformers counterpart"):
        hf_config(tiny_config(arch="dino"), DatasetInfo([1], ["a"]))


def test_every_registered_converter_is_found_by_its_model_type() -> None:
    from kddetr.interop.hf import converters
    from kddetr.registry import REGISTRY, load

    found = converters()
    assert {c.architecture for c in found.values()} == {"DabDetrForObjectDetection", "DeformableDetrForObjectDetection",
                                                        "RTDetrForObjectDetection"}
    assert len(found) == sum(1 + len(load(entry.hf).aliases) for entry in REGISTRY.values() if entry.hf)
    assert found["rt_detr_v2"] is found["rt_detr"]  # one converter reads both versions


def test_import_needs_a_local_model_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config.json"):
        import_checkpoint("hf", tmp_path, tmp_path / "ckpt")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dab-detr"}))
    with pytest.raises(UserError, match="model.safetensors"):
        import_checkpoint("hf", tmp_path, tmp_path / "ckpt")

"""Checkpoint import/export tests; helpers shared by them."""
from __future__ import annotations


import torch
from torch import nn

from kddetr.config import BackboneConfig, ModelConfig
from kddetr.engine.checkpoint import DatasetInfo
from kddetr.interop.onnx import sample_inputs
from kddetr.models.protocol import ImageBatch

EXPORT_DATASET = DatasetInfo([3, 7, 11], ["three", "seven", "eleven"])  # what `export_to_hf` saves


def tiny_config(**overrides) -> ModelConfig:
    """Hidden 32, 1 encoder + 2 decoder layers (the second exercises the per-layer query scaling), 6 queries."""
    cfg = ModelConfig(backbone=BackboneConfig(name="resnet10", num_stages=3, frozen_bn=True), hidden_dim=32,
                      num_heads=4, encoder_layers=1, decoder_layers=2, dim_feedforward=64, num_queries=6)
    return cfg.replace(**overrides)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Unit-scale random weights and norm statistics, so that every query and layer gives distinct outputs.

    Default inits (zero box head, constant class bias) would let a wrong mapping of the query-dependent
    parts go unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if "refpoint" in name:
                t.copy_(noise)
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif t.dim() == 2:
                t.copy_(noise / t.shape[1] ** 0.5)
            elif t.dim() > 2:
                t.add_(0.5 * t.std() * noise)
            else:
                t.add_(0.1 * noise)
    return model.eval()



def export_to_hf(cfg, hf_class, tmp_path) -> tuple[nn.Module, nn.Module, set[str]]:
    """Save a randomised model of `cfg` (a `Config`), `kddetr export --format hf` it and load it with `hf_class`.

    Returns our model, the HF model (eval mode) and the tensor names written; asserts that HF loads every
    weight, misses none and keeps our class names.
    """
    from safetensors.torch import load_file

    from kddetr.engine.checkpoint import save_checkpoint
    from kddetr.interop.cli import export_checkpoint
    from kddetr.models.build import build_detector

    torch.manual_seed(0)
    model = randomise(build_detector(cfg.model, EXPORT_DATASET.num_classes))
    save_checkpoint(tmp_path / "ckpt", model, cfg, EXPORT_DATASET)
    export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")
    names = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    hf, info = hf_class.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.id2label == {0: "three", 1: "seven", 2: "eleven"}
    return model, hf.eval(), names


def max_error(ours: nn.Module, hf: nn.Module, box_spread: float, logit_spread: float) -> float:
    """Largest difference of logits and boxes between our model and an HF one on two padded images; each model's
    queries must differ by at least the given spreads (else a wrong query mapping could pass)."""
    images, mask = sample_inputs(2, 64, 96)
    with torch.no_grad():
        out = ours(ImageBatch(images, mask))
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
    assert out.pred_logits.shape == ref.logits.shape
    assert out.pred_boxes.std(dim=1).mean() > box_spread and out.pred_logits.std(dim=1).mean() > logit_spread
    return max((out.pred_logits - ref.logits).abs().max().item(), (out.pred_boxes - ref.pred_boxes).abs().max().item())

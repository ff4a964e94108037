"""Deployment exports: ONNX (checked with onnxruntime) and slim safetensors checkpoints, without training parts."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kddetr.config import Config
from kddetr.engine.checkpoint import DatasetInfo, load_checkpoint, save_checkpoint
from kddetr.errors import UserError
from kddetr.interop.cli import add_import_export_parsers, export_checkpoint, run_export
from kddetr.interop.onnx import export_onnx, onnx_max_error, sample_inputs
from kddetr.models.build import build_detector
from kddetr.models.protocol import ImageBatch

from . import randomise, tiny_config

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A checkpoint of a model trained with denoising groups (training-only embeddings in its state dict)."""
    cfg = Config(model=tiny_config())
    cfg.model.denoising.enabled = True
    torch.manual_seed(0)
    model = randomise(build_detector(cfg.model, 3))
    dataset = DatasetInfo([1, 2, 5], ["a", "b", "c"])
    return save_checkpoint(tmp_path_factory.mktemp("onnx") / "ckpt", model, cfg, dataset), model


@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "torchscript"])
def test_onnx_matches_pytorch_at_other_batch_sizes_and_shapes(checkpoint, tmp_path: Path, exporter: str) -> None:
    path, model = checkpoint
    out = export_checkpoint(path, "onnx", tmp_path / "model.onnx", opset=18, exporter=exporter)
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images", "mask"] and [o.name for o in graph.output] == ["logits", "boxes"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    errors = [onnx_max_error(out, model, *sample_inputs(b, h, w, seed=b)) for b, h, w in [(1, 64, 64), (3, 96, 80)]]
    print(f"\nONNX ({exporter}) vs PyTorch: max abs error {max(errors):.2e}")
    assert max(errors) < 1e-4


def test_opset_below_17_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--opset 16"):
        export_onnx(nn.Identity(), tmp_path / "m.onnx", opset=16)


def export_cli(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_import_export_parsers(parser.add_subparsers(dest="command"))
    run_export(parser.parse_args(["export", *argv]))


def test_cli_onnx_export_reports_its_parity(checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.onnx"
    export_cli(str(checkpoint[0]), "--format", "onnx", "--out", str(out), "--onnx-exporter", "torchscript")
    error = float(capsys.readouterr().out.split("max abs error")[1])
    assert out.is_file() and error < 1e-4


def test_safetensors_export_is_a_slim_checkpoint(checkpoint, tmp_path: Path) -> None:
    path, model = checkpoint
    export_cli(str(path), "--format", "safetensors", "--out", str(tmp_path / "slim"))
    with pytest.raises(UserError, match="already exists"):
        export_cli(str(path), "--format", "safetensors", "--out", str(tmp_path / "slim"))
    names = set(load_file(str(tmp_path / "slim" / "model.safetensors")))
    assert names == {k for k in model.state_dict() if not k.startswith("denoising.")}
    assert any(k.startswith("denoising.") for k in model.state_dict())
    slim = load_checkpoint(tmp_path / "slim")
    assert not slim.config.model.denoising.enabled and slim.dataset.category_ids == [1, 2, 5]
    images, mask = sample_inputs(2, 64, 64)
    with torch.no_grad():
        assert torch.equal(slim.model(ImageBatch(images, mask)).logits, model(ImageBatch(images, mask)).logits)


def test_rt_detr_student_exports_to_onnx_with_onnxruntime_parity(tmp_path: Path) -> None:
    """The embedded RT-DETR student (hybrid encoder, query selection, deformable decoder) through the default
    exporter; RT-DETR reads no padding mask, which the graph keeps as an input all the same."""
    from kddetr.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "embedded_rt_detr_student.yaml",
                      ["model.backbone.weights=null"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, 3).eval()
    out = export_onnx(model, tmp_path / "rt_detr.onnx", exporter="dynamo")
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["images", "mask"]
    errors = [onnx_max_error(out, model, *sample_inputs(b, h, w, seed=b)) for b, h, w in [(1, 64, 64), (3, 96, 80)]]
    assert max(errors) < 1e-4

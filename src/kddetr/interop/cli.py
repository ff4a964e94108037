"""`kddetr import` (HF or official checkpoints -> ours) and `kddetr export` (ours -> HF, ONNX, safetensors).

Torch-side modules are imported inside the functions so that building the CLI parser stays fast.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kddetr.errors import UserError
from kddetr.registry import REGISTRY

if TYPE_CHECKING:
    from torch import Tensor, nn

    from kddetr.config import Config
    from kddetr.engine.checkpoint import Checkpoint, DatasetInfo

FORMATS = ("hf", "onnx", "safetensors")


def read_categories(path: str | Path) -> DatasetInfo:
    """Category ids and names (sorted by id) from a COCO annotation file's `categories`."""
    from kddetr.engine.checkpoint import DatasetInfo

    path = Path(path)
    try:
        categories = json.loads(path.read_text())["categories"]
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: expected a COCO annotation file with categories of id and name ({e})") from None
    return DatasetInfo([i for i, _ in pairs], [n for _, n in pairs])


def select_categories(state: dict[str, Tensor], dataset: DatasetInfo, keep: DatasetInfo,
                      where: str) -> dict[str, Tensor]:
    """Keep the class-head rows of `keep.category_ids`, in that order (sigmoid heads score classes independently)."""
    missing = [i for i in keep.category_ids if i not in dataset.category_ids]
    if missing:
        raise UserError(f"{where}: category ids {missing[:10]} are not among the model's ids "
                        f"{dataset.category_ids[0]}..{dataset.category_ids[-1]}")
    rows = [dataset.category_ids.index(i) for i in keep.category_ids]
    heads = [k for k in state if re.fullmatch(r"class_embed\.(\d+\.)?(weight|bias)", k)]  # one, or one per layer
    return {**state, **{k: state[k][rows] for k in heads}}


def import_checkpoint(source: str, path: str | Path, out: str | Path, arch: str = "dab_detr",
                      config: Optional[str | Path] = None, num_classes: Optional[int] = None,
                      categories: Optional[str | Path] = None) -> Path:
    """Convert an HF directory (`source="hf"`) or an official .pth (`"official"`) into a checkpoint directory.

    `config` and `num_classes` are for official checkpoints (see `read_official`); an HF config.json
    fixes the whole model. `categories`: a COCO annotation file whose category ids (= the source's
    label indices) and names to keep, e.g. the 80 COCO classes of a 91-output head.
    """
    from kddetr.config import Config
    from kddetr.engine.checkpoint import load_weights_into, save_checkpoint
    from kddetr.models.build import build_detector

    _check_new(out)
    if source == "hf":
        from kddetr.interop.hf import read_hf

        model_cfg, state, dataset = read_hf(path)
        cfg = Config(model=model_cfg)
    elif source == "official":
        from kddetr.interop.official import read_official

        cfg, state, dataset = read_official(path, arch, config, num_classes)
    else:
        raise UserError(f"import {source}: expected hf or official")
    if categories is not None:
        keep = read_categories(categories)
        state = select_categories(state, dataset, keep, str(categories))
        dataset = keep
    model = build_detector(cfg.model, dataset.num_classes)
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith("denoising.")}  # training-only, new
    load_weights_into(model, {**fresh, **state}, str(path))
    return save_checkpoint(out, model, cfg, dataset)


def _check_new(out: str | Path) -> None:
    if Path(out).exists():
        raise UserError(f"{out}: already exists; choose another --out or remove it")


def deployable(ckpt: Checkpoint) -> tuple[nn.Module, Config]:
    """The checkpoint's detector without training-only parts (denoising embeddings) and its config.

    The config no longer points to backbone weight files: the state dict holds the backbone.
    """
    from kddetr.engine.checkpoint import load_weights_into
    from kddetr.models.build import build_detector

    cfg = copy.deepcopy(ckpt.config)
    backbone = cfg.model.backbone
    backbone.frozen_bn = backbone.weights is not None if backbone.frozen_bn is None else backbone.frozen_bn
    backbone.freeze_stem = backbone.weights is not None if backbone.freeze_stem is None else backbone.freeze_stem
    backbone.weights = None
    cfg.model.denoising.enabled = False
    model = build_detector(cfg.model, ckpt.dataset.num_classes)
    state = {k: v for k, v in ckpt.model.state_dict().items() if not k.startswith("denoising.")}
    load_weights_into(model, state, str(ckpt.path))
    return model.eval(), cfg


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, opset: int = 18,
                      exporter: str = "dynamo") -> Path:
    """Write a checkpoint as an HF directory, an ONNX file, or a slim checkpoint directory (`safetensors`)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    from kddetr.engine.checkpoint import load_checkpoint, save_checkpoint

    _check_new(out)
    ckpt = load_checkpoint(checkpoint)
    model, cfg = deployable(ckpt)
    if fmt == "hf":
        from kddetr.interop.hf import write_hf

        return write_hf(out, cfg.model, model.state_dict(), ckpt.dataset, cfg.data)
    if fmt == "onnx":
        from kddetr.interop.onnx import export_onnx

        return export_onnx(model, out, opset, exporter)
    return save_checkpoint(out, model, cfg, ckpt.dataset)


def add_import_export_parsers(subparsers: argparse._SubParsersAction) -> None:
    imp = subparsers.add_parser("import", help="convert a teacher trained elsewhere into a kddetr checkpoint")
    kinds = imp.add_subparsers(dest="import_source", required=True)
    hf = kinds.add_parser("hf", help="a local HF transformers detector directory (" + ", ".join(
        f"{arch}: {entry.name}" for arch, entry in REGISTRY.items() if entry.hf) + ")")
    hf.add_argument("path", type=Path, help="directory with config.json and model.safetensors/pytorch_model.bin")
    official = kinds.add_parser("official", help="an official DAB-DETR / KD-DETR / Deformable-DETR repo checkpoint "
                                                 "(.pth)")
    official.add_argument("path", type=Path, help="checkpoint file ({'model': state_dict, 'args': ...})")
    official.add_argument("--arch", default="dab_detr", choices=[a for a, e in REGISTRY.items() if e.official],
                          help="detector of the checkpoint")
    official.add_argument("--num-classes", type=int, default=None, help="check the class head has N outputs")
    official.add_argument("--config", type=Path, default=None,
                          help="YAML config: model options the weights do not fix (num_heads, temperature, ...)")
    for p in (hf, official):
        p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
        p.add_argument("--categories", type=Path, default=None,
                       help="COCO annotation file: keep these category ids (= the source's label indices) "
                            "and take their names")

    exp = subparsers.add_parser("export", help="write a checkpoint as an HF directory, ONNX or safetensors")
    exp.add_argument("checkpoint", type=Path, help="kddetr checkpoint directory")
    exp.add_argument("--format", required=True, choices=FORMATS)
    exp.add_argument("--out", type=Path, required=True, help="directory (hf, safetensors) or .onnx file")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    exp.add_argument("--onnx-exporter", default="dynamo", choices=["dynamo", "torchscript"],
                     help="torch.export-based exporter, or the older TorchScript one")


def run_import(args: argparse.Namespace) -> None:
    official = args.import_source == "official"
    out = import_checkpoint(args.import_source, args.path, args.out, args.arch if official else "dab_detr",
                            args.config if official else None, args.num_classes if official else None,
                            args.categories)
    print(f"wrote {out}")


def run_export(args: argparse.Namespace) -> None:
    out = export_checkpoint(args.checkpoint, args.format, args.out, args.opset, args.onnx_exporter)
    print(f"wrote {out}")
    if args.format == "onnx":
        _report_onnx_parity(args.checkpoint, out)


def _report_onnx_parity(checkpoint: Path, path: Path) -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed: skipped the check against PyTorch (pip install 'kddetr[export]')")
        return
    from kddetr.engine.checkpoint import load_checkpoint
    from kddetr.interop.onnx import onnx_max_error, sample_inputs

    model, _ = deployable(load_checkpoint(checkpoint))
    images, mask = sample_inputs(3, 96, 160, seed=1)  # another batch size and shape than the export's
    error = onnx_max_error(path, model, images, mask)
    print(f"onnxruntime vs PyTorch on a padded batch of 3 at 96x160: max abs error {error:.2e}")

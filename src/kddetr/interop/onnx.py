"""ONNX export of a detector for deployment, and its check against PyTorch with onnxruntime.

The graph takes `images` float32 `[B, 3, H, W]` (ImageNet-normalised, zero-padded bottom/right) and
`mask` bool `[B, H, W]` (True = padding; all False for unpadded images); batch, height and width are
dynamic. It returns the last decoder layer's `logits` `[B, Q, C]` (raw, sigmoid gives the scores) and
`boxes` `[B, Q, 4]` (cx, cy, w, h normalised by the padded size), as `DetectorOutput.pred_*`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from kddetr.errors import UserError
from kddetr.models.protocol import ImageBatch

INPUTS = ("images", "mask")
OUTPUTS = ("logits", "boxes")
EXPORTERS = ("dynamo", "torchscript")


class DeployedDetector(nn.Module):
    """Tensors in, tensors out: the detection queries' last-layer predictions, nothing for training."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.detector(ImageBatch(images, mask))
        return out.pred_logits, out.pred_boxes


def sample_inputs(batch_size: int = 2, height: int = 128, width: int = 128, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random images with the last one padded at the bottom and right, as `collate` pads."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, height, width, generator=gen)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    if batch_size > 1:
        mask[-1, height * 3 // 4:], mask[-1, :, width * 5 // 8:] = True, True
        images[-1, :, height * 3 // 4:], images[-1, :, :, width * 5 // 8:] = 0, 0
    return images, mask


def export_onnx(detector: nn.Module, out: str | Path, opset: int = 18, exporter: str = "dynamo",
                image_size: int = 128) -> Path:
    """Write `detector` (in eval mode) to `out` as ONNX; `exporter` is torch.export-based `dynamo` or `torchscript`."""
    if opset < 17:
        raise UserError(f"--opset {opset}: at least 17 is needed (LayerNormalization)")
    if exporter not in EXPORTERS:
        raise UserError(f"--onnx-exporter {exporter}: expected one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError("--onnx-exporter dynamo: needs onnxscript (pip install 'kddetr[export]')") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = DeployedDetector(detector).eval()
    args = sample_inputs(2, image_size, image_size)
    axes = ({0: "batch", 2: "height", 3: "width"}, {0: "batch", 1: "height", 2: "width"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # names shared by both inputs
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        if exporter == "dynamo":
            torch.onnx.export(model, args, str(out), input_names=list(INPUTS), output_names=list(OUTPUTS),
                              opset_version=opset, dynamo=True, dynamic_shapes=axes, verbose=False,
                              external_data=False)
        else:
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape reads of the weights
            dynamic_axes = {**dict(zip(INPUTS, axes)), **{name: {0: "batch"} for name in OUTPUTS}}
            torch.onnx.export(model, args, str(out), input_names=list(INPUTS), output_names=list(OUTPUTS),
                              opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes)
    return out


def onnx_max_error(path: str | Path, detector: nn.Module, images: Tensor, mask: Tensor) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's logits and boxes on one batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(list(OUTPUTS), {"images": images.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        expected = DeployedDetector(detector).eval()(images, mask)
    return max((torch.from_numpy(got) - want).abs().max().item() for got, want in zip((logits, boxes), expected))

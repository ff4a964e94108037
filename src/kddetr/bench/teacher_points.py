"""Teacher check: a teacher's AP decoding its own queries' boxes as distillation points, beside its detections."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from kddetr.bench.records import print_and_record
from kddetr.engine.evaluate import evaluate
from kddetr.models.protocol import DetectorOutput, ImageBatch, Queries


class AsPoints(nn.Module):
    """A detector whose detections are its own queries' boxes decoded as a distillation point group: anchors only,
    each point's content what the detector gives an extra group (as the specific points of KD-DETR)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: ImageBatch) -> DetectorOutput:
        memory = self.detector.encode(images)
        anchors = self.detector.learned_queries(images.batch_size, memory).anchors
        out = self.detector.decode(memory, Queries(anchors=anchors.expand(images.batch_size, -1, -1)))
        return DetectorOutput(logits=out.logits, boxes=out.boxes)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kddetr bench teacher-points", description=__doc__ + (
        " Where the points' AP falls below the detections', the teacher answers worse at distillation points "
        "than at its own queries, and KD-DETR distils those answers."))
    p.add_argument("checkpoints", type=Path, nargs="+", help="DETR checkpoints (teachers)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override for every checkpoint, e.g. model.rt_detr.point_content=proposal")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--records", type=Path, help="save the command and its table here, for `kddetr bench report`")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from kddetr.data.coco import build_dataset
    from kddetr.data.loader import make_loader
    from kddetr.engine.checkpoint import load_checkpoint
    from kddetr.engine.runner import check_device
    from kddetr.models.build import num_select

    args = parser().parse_args(argv)
    check_device(args.device)
    lines = [f"AP on `{args.split}`; overrides: {', '.join(args.overrides) or 'none'}", "",
             "| checkpoint | detections AP | own queries as points AP | points − detections |", "|---|---:|---:|---:|"]
    for path in args.checkpoints:
        ckpt = load_checkpoint(path, args.device, overrides=args.overrides)
        dataset = build_dataset(args.data, args.split, ckpt.config.data, train=False)
        ckpt.dataset.check_matches(str(path), dataset.category_ids)
        loader = make_loader(dataset, args.batch_size, False, 0)
        top_k = num_select(ckpt.config.model)
        with torch.no_grad():
            detections = evaluate(ckpt.model, loader, dataset, args.device, top_k, progress=False)[0]["AP"]
            points = evaluate(AsPoints(ckpt.model), loader, dataset, args.device, top_k, progress=False)[0]["AP"]
        lines.append(f"| `{path}` | {detections:.1f} | {points:.1f} | {points - detections:+.1f} |")
        print(lines[-1], flush=True)
    print_and_record("teacher-points", argv, "\n".join(lines), args.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

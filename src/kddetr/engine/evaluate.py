"""COCO evaluation: post-processing, COCO results format, faster-coco-eval AP."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor, nn
from torchvision.ops import box_convert
from tqdm import tqdm

from kddetr.engine import distributed as dist
from kddetr.models.protocol import DetectorOutput

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def postprocess(logits: Tensor, boxes: Tensor, orig_sizes: Tensor, top_k: int = 100) -> list[dict[str, Tensor]]:
    """Top-k (query, class) pairs by sigmoid score per image; boxes as xyxy pixels of the original image.

    `logits [B,Q,C]`, `boxes [B,Q,4]` cxcywh in [0, 1], `orig_sizes [B,2]` (h, w). Boxes are clipped to the image.
    """
    num_classes = logits.shape[-1]
    scores, index = logits.sigmoid().flatten(1).topk(min(top_k, logits[0].numel()), dim=1)
    query, labels = index // num_classes, index % num_classes
    xyxy = box_convert(boxes, "cxcywh", "xyxy").gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
    h, w = orig_sizes.to(xyxy).unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)[:, None, :]
    xyxy = torch.minimum((xyxy * scale).clamp(min=0), scale)
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]


def postprocess_outputs(outputs: DetectorOutput, orig_sizes: Tensor, top_k: int = 100) -> list[dict[str, Tensor]]:
    """`postprocess` of the detection queries, or the detector's own detections when it has them (Faster R-CNN:
    NMS'ed, boxes normalised xyxy) scaled to the original image and cut to the `top_k` best."""
    if outputs.detections is None:
        return postprocess(outputs.pred_logits.float(), outputs.pred_boxes.float(), orig_sizes, top_k)
    h, w = orig_sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1).float()
    results = []
    for det, size in zip(outputs.detections, scale):
        keep = det["scores"].float().argsort(descending=True)[:top_k]
        results.append({"scores": det["scores"][keep].float(), "labels": det["labels"][keep],
                        "boxes": det["boxes"][keep].float() * size.to(det["boxes"].device)})
    return results


def to_coco_results(predictions: Sequence[dict[str, Tensor]], image_ids: Iterable[int | Tensor],
                    category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results: one `{image_id, category_id (original), bbox [x, y, w, h] pixels, score}` per detection."""
    results = []
    for pred, image_id in zip(predictions, image_ids):
        xywh = box_convert(pred["boxes"].float(), "xyxy", "xywh").tolist()
        for score, label, box in zip(pred["scores"].tolist(), pred["labels"].tolist(), xywh):
            results.append({
                "image_id": int(image_id),
                "category_id": int(category_ids[label]),
                "bbox": [round(v, 2) for v in box],
                "score": round(score, 6),
            })
    return results


def coco_metrics(coco_gt: dict, results: list[dict], image_ids: Optional[Iterable[int]] = None) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl in percent; -1 where the ground truth has no object of that size (as in COCO).

    `image_ids` restricts the evaluation to those images (e.g. a subset the loader covered).
    Empty `results` give zeros.
    """
    if not results:
        return dict.fromkeys(METRIC_KEYS, 0.0)
    # faster-coco-eval adds fields to the records it is given: hand it copies.
    gt = COCO({**coco_gt, **{k: [dict(r) for r in coco_gt[k]] for k in ("images", "annotations", "categories")}})
    evaluator = COCOeval_faster(gt, gt.loadRes([dict(r) for r in results]), iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.run()
    return {k: float(v) * 100 if v >= 0 else -1.0 for k, v in zip(METRIC_KEYS, evaluator.stats)}


def evaluate(model: nn.Module, loader: Iterable, dataset: Any, device: torch.device | str, top_k: int = 100,
             progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Run `model` over `loader` and score it against `dataset.coco_gt` on the images the loader covered.

    `dataset` supplies `coco_gt` and `category_ids`. Under torch.distributed every process gets the
    metrics of all processes' images (repeated images, as a DistributedSampler pads, count once).
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    per_image: dict[int, list[dict]] = {}
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
            outputs = model(images.to(device))
            orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            predictions = postprocess_outputs(outputs, orig_sizes, top_k)
            for prediction, target in zip(predictions, targets):
                image_id = int(target["image_id"])
                per_image[image_id] = to_coco_results([prediction], [image_id], dataset.category_ids)
    model.train(was_training)
    merged: dict[int, list[dict]] = {}
    for part in dist.all_gather_objects(per_image):
        for image_id, results in part.items():
            merged.setdefault(image_id, results)
    results = [r for image_results in merged.values() for r in image_results]
    return coco_metrics(dataset.coco_gt, results, image_ids=merged.keys()), results


def print_metrics_table(metrics: dict[str, float], title: str = "") -> str:
    """A markdown table of the metrics (undefined values, -1, shown as '–')."""
    keys = list(metrics)
    cells = [f"{metrics[k]:.1f}" if metrics[k] >= 0 else "–" for k in keys]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys), "| " + " | ".join(cells) + " |"]
    return "\n".join(lines)

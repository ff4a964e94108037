"""Evaluation: post-processing by hand, COCO results format, AP on known cases, the evaluate loop."""
import json
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from kddetr.config import DataConfig
from kddetr.data.coco import build_dataset
from kddetr.data.collate import collate
from kddetr.engine.evaluate import (METRIC_KEYS, coco_metrics, evaluate, postprocess, print_metrics_table,
                                    to_coco_results)
from kddetr.models.protocol import DetectorOutput, ImageBatch


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_postprocess_topk_order_and_box_scaling():
    logits = torch.tensor([[[logit(0.2), logit(0.9)],
                            [logit(0.6), logit(0.1)],
                            [logit(0.3), logit(0.7)]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0], [0.9, 0.1, 0.4, 0.4]]])
    (pred,) = postprocess(logits, boxes, torch.tensor([[100, 200]]), top_k=4)  # h=100, w=200
    torch.testing.assert_close(pred["scores"], torch.tensor([0.9, 0.7, 0.6, 0.3]))
    assert pred["labels"].tolist() == [1, 1, 0, 0]
    expected = torch.tensor([[80.0, 30, 120, 70],  # query 0
                             [140, 0, 200, 30],  # query 2, clipped at the top-right corner
                             [0, 0, 100, 100],  # query 1
                             [140, 0, 200, 30]])
    torch.testing.assert_close(pred["boxes"], expected)


def test_postprocess_batches_and_caps_top_k():
    generator = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 5, 3, generator=generator), torch.rand(2, 5, 4, generator=generator) * 0.5 + 0.25
    preds = postprocess(logits, boxes, torch.tensor([[10, 20], [30, 40]]), top_k=100)
    assert len(preds) == 2 and all(len(p["scores"]) == 15 for p in preds)
    for p, lg in zip(preds, logits):  # a sigmoid over another shape may differ in the last bit (vectorised tails)
        torch.testing.assert_close(p["scores"], lg.sigmoid().flatten().sort(descending=True).values)
    assert preds[1]["boxes"][:, 0::2].max() <= 40 and preds[1]["boxes"][:, 1::2].max() <= 30


def test_to_coco_results_format():
    preds = [{"scores": torch.tensor([0.123456789]), "labels": torch.tensor([1]),
              "boxes": torch.tensor([[10.0, 20.0, 40.5, 60.25]])},
             {"scores": torch.empty(0), "labels": torch.empty(0, dtype=torch.long), "boxes": torch.empty(0, 4)}]
    results = to_coco_results(preds, [torch.tensor(5), 6], category_ids=[3, 7])
    assert results == [{"image_id": 5, "category_id": 7, "bbox": [10.0, 20.0, 30.5, 40.25], "score": 0.123457}]
    assert type(results[0]["image_id"]) is int and all(type(v) is float for v in results[0]["bbox"])
    json.dumps(results)


def perfect(coco: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in coco["annotations"] if not a["iscrowd"]]


def test_perfect_predictions_score_100(coco_dict):
    metrics = coco_metrics(coco_dict, perfect(coco_dict))
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == pytest.approx(100)


def test_detection_on_a_crowd_region_is_not_a_false_positive(coco_dict):
    crowd = next(a for a in coco_dict["annotations"] if a["iscrowd"])
    extra = {"image_id": crowd["image_id"], "category_id": crowd["category_id"], "bbox": crowd["bbox"], "score": 1.0}
    assert coco_metrics(coco_dict, perfect(coco_dict) + [extra])["AP"] == pytest.approx(100)


def test_wrong_predictions_score_low(coco_dict):
    results = perfect(coco_dict)
    wrong_class = [{**r, "category_id": 3 if r["category_id"] == 7 else 7} for r in results]
    assert coco_metrics(coco_dict, wrong_class)["AP"] == 0
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2], *r["bbox"][1:]]} for r in results]
    assert coco_metrics(coco_dict, shifted)["AP50"] == 0


def test_empty_predictions_give_zeros(coco_dict):
    assert coco_metrics(coco_dict, []) == dict.fromkeys(METRIC_KEYS, 0.0)


def test_evaluation_restricted_to_image_ids(coco_dict):
    only_10 = [r for r in perfect(coco_dict) if r["image_id"] == 10]
    assert coco_metrics(coco_dict, only_10, image_ids=[10])["AP"] == pytest.approx(100)
    assert coco_metrics(coco_dict, only_10)["AP"] < 100


def test_matches_pycocotools_on_noisy_predictions(coco_dict, tmp_path):
    pycocotools = pytest.importorskip("pycocotools.coco")
    from pycocotools.cocoeval import COCOeval

    rng = random.Random(0)
    results = []
    for r in perfect(coco_dict) * 3:
        x, y, w, h = r["bbox"]
        box = [x + rng.uniform(-8, 8), y + rng.uniform(-8, 8), w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3)]
        results.append({**r, "bbox": box, "score": rng.random(), "category_id": rng.choice([3, 7])})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco_dict))
    gt = pycocotools.COCO(str(path))
    reference = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
    reference.evaluate(), reference.accumulate(), reference.summarize()
    ours = coco_metrics(coco_dict, results)
    for key, value in zip(METRIC_KEYS, reference.stats):
        assert ours[key] == pytest.approx(value * 100 if value >= 0 else -1, abs=1e-6)
    assert 0 < ours["AP50"] < 100


class ReplayModel(nn.Module):
    """Stand-in detector: answers each batch with ground-truth boxes as confident queries, in loader order."""

    def __init__(self, targets: list[dict], num_classes: int, num_queries: int = 5):
        super().__init__()
        self.targets, self.num_classes, self.num_queries = targets, num_classes, num_queries
        self.calls, self.grad_enabled = 0, []

    def forward(self, images: ImageBatch) -> DetectorOutput:
        batch = self.targets[self.calls:self.calls + images.batch_size]
        self.calls += images.batch_size
        self.grad_enabled.append(torch.is_grad_enabled())
        logits = torch.full((len(batch), self.num_queries, self.num_classes), -10.0)
        boxes = torch.full((len(batch), self.num_queries, 4), 0.5)
        for i, t in enumerate(batch):
            n = len(t["labels"])
            logits[i, torch.arange(n), t["labels"]] = 10.0
            boxes[i, :n] = t["boxes"]
        return DetectorOutput(logits=logits[None], boxes=boxes[None])


EVAL_CFG = DataConfig(train_sizes=[64], eval_size=64, max_size=160)


def test_evaluate_loop(coco_dict, make_coco):
    dataset = build_dataset(make_coco(coco_dict), "val", EVAL_CFG, train=False)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate)
    model = ReplayModel([dataset[i][1] for i in range(len(dataset))], num_classes=len(dataset.category_ids))
    model.train()
    metrics, results = evaluate(model, loader, dataset, "cpu", top_k=10, progress=False)
    assert metrics["AP"] == pytest.approx(100, abs=0.01)
    assert model.training and model.grad_enabled == [False, False]
    assert len(results) == 10 * len(dataset)
    best = max((r for r in results if r["image_id"] == 11), key=lambda r: r["score"])
    assert best["category_id"] == 7 and best["bbox"] == pytest.approx([20, 30, 50, 60], abs=0.5)


def _distributed_eval(rank: int, root: str, store: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dataset = build_dataset(root, "val", EVAL_CFG, train=False)
    sampler = DistributedSampler(dataset, shuffle=False)  # 3 images on 2 processes: one is seen twice
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=collate)
    model = ReplayModel([dataset[i][1] for i in sampler], num_classes=2)
    metrics, results = evaluate(model, loader, dataset, "cpu", top_k=10, progress=False)
    out[rank] = (metrics["AP"], len(results), sorted({r["image_id"] for r in results}), model.calls)
    dist.destroy_process_group()


def test_evaluate_gathers_over_processes(coco_dict, make_coco, tmp_path):
    root = make_coco(coco_dict)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_distributed_eval, args=(str(root), str(tmp_path / "store"), out), nprocs=2)
        out = dict(out)
    for rank in (0, 1):
        assert out[rank][0] == pytest.approx(100, abs=0.01)
        assert out[rank][1:] == (30, [10, 11, 12], 2)


def test_metrics_table():
    table = print_metrics_table({"AP": 12.345, "AP50": 30.0, "APs": -1.0}, title="val")
    assert table.splitlines() == ["**val**", "", "| AP | AP50 | APs |", "|---:|---:|---:|", "| 12.3 | 30.0 | – |"]

"""Learning, not just running: a small DAB-DETR overfits a few images to a high COCO AP50."""
from pathlib import Path

import torch

from kddetr.config import load_config
from kddetr.data.coco import build_dataset
from kddetr.data.collate import collate
from kddetr.data.synth import generate
from kddetr.engine.evaluate import coco_metrics, postprocess, to_coco_results
from kddetr.models.build import build_criterion, build_detector

ROOT = Path(__file__).parent.parent.parent
OVERRIDES = [
    f"model.backbone.weights={ROOT / 'assets/backbone/resnet10_s3.safetensors'}",
    "model.backbone.name=resnet10", "model.backbone.num_stages=3",
    "model.backbone.frozen_bn=false", "model.backbone.freeze_stem=false",
    "model.hidden_dim=64", "model.num_heads=4", "model.encoder_layers=1", "model.decoder_layers=2",
    "model.dim_feedforward=256", "model.num_queries=10", "model.activation=relu",
    "model.dab_detr.normalize_before=true",
    "data.train_sizes=[128]", "data.eval_size=128", "data.max_size=256", "data.hflip=false", "data.random_crop=false",
]


def test_overfit_four_images_to_high_ap50(tmp_path):
    torch.manual_seed(0)
    generate(tmp_path, num_train=4, num_val=1, size=128, seed=3)
    cfg = load_config(None, OVERRIDES)
    train = build_dataset(tmp_path, "train", cfg.data, train=True)
    images, targets = collate([train[i] for i in range(len(train))])
    model = build_detector(cfg.model, train.num_classes)
    criterion = build_criterion(cfg.model, train.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(150):
        losses = criterion(model(images, targets), targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(images)
    sizes = torch.stack([t["orig_size"] for t in targets])
    preds = postprocess(out.pred_logits, out.pred_boxes, sizes)
    results = to_coco_results(preds, [int(t["image_id"]) for t in targets], train.category_ids)
    metrics = coco_metrics(train.coco_gt, results)
    assert metrics["AP50"] >= 50, metrics

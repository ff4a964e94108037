"""The Faster R-CNN adapter: RoI predictions at given boxes, isolation of groups, losses, detections, weights."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchvision.ops import box_convert

from kddetr.config import BackboneConfig, ModelConfig, load_config
from kddetr.data.coco import build_dataset
from kddetr.data.collate import collate
from kddetr.data.synth import generate
from kddetr.engine.evaluate import coco_metrics, postprocess_outputs, to_coco_results
from kddetr.errors import UserError
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.faster_rcnn import pad_cyclic
from kddetr.models.protocol import Detector, ImageBatch, Queries

from . import train_totals

NUM_CLASSES = 4
ROOT = Path(__file__).parents[2]
WEIGHTS = ROOT / "assets" / "backbone" / "resnet10_s3.safetensors"
CONFIG = ROOT / "configs" / "embedded_frcnn_student.yaml"
STEPS = 20


def tiny_config(**changes) -> ModelConfig:
    cfg = ModelConfig(arch="faster_rcnn", backbone=BackboneConfig(name="resnet10", num_stages=3), hidden_dim=16,
                      num_feature_levels=2, num_queries=20).replace(anchor_sizes=[16, 32, 64], roi_batch_size=32,
                                                                    roi_head_dim=32)
    return cfg.replace(**changes)


def _model(seed: int = 0, **changes):
    torch.manual_seed(seed)
    return build_detector(tiny_config(**changes), NUM_CLASSES)


def _images() -> ImageBatch:
    g = torch.Generator().manual_seed(1)
    images = ImageBatch(torch.randn(2, 3, 64, 80, generator=g), torch.zeros(2, 64, 80, dtype=torch.bool))
    images.mask[1, 48:] = True  # image 1 is 48 x 56, padded bottom and right
    images.mask[1, :, 56:] = True
    return images


def _targets():
    return [{"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.4]])},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.6]])}]


def test_decode_is_the_roi_head_at_the_given_boxes():
    model = _model().eval()
    images = _images()
    anchors = torch.rand(2, 7, 4, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.2
    with torch.no_grad():
        memory = model.encode(images)
        out = model.decode(memory, Queries(anchors))
        # by hand, with torchvision's modules: boxes in pixels of each unpadded image -> pool -> head -> predictor
        sizes = [(64, 80), (48, 56)]
        scales = [torch.tensor([w, h, w, h], dtype=torch.float32) for h, w in sizes]
        rois = [box_convert(a, "cxcywh", "xyxy") * s for a, s in zip(anchors, scales)]
        heads = model.roi_heads
        features = heads.box_head(heads.box_roi_pool(memory.features, rois, sizes))
        class_logits, deltas = heads.box_predictor(features)
        boxes = heads.box_coder.decode(deltas, rois).view(2, 7, NUM_CLASSES + 1, 4)
    assert out.logits.shape == (1, 2, 7, NUM_CLASSES) and out.boxes.shape == (1, 2, 7, 4)
    # the class mapping: logits are log-odds against background; softmax([0, logits]) is the RoI head's softmax
    padded = torch.nn.functional.pad(out.logits[0], (1, 0))
    assert torch.allclose(padded.softmax(-1), class_logits.view(2, 7, -1).softmax(-1), atol=1e-6)
    best = class_logits.view(2, 7, -1)[..., 1:].argmax(-1) + 1
    for b in range(2):
        expected = boxes[b, torch.arange(7), best[b]] / scales[b]
        assert torch.allclose(box_convert(out.boxes[0, b], "cxcywh", "xyxy"), expected, atol=1e-5)


def test_groups_are_isolated_and_detection_queries_are_the_proposals():
    model = _model().eval()
    images = _images()
    g = torch.Generator().manual_seed(3)
    groups = [Queries(torch.rand(2, k, 4, generator=g) * 0.5 + 0.2) for k in (5, 3)]
    with torch.no_grad():
        plain = model(images)
        both = model(images, extra_queries=groups)
        alone = model(images, extra_queries=groups[1:])
        memory = model.encode(images)
        own = model.decode(memory, model.learned_queries(2, memory))
    assert isinstance(model, Detector)
    assert torch.equal(plain.logits, both.logits) and torch.equal(plain.boxes, both.boxes)
    assert torch.allclose(both.extra[1].logits, alone.extra[0].logits, atol=1e-6)
    assert torch.allclose(own.logits, plain.logits, atol=1e-5) and torch.allclose(own.boxes, plain.boxes, atol=1e-5)
    assert plain.logits.shape[2] <= model.num_queries
    proposals = model.learned_queries(2, memory).anchors
    assert proposals.shape == (2, plain.logits.shape[2], 4) and 0 <= proposals.min() and proposals.max() <= 1


def test_training_returns_torchvision_losses_that_train():
    model = _model().train()
    criterion = build_criterion(tiny_config(), NUM_CLASSES)
    images, targets = _images(), _targets()
    totals, losses = train_totals(model, criterion, images, targets, steps=8)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert totals[-1] < totals[0]


def test_inference_detections_are_normalised_and_labels_contiguous():
    model = _model().eval()
    with torch.no_grad():
        out = model(_images())
    assert out.losses is None and len(out.detections) == 2
    for det in out.detections:
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= 1
        assert det["labels"].min() >= 0 and det["labels"].max() < NUM_CLASSES
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])


def test_backbone_loads_the_local_weights_file():
    model = _model(backbone=BackboneConfig(name="resnet10", num_stages=3, weights=str(WEIGHTS)))
    state = load_file(str(WEIGHTS))
    assert torch.equal(model.backbone.body.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert "layer4" not in dict(model.backbone.body.named_children())


def test_anchor_sizes_must_match_the_levels():
    with pytest.raises(UserError, match="model.faster_rcnn.anchor_sizes"):
        _model(anchor_sizes=[16, 32])


def test_proposals_padded_by_repetition_or_the_whole_image():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 6.0]])
    assert torch.equal(pad_cyclic(boxes, 5, (10, 20)), boxes[[0, 1, 0, 1, 0]])
    assert torch.equal(pad_cyclic(boxes[:0], 2, (10, 20)), torch.tensor([[0.0, 0.0, 20.0, 10.0]] * 2))


def test_embedded_student_overfits_four_images(tmp_path):
    """Learning, not just running: the embedded config's student fits 4 synthetic images to a high AP50."""
    torch.manual_seed(0)
    generate(tmp_path, num_train=4, num_val=1, size=128, seed=3)
    cfg = load_config(CONFIG, [f"model.backbone.weights={WEIGHTS}"])
    train = build_dataset(tmp_path, "train", cfg.data, train=False)
    images, targets = collate([train[i] for i in range(len(train))])
    model = build_detector(cfg.model, train.num_classes)
    criterion = build_criterion(cfg.model, train.num_classes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(STEPS):
        losses = criterion(model(images, targets), targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = postprocess_outputs(model(images), torch.stack([t["orig_size"] for t in targets]))
    results = to_coco_results(predictions, [int(t["image_id"]) for t in targets], train.category_ids)
    assert coco_metrics(train.coco_gt, results)["AP50"] >= 50

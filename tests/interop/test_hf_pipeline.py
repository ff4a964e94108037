"""HF users run an export as it is: `AutoImageProcessor` and `pipeline("object-detection")` find the right
processor in it, and the pipeline alone scores what `kddetr` scores."""
import json
from pathlib import Path

import pytest
from PIL import Image

import kddetr
from kddetr.config import Config
from kddetr.data.synth import generate
from kddetr.engine.evaluate import coco_metrics
from kddetr.interop.cli import export_checkpoint

from . import export_to_hf, tiny_config

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).parents[2]


def _coco_results(image_id: int, boxes, scores, category_ids) -> list[dict]:
    return [{"image_id": image_id, "category_id": int(c), "score": float(s),
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for b, s, c in zip(boxes, scores, category_ids)]


def test_the_hf_pipeline_alone_reproduces_kddetr_ap_of_the_committed_teacher(tmp_path):
    export_checkpoint(REPO / "assets" / "teacher", "hf", tmp_path / "hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert type(processor).__name__.startswith("ConditionalDetrImageProcessor")  # sigmoid top-k, not DETR's softmax
    assert processor.size == {"shortest_edge": 128, "longest_edge": 256}
    generate(tmp_path / "data", num_train=1, num_val=0, size=128, seed=0, num_test=10)
    gt = json.loads((tmp_path / "data" / "annotations" / "instances_test.json").read_text())
    pipe = transformers.pipeline("object-detection", model=str(tmp_path / "hf"))
    ours = kddetr.load(REPO / "assets" / "teacher")
    name_to_id = {c["name"]: c["id"] for c in gt["categories"]}
    hf_results, our_results = [], []
    for image in gt["images"]:
        pil = Image.open(tmp_path / "data" / "images" / "test" / image["file_name"]).convert("RGB")
        found = pipe(pil, threshold=0.0)
        hf_results += _coco_results(image["id"], [[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]
                                                  for d in found], [d["score"] for d in found],
                                    [name_to_id[d["label"]] for d in found])
        mine, = ours.predict(pil, top_k=len(found))  # the pipeline keeps 100 and rounds boxes to whole pixels
        our_results += _coco_results(image["id"], mine.boxes.int().tolist(), mine.scores, mine.category_ids)
    assert len(hf_results) == len(our_results) == 100 * len(gt["images"])
    hf_ap, our_ap = coco_metrics(gt, hf_results)["AP"], coco_metrics(gt, our_results)["AP"]
    assert our_ap > 30 and abs(hf_ap - our_ap) < 0.3, (hf_ap, our_ap)


def test_deformable_export_names_deformable_detrs_processor(tmp_path):
    cfg = Config(model=tiny_config(arch="deformable_detr", activation="relu", num_feature_levels=2, num_queries=5))
    export_to_hf(cfg, transformers.DeformableDetrForObjectDetection, tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert type(processor).__name__.startswith("DeformableDetrImageProcessor")
    assert processor.size == {"shortest_edge": cfg.data.eval_size, "longest_edge": cfg.data.max_size}
    pipe = transformers.pipeline("object-detection", model=str(tmp_path / "hf"))
    found = pipe(Image.new("RGB", (96, 64), "white"), threshold=0.0)
    assert len(found) == 5 * 3 and {d["label"] for d in found} <= {"three", "seven", "eleven"}

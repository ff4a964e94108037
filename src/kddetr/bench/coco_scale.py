"""COCO-sized annotations (`kddetr bench coco-scale`): load time and peak RSS of a train2017-sized annotation
file, and the time to score 5000 images x 300 detections. No image files are needed."""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from kddetr.bench.rss import peak_rss, reset_peak_rss

# COCO train2017: images, boxes (crowd included), categories; val2017 images; detections per image scored
TRAIN_IMAGES, TRAIN_BOXES, CATEGORIES, VAL_IMAGES, DETECTIONS = 118_287, 860_001, 80, 5_000, 300


def make_annotations(num_images: int, num_boxes: int, num_categories: int, seed: int = 0) -> dict:
    """A COCO annotation dict of the given size: 640x480 images, boxes spread over them at random."""
    rng = np.random.default_rng(seed)
    image_of = np.sort(rng.integers(1, num_images + 1, num_boxes))
    xy = rng.uniform(0, 400, (num_boxes, 2)).round(2)
    wh = rng.uniform(4, 200, (num_boxes, 2)).round(2)
    category = rng.integers(1, num_categories + 1, num_boxes)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(1, num_images + 1)]
    annotations = [{"id": k + 1, "image_id": int(image_of[k]), "category_id": int(category[k]),
                    "bbox": [float(xy[k, 0]), float(xy[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
                    "area": float(wh[k, 0] * wh[k, 1]), "iscrowd": 0} for k in range(num_boxes)]
    categories = [{"id": c, "name": f"class_{c}"} for c in range(1, num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def detections_for(coco: dict, per_image: int, seed: int = 0) -> list[dict]:
    """`per_image` scored boxes per image: jittered ground truth first, then random boxes (COCO results format)."""
    rng = np.random.default_rng(seed)
    by_image: dict[int, list[list[float]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    results = []
    for image in coco["images"]:
        boxes = np.array(by_image.get(image["id"], []), dtype=np.float64).reshape(-1, 4)[:per_image]
        boxes = boxes + rng.normal(0, 3, boxes.shape)
        extra = np.concatenate([rng.uniform(0, 400, (per_image - len(boxes), 2)),
                                rng.uniform(4, 200, (per_image - len(boxes), 2))], axis=1)
        scores = rng.uniform(0, 1, per_image)
        categories = rng.integers(1, len(coco["categories"]) + 1, per_image)
        for box, score, category in zip(np.concatenate([boxes, extra]).round(2), scores, categories):
            results.append({"image_id": image["id"], "category_id": int(category), "bbox": box.tolist(),
                            "score": float(score)})
    return results


def _load_probe(root: str) -> None:
    """Run in a fresh process: load the annotations as training does; print seconds and peak RSS (MiB)."""
    from kddetr.data.coco import CocoDetection

    before = reset_peak_rss()  # torch and kddetr imported
    start = time.perf_counter()
    dataset = CocoDetection(root, "train", check_images=False)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "imports_rss_mib": before, "images": len(dataset)}))


def load_benchmark(num_images: int, num_boxes: int, tmp: Path) -> dict:
    (tmp / "images" / "train").mkdir(parents=True)
    (tmp / "annotations").mkdir()
    (tmp / "annotations" / "instances_train.json").write_text(
        json.dumps(make_annotations(num_images, num_boxes, CATEGORIES)))
    probe = subprocess.run([sys.executable, "-c", f"from kddetr.bench.coco_scale import _load_probe; "
                            f"_load_probe({str(tmp)!r})"], capture_output=True, text=True, check=True)
    return json.loads(probe.stdout.strip().splitlines()[-1])


def eval_benchmark(num_images: int, per_image: int) -> dict:
    from kddetr.engine.evaluate import coco_metrics

    coco = make_annotations(num_images, num_images * TRAIN_BOXES // TRAIN_IMAGES, CATEGORIES, seed=1)
    results = detections_for(coco, per_image)
    start = time.perf_counter()
    metrics = coco_metrics(coco, results)
    return {"seconds": time.perf_counter() - start, "detections": len(results), "AP": metrics["AP"]}


def _tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and all its descendants (Linux /proc), MiB: pages a forked loader worker
    shares with its parent count once, not once per process as resident-set sizes would."""
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            total += next(int(l.split()[1]) for l in rollup.splitlines() if l.startswith("Pss:")) / 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def training_rss(num_images: int, workers: int, tmp: Path, epochs: int = 2) -> list[float]:
    """`kddetr train` (a small student, 64 px, `workers` loader processes) over a `num_images` dataset: the peak
    memory (PSS) of the whole process tree up to the end of each epoch. No val split, so no evaluation loader
    (with workers of its own) joins at the last epoch: the probe measures training alone."""
    from kddetr.data.synth import generate

    generate(tmp / "data", num_train=num_images, num_val=0, num_test=0, size=64, seed=0)
    (tmp / "data" / "annotations" / "instances_val.json").unlink(missing_ok=True)
    small = ["model.hidden_dim=32", "model.dim_feedforward=64", "model.num_queries=10", "data.train_sizes=[64]",
             "data.eval_size=64", "train.batch_size=16", "train.eval_every=0", f"data.num_workers={workers}",
             "model.backbone.weights=null", "model.backbone.num_stages=2"]
    args = [sys.executable, "-m", "kddetr", "train", "configs/embedded_student.yaml", "--data", str(tmp / "data"),
            "--out", str(tmp / "run"), "--epochs", str(epochs), "--no-progress",
            *[x for item in small for x in ("--set", item)]]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, per_epoch, peak = tmp / "run" / "metrics.jsonl", [], 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_pss_mib(proc.pid))
        done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        if done > len(per_epoch):
            per_epoch.append(peak)  # the highest RSS seen up to the end of this epoch
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"training for the RSS probe failed: {proc.stderr.read()[-500:]}")
    done = len(metrics.read_text().splitlines())
    return per_epoch + [peak] * (done - len(per_epoch))  # epochs that ended between the last two looks


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="kddetr bench coco-scale", description=__doc__)
    p.add_argument("--images", type=int, default=TRAIN_IMAGES)
    p.add_argument("--boxes", type=int, default=TRAIN_BOXES)
    p.add_argument("--eval-images", type=int, default=VAL_IMAGES)
    p.add_argument("--detections", type=int, default=DETECTIONS, help="scored detections per image")
    p.add_argument("--train-images", type=int, default=10_000, help="dataset size of the training-RSS probe (0: skip)")
    p.add_argument("--workers", type=int, default=2, help="loader processes of the training-RSS probe")
    p.add_argument("--only", choices=("load", "eval", "train-rss"), action="append",
                   help="parts to run (repeatable; default all)")
    p.add_argument("--records", type=Path, help="also save the command and what it printed here (output.json)")
    args = p.parse_args(argv)
    parts = args.only or ["load", "eval", "train-rss"]
    lines = []
    if "load" in parts or "eval" in parts:
        lines.append("| what | size | seconds | peak RSS (MiB) | of which imports (MiB) |\n|---|---|---:|---:|---:|")
    if "load" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            load = load_benchmark(args.images, args.boxes, Path(tmp))
        lines.append(f"| load annotations (CocoDetection) | {args.images} images, {args.boxes} boxes, {CATEGORIES} "
                     f"classes | {load['seconds']:.1f} | {load['peak_rss_mib']:.0f} | {load['imports_rss_mib']:.0f} |")
    if "eval" in parts:
        evaluation = eval_benchmark(args.eval_images, args.detections)
        lines.append(f"| COCO evaluation (faster-coco-eval) | {args.eval_images} images x {args.detections} "
                     f"detections | {evaluation['seconds']:.1f} | – | – |")
    if "train-rss" in parts and args.train_images:
        with tempfile.TemporaryDirectory() as tmp:
            rss = training_rss(args.train_images, args.workers, Path(tmp))
        lines.append(f"\nTraining over {args.train_images} images ({args.workers} loader workers): peak memory (PSS) "
                     f"of the process tree {rss[0]:.0f} MiB by the end of epoch 1, {rss[-1]:.0f} MiB by the end of "
                     f"epoch {len(rss)} (growth after the first epoch: {rss[-1] - rss[0]:+.0f} MiB)")
    text = "\n".join(lines)
    print(text)
    if args.records:
        from kddetr.bench.records import save_output

        argv = list(argv if argv is not None else sys.argv[1:])
        save_output(args.records, "kddetr bench coco-scale " + shlex.join(argv), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

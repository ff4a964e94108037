"""Pictures: detections drawn on images, and loss/AP curves of training runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torchvision.utils import draw_bounding_boxes

from kddetr.errors import UserError

_PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
            "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000"]


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: Sequence[int], scores: Sequence[float],
                    names: Sequence[str]) -> torch.Tensor:
    """uint8 `[3, H, W]` image with `xyxy` pixel boxes drawn, captioned 'name score'."""
    captions = [f"{names[int(c)]} {float(s):.2f}" for c, s in zip(labels, scores)]
    colors = [_PALETTE[int(c) % len(_PALETTE)] for c in labels]
    if len(captions) == 0:
        return image
    return draw_bounding_boxes(image, boxes, labels=captions, colors=colors, width=2)


def read_metrics(run: Path) -> list[dict]:
    file = Path(run) / "metrics.jsonl"
    if not file.is_file():
        raise UserError(f"{file}: not found; is {run} a run directory?")
    rows = []
    for i, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{file}:{i}: invalid JSON ({e})") from None
    return rows


X_AXES = {"epoch": ("epoch", 1.0), "step": ("step", 1.0), "time": ("time_s", 1 / 60)}


def plot_runs(runs: Sequence[Path], out: Path, x: str = "epoch") -> Path:
    """Training loss and validation AP / AP50 against epochs, steps or training minutes, one line per run."""
    if x not in X_AXES:
        raise UserError(f"--x: {x!r} is not one of {', '.join(X_AXES)}")
    key, scale = X_AXES[x]
    xlabel = "training time (min)" if x == "time" else x
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        rows = read_metrics(run)
        name = Path(run).name
        rows = [r for r in rows if key in r]
        ax_loss.plot([r[key] * scale for r in rows], [r.get("train/loss", float("nan")) for r in rows], label=name)
        evals = [r for r in rows if "AP" in r]
        xs = [r[key] * scale for r in evals]
        line, = ax_ap.plot(xs, [r["AP"] for r in evals], marker="o", label=f"{name} AP")
        ax_ap.plot(xs, [r["AP50"] for r in evals], ls="--", color=line.get_color(), label=f"{name} AP50")
    ax_loss.set(xlabel=xlabel, ylabel="training loss", title="loss")
    ax_ap.set(xlabel=xlabel, ylabel="COCO AP (%)", title="validation AP (solid) and AP50 (dashed)")
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

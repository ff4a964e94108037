"""KD-DETR: knowledge distillation for detection transformers.

    import kddetr
    detections = kddetr.load("assets/teacher").predict("photo.jpg")

The names below are imported on first use, so `import kddetr` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "kddetr.api", "Predictor": "kddetr.api", "Detections": "kddetr.api",
    "Distiller": "kddetr.kd.distiller", "DistillationLoss": "kddetr.kd.losses",
    "Config": "kddetr.config", "KDConfig": "kddetr.config", "load_config": "kddetr.config",
    "build_detector": "kddetr.models.build", "build_criterion": "kddetr.models.build",
    "build_dataset": "kddetr.data.coco", "collate": "kddetr.data.collate",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kddetr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

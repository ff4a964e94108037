"""The Python API: `kddetr.load(ckpt).predict(images)` and the pieces to distil inside your own training loop."""
from kddetr.engine.predictor import Detections, ImageInput, Predictor, load

__all__ = ["Detections", "ImageInput", "Predictor", "load"]

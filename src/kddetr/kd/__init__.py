"""KD-DETR distillation: point sampling, losses and the distiller (detector-agnostic)."""

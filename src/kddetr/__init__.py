"""KD-DETR: knowledge distillation for detection transformers."""
__version__ = "0.1.0"

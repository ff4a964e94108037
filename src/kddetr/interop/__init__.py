"""Checkpoint interop with HF transformers, official repos and ONNX."""
